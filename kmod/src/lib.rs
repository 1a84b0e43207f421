//! tdpshare: sharing IOMMU page tables with KVM's TDP (EPT/NPT) tables.
//!
//! The crate is its architecture: one folder per layer, each using only the layers below it.
//!
//! | layer | owns |
//! |---|---|
//! | [`decision`] | addresses, entry formats, capability negotiation, prerequisites, the modes' policies — compiled into the kernel as is |
//! | [`event`] | the one event model, per-VM totals, the trace format, the memslot transition tracker, clocks |
//! | [`table`] | page-table memory, the walk, the TDP MMU |
//! | [`iommu`] | the DMA walker, the IOTLB, the IOMMU domain |
//! | [`sharing`] | the VM model, pinning, the handshake, the sharing engine on its [`Platform`] |
//! | [`sim`] | (feature `std`) the simulator: scenarios, simulated vCPUs and device, runs |
//!
//! The default build is `#![no_std]` + `alloc` with no dependency, so the crate can be linked
//! into a kernel. Feature `serde` adds serde to the event model; feature `std` adds the trace
//! file format, the userspace arena, the simulator and everything tests need.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod decision;
pub mod event;
pub mod iommu;
pub mod sharing;
#[cfg(feature = "std")]
pub mod sim;
pub mod table;

// What the other crates of the workspace use, in one place.
pub use decision::addr::{Gfn, Gpa, Hpa, Iova, Level, PageSize};
pub use decision::format::{Kind, PteFormat};
pub use decision::policy::{DirtyTracking, Policy, ShareMode};
pub use event::slot_tracker::SlotTracker;
pub use event::stats::{Log2Histogram, VmStats};
#[cfg(feature = "std")]
pub use event::trace::{Header, TraceError, TraceFile, TraceReader};
pub use event::{Event, EventKind, EventSink, Source, VmId};
pub use sharing::{Platform, SharingVm};
