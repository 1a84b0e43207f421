//! The table layer: page-table memory, the walk iterator, the TDP MMU.
pub mod iter;
pub mod mmu;
pub mod page_alloc;
pub mod sync;
