//! The deterministic simulator (feature `std`): a scenario drives one [`SharingVm`] per mode,
//! and the run yields the event stream (the one event model) and a summary.
//!
//! Deterministic: the event order and every count depend only on the scenario. Timestamps run
//! on a simulated clock that the scenario's timeline sets and that costs advance: table
//! building is *measured* (it is the real code on real table memory), pinning is *modelled*
//! or, with `real_memory`, *measured* with `mlock`, IOTLB flushes are *modelled*.
//!
//! [`SharingVm`]: crate::sharing::engine::SharingVm

pub mod run;
pub mod scenario;

pub use run::{ModeRun, RunOptions, SimError, run_mode};
pub use scenario::{Action, Scenario, ScenarioError, Step};
