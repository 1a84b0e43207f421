//! The sharing layer: one VM's KVM MMU with an IOMMU attached, sharing its TDP table in one
//! mode — the VM model ([`vm`]), pinning ([`pin`]), the handshake ([`handshake`]), the engine
//! ([`engine`]: roots, notifications, sharing on/off) with what memslot changes and SMM do
//! ([`memslots`]), the fault paths ([`faults`]), pre-population ([`prepopulate`]) and dirty
//! tracking ([`dirty`]), on the services of a [`Platform`] ([`platform`]).
//!
//! May use: `decision`, `event`, `table`, `iommu`. Nothing above (the simulator drives it).

pub mod dirty;
pub mod engine;
pub mod faults;
pub mod handshake;
pub mod memslots;
pub mod pin;
pub mod platform;
pub mod prepopulate;
pub mod roots;
pub mod vm;

pub use engine::{SharingError, SharingVm, Totals};
pub use faults::error_code;
#[cfg(feature = "std")]
pub use pin::RealMemoryPinner;
pub use pin::{CostSource, ModelledPinner, PinCostModel, PinError, Pinner};
pub use platform::{IommuDriver, Parts, Platform};
pub use prepopulate::PREPOP_BATCH;
pub use vm::{Memslot, MmioRange, PrivateKind, SlotKind, Vm, VmConfig};
