//! tdpshare: sharing IOMMU page tables with KVM's TDP (EPT/NPT) tables.
//!
//! The default build is `#![no_std]` + `alloc` with no dependency, so the crate can be linked
//! into a kernel. Feature `serde` adds serde derives to the [`event`] model; feature `std` adds
//! the trace file format ([`trace`]) and everything userspace needs for tests and the simulator.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod event;
pub mod stats;
#[cfg(feature = "std")]
pub mod trace;
