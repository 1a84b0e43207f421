//! tdpshare: sharing IOMMU page tables with KVM's TDP (EPT/NPT) tables.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod decision;
pub mod event;
pub mod iommu;
pub mod sharing;
#[cfg(feature = "std")]
pub mod sim;
pub mod table;

pub use decision::{caps, format, policy as mode};
#[cfg(feature = "std")]
pub use event::trace;
pub use event::{clock, slot_tracker, stats};
pub use iommu::{iotlb, walker as iommu_walker};
pub use sharing::{dirty, handshake, pin, prepopulate, vm};
pub use table::{iter as tdp_iter, mmu as tdp_mmu, page_alloc, sync};
