//! The sharing designs, as one trait: each mode is a policy the sharing engine (`sharing`)
//! follows, so the mechanics (pinning, pre-population, zaps, notifications) exist once and the
//! modes differ only where the designs differ.

use core::fmt;

use crate::event::ShareMode;
use crate::vm::PrivateKind;

/// What deleting or moving a memslot does to the table the IOMMU walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// KVM's fast zap: every root invalidated, vCPUs get new roots (root update).
    FastZapAllRoots,
    /// The root stays; all its leaves are zapped (the 2023 RFC's exported root).
    ZapAllLeaves,
    /// The root stays; only the removed slot's range is zapped.
    ZapSlot,
}

/// One sharing design.
pub trait Mode: fmt::Debug {
    fn kind(&self) -> ShareMode;
    /// DMA memory is pinned and present (the device takes no IO page faults).
    fn pins(&self) -> bool;
    /// The IOMMU walks the vCPUs' own root; otherwise a separate, KVM-managed root.
    fn shares_cpu_root(&self) -> bool;
    /// What a memslot deletion or move does to the IOMMU's table.
    fn removal(&self) -> Removal;
    /// Every pinned range is pre-populated into every new root the IOMMU is given.
    fn prepopulate_new_roots(&self) -> bool;
    /// Huge leaves may map P2P MMIO ranges.
    fn huge_mmio(&self) -> bool;
    /// IOTLB invalidations of one operation are merged into one range flush.
    fn batch_flushes(&self) -> bool;
    /// DMA may see KVM's private slot of this kind.
    fn dma_sees_private(&self, kind: PrivateKind) -> bool;
    /// Dirty logging splits the huge leaves of the IOMMU's table (KVM's eager split, for 4 KiB
    /// dirty granularity). Otherwise huge leaves stay and their dirty bits are harvested whole.
    fn split_for_dirty_logging(&self) -> bool;
}

/// The 2021 design: pin all user memory at memslot add, pre-populate every new root, notify
/// root updates, flush the IOTLB on root and content updates.
#[derive(Debug, Clone, Copy, Default)]
pub struct PinPrepopulate;

impl Mode for PinPrepopulate {
    fn kind(&self) -> ShareMode {
        ShareMode::PinPrepopulate
    }
    fn pins(&self) -> bool {
        true
    }
    fn shares_cpu_root(&self) -> bool {
        true
    }
    fn removal(&self) -> Removal {
        Removal::FastZapAllRoots
    }
    fn prepopulate_new_roots(&self) -> bool {
        true
    }
    fn huge_mmio(&self) -> bool {
        false
    }
    fn batch_flushes(&self) -> bool {
        false
    }
    fn dma_sees_private(&self, _kind: PrivateKind) -> bool {
        true
    }
    fn split_for_dirty_logging(&self) -> bool {
        true
    }
}

/// The 2023 RFC: no pinning, IO page faults resolved by the TDP fault path, an exported root
/// that is never invalidated (a fast zap zaps its leaves instead).
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportedIopf;

impl Mode for ExportedIopf {
    fn kind(&self) -> ShareMode {
        ShareMode::ExportedIopf
    }
    fn pins(&self) -> bool {
        false
    }
    fn shares_cpu_root(&self) -> bool {
        true
    }
    fn removal(&self) -> Removal {
        Removal::ZapAllLeaves
    }
    fn prepopulate_new_roots(&self) -> bool {
        false
    }
    fn huge_mmio(&self) -> bool {
        false
    }
    fn batch_flushes(&self) -> bool {
        false
    }
    fn dma_sees_private(&self, _kind: PrivateKind) -> bool {
        true
    }
    fn split_for_dirty_logging(&self) -> bool {
        true
    }
}

/// The reviewers' alternative: KVM maintains a second table for the IOMMU with its own policy
/// (APIC-access page invisible, no NX-hugepage splits, no zap-all on memslot delete) and
/// mirrors content updates into it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeparateTable;

impl Mode for SeparateTable {
    fn kind(&self) -> ShareMode {
        ShareMode::SeparateTable
    }
    fn pins(&self) -> bool {
        true
    }
    fn shares_cpu_root(&self) -> bool {
        false
    }
    fn removal(&self) -> Removal {
        Removal::ZapSlot
    }
    fn prepopulate_new_roots(&self) -> bool {
        false
    }
    fn huge_mmio(&self) -> bool {
        true
    }
    fn batch_flushes(&self) -> bool {
        false
    }
    fn dma_sees_private(&self, kind: PrivateKind) -> bool {
        kind != PrivateKind::ApicAccess
    }
    fn split_for_dirty_logging(&self) -> bool {
        false
    }
}

/// This project's: the seed's TODOs done — a persistent shared root (a memslot deletion zaps the
/// slot's range instead of allocating new roots, so the full pre-population happens once), huge
/// pages wherever both sides allow (P2P MMIO included, and kept through dirty logging, whose
/// dirty bits are harvested per leaf), and the IOTLB invalidations of one operation batched into
/// one range flush.
#[derive(Debug, Clone, Copy, Default)]
pub struct Optimized;

impl Mode for Optimized {
    fn kind(&self) -> ShareMode {
        ShareMode::Optimized
    }
    fn pins(&self) -> bool {
        true
    }
    fn shares_cpu_root(&self) -> bool {
        true
    }
    fn removal(&self) -> Removal {
        Removal::ZapSlot
    }
    fn prepopulate_new_roots(&self) -> bool {
        true
    }
    fn huge_mmio(&self) -> bool {
        true
    }
    fn batch_flushes(&self) -> bool {
        true
    }
    fn dma_sees_private(&self, _kind: PrivateKind) -> bool {
        true
    }
    fn split_for_dirty_logging(&self) -> bool {
        false
    }
}

/// The mode implementing `kind`.
pub fn mode(kind: ShareMode) -> &'static dyn Mode {
    match kind {
        ShareMode::PinPrepopulate => &PinPrepopulate,
        ShareMode::ExportedIopf => &ExportedIopf,
        ShareMode::SeparateTable => &SeparateTable,
        ShareMode::Optimized => &Optimized,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_mode() {
        for kind in ShareMode::ALL {
            assert_eq!(mode(kind).kind(), kind);
        }
    }
}
