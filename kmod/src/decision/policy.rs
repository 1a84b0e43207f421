//! The sharing designs, as one trait: each mode is a policy the sharing engine (`sharing`)
//! follows, so the mechanics (pinning, pre-population, zaps, notifications) exist once and the
//! modes differ only where the designs differ. The four designs are data ([`Policy`]).

use core::fmt;

use crate::event::ShareMode;
use crate::sharing::vm::PrivateKind;

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

/// A mode as data: the decisions of one design. Every design this project compares is one of
/// the constants below; the trait leaves room for a design that needs code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub kind: ShareMode,
    pub pins: bool,
    pub shares_cpu_root: bool,
    pub removal: Removal,
    pub prepopulate_new_roots: bool,
    pub huge_mmio: bool,
    pub batch_flushes: bool,
    /// The APIC-access page is visible to DMA (the other private pages always are).
    pub apic_access_visible: bool,
    pub split_for_dirty_logging: bool,
}

impl Mode for Policy {
    fn kind(&self) -> ShareMode {
        self.kind
    }
    fn pins(&self) -> bool {
        self.pins
    }
    fn shares_cpu_root(&self) -> bool {
        self.shares_cpu_root
    }
    fn removal(&self) -> Removal {
        self.removal
    }
    fn prepopulate_new_roots(&self) -> bool {
        self.prepopulate_new_roots
    }
    fn huge_mmio(&self) -> bool {
        self.huge_mmio
    }
    fn batch_flushes(&self) -> bool {
        self.batch_flushes
    }
    fn dma_sees_private(&self, kind: PrivateKind) -> bool {
        kind != PrivateKind::ApicAccess || self.apic_access_visible
    }
    fn split_for_dirty_logging(&self) -> bool {
        self.split_for_dirty_logging
    }
}

/// The 2021 design: pin all user memory at memslot add, pre-populate every new root, notify
/// root updates, flush the IOTLB on root and content updates.
pub const PIN_PREPOPULATE: Policy = Policy {
    kind: ShareMode::PinPrepopulate,
    pins: true,
    shares_cpu_root: true,
    removal: Removal::FastZapAllRoots,
    prepopulate_new_roots: true,
    huge_mmio: false,
    batch_flushes: false,
    apic_access_visible: true,
    split_for_dirty_logging: true,
};

/// The 2023 RFC: no pinning, IO page faults resolved by the TDP fault path, an exported root
/// that is never invalidated (a fast zap zaps its leaves instead).
pub const EXPORTED_IOPF: Policy = Policy {
    kind: ShareMode::ExportedIopf,
    pins: false,
    shares_cpu_root: true,
    removal: Removal::ZapAllLeaves,
    prepopulate_new_roots: false,
    huge_mmio: false,
    batch_flushes: false,
    apic_access_visible: true,
    split_for_dirty_logging: true,
};

/// The reviewers' alternative: KVM maintains a second table for the IOMMU with its own policy
/// (APIC-access page invisible, no splits for the vCPUs' sake, no zap-all on memslot delete)
/// and mirrors content updates into it.
pub const SEPARATE_TABLE: Policy = Policy {
    kind: ShareMode::SeparateTable,
    pins: true,
    shares_cpu_root: false,
    removal: Removal::ZapSlot,
    prepopulate_new_roots: false,
    huge_mmio: true,
    batch_flushes: false,
    apic_access_visible: false,
    split_for_dirty_logging: false,
};

/// This project's: the seed's TODOs done — a persistent shared root (a memslot deletion zaps the
/// slot's range instead of allocating new roots, so the full pre-population happens once), huge
/// pages wherever both sides allow (P2P MMIO included, and kept through dirty logging, whose
/// dirty bits are harvested per leaf), and the IOTLB invalidations of one operation batched into
/// one range flush.
pub const OPTIMIZED: Policy = Policy {
    kind: ShareMode::Optimized,
    pins: true,
    shares_cpu_root: true,
    removal: Removal::ZapSlot,
    prepopulate_new_roots: true,
    huge_mmio: true,
    batch_flushes: true,
    apic_access_visible: true,
    split_for_dirty_logging: false,
};

/// The mode implementing `kind`.
pub fn mode(kind: ShareMode) -> &'static dyn Mode {
    match kind {
        ShareMode::PinPrepopulate => &PIN_PREPOPULATE,
        ShareMode::ExportedIopf => &EXPORTED_IOPF,
        ShareMode::SeparateTable => &SEPARATE_TABLE,
        ShareMode::Optimized => &OPTIMIZED,
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
