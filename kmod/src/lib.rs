//! tdpshare: sharing IOMMU page tables with KVM's TDP (EPT/NPT) tables.
//!
//! The default build is `#![no_std]` + `alloc` with no dependency, so the crate can be linked
//! into a kernel. Feature `serde` adds serde derives to the [`event`] model; feature `std` adds
//! the trace file format ([`trace`]), the userspace page arena and everything tests need.
//!
//! The page-table core: [`format`] (EPT/NPT encodings as data), [`caps`] (negotiating a format
//! both KVM and the IOMMU can walk), [`page_alloc`] (table memory), [`tdp_iter`] and
//! [`tdp_mmu`] (the TDP MMU), [`iommu`] and [`iotlb`] (the device side).
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod caps;
pub mod clock;
pub mod dirty;
pub mod event;
pub mod format;
pub mod handshake;
pub mod iommu;
pub mod iotlb;
pub mod mode;
pub mod page_alloc;
pub mod pin;
pub mod prepopulate;
pub mod sharing;
#[cfg(feature = "std")]
pub mod sim;
pub mod slot_tracker;
pub mod stats;
pub mod sync;
pub mod tdp_iter;
pub mod tdp_mmu;
#[cfg(feature = "std")]
pub mod trace;
pub mod vm;
