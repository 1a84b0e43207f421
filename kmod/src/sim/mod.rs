//! The deterministic simulator (feature `std`): a scenario drives one sharing engine per mode,
//! on a userspace platform ([`platform`]), with simulated vCPUs and a simulated device
//! ([`machine`]) playing the hardware against it; the run yields the event stream (the one
//! event model) and a summary ([`run`]).
//!
//! Deterministic: the event order and every count depend only on the scenario. Timestamps run
//! on a simulated clock that the scenario's timeline sets and that costs advance: table
//! building is *measured* (it is the real code on real table memory), pinning is *modelled*
//! or, with `real_memory`, *measured* with `mlock`, IOTLB flushes are *modelled*.
//!
//! May use every layer below it.

#[cfg(feature = "clap")]
mod cli;
pub mod machine;
pub mod platform;
pub mod run;
pub mod scenario;

pub use machine::{DeviceTotals, Machine};
pub use platform::{SharedSink, SimPlatform};
pub use run::{ModeRun, RunOptions, SimError, run_mode};
pub use scenario::{Action, IommuKind, Scenario, ScenarioError, Step};
