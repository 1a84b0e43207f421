//! The table layer: page tables that KVM's vCPUs and an IOMMU walk together — their memory
//! ([`page_alloc`]: pages named by host-physical address, reused only after every walker that
//! could see them is gone), the walk ([`iter`], as Linux's `tdp_iter.c`), and the TDP MMU that
//! changes them under the atomic-update rules ([`mmu`], as `tdp_mmu.c`).
//!
//! May use: `decision` (formats, addresses), `event` (what it reports). Nothing above.

pub mod iter;
pub mod mmu;
pub mod page_alloc;
pub mod sync;

pub use iter::{IterPos, TdpIter};
pub use mmu::{
    Census, Fault, FaultResult, Leaf, Malformed, Mapping, MmuError, Outcome, RootId, RootInfo,
    RootRole, TdpMmu,
};
#[cfg(feature = "std")]
pub use page_alloc::Arena;
pub use page_alloc::{PageAllocator, Table};
