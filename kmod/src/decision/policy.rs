//! The sharing designs this project compares, each one [`ShareMode`] whose decisions are data
//! (a [`Policy`]): the sharing engine implements the mechanics once and asks the policy wherever
//! the designs differ.

use core::fmt;
use core::str::FromStr;

/// The sharing designs, side by side. Their one spelling is [`ShareMode::name`]
/// (`pin_prepopulate`, …); [`FromStr`] also accepts it with `-` for `_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShareMode {
    /// The 2021 design: pin everything, pre-populate on every new root.
    PinPrepopulate,
    /// The 2023 RFC: exported root that never changes, IO page faults instead of pinning.
    ExportedIopf,
    /// The reviewers' alternative: a second, KVM-managed table for the IOMMU.
    SeparateTable,
    /// This project's: persistent shared root, huge pages kept, batched invalidations.
    Optimized,
}

impl ShareMode {
    /// Every mode, in the order reports show them.
    pub const ALL: [ShareMode; 4] = [
        ShareMode::PinPrepopulate,
        ShareMode::ExportedIopf,
        ShareMode::SeparateTable,
        ShareMode::Optimized,
    ];

    /// The mode's name in scenario files, traces, command lines and reports.
    pub const fn name(self) -> &'static str {
        match self {
            ShareMode::PinPrepopulate => "pin_prepopulate",
            ShareMode::ExportedIopf => "exported_iopf",
            ShareMode::SeparateTable => "separate_table",
            ShareMode::Optimized => "optimized",
        }
    }

    /// What the mode decides.
    pub const fn policy(self) -> Policy {
        match self {
            ShareMode::PinPrepopulate => PIN_PREPOPULATE,
            ShareMode::ExportedIopf => EXPORTED_IOPF,
            ShareMode::SeparateTable => SEPARATE_TABLE,
            ShareMode::Optimized => OPTIMIZED,
        }
    }
}

impl fmt::Display for ShareMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no [`ShareMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownMode;

impl fmt::Display for UnknownMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the sharing modes are ")?;
        for (i, mode) in ShareMode::ALL.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(mode.name())?;
        }
        Ok(())
    }
}

impl FromStr for ShareMode {
    type Err = UnknownMode;
    /// A mode's name; `-` is accepted for `_` (`pin-prepopulate`).
    fn from_str(s: &str) -> Result<ShareMode, UnknownMode> {
        ShareMode::ALL
            .into_iter()
            .find(|m| {
                let name = m.name().as_bytes();
                name.len() == s.len()
                    && name
                        .iter()
                        .zip(s.as_bytes())
                        .all(|(&n, &c)| n == c || (n == b'_' && c == b'-'))
            })
            .ok_or(UnknownMode)
    }
}

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

/// How the pages DMA and vCPUs wrote are found for migration while sharing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyTracking {
    /// Write-protect the slot; writes fault and are logged (needs IO page faults while sharing).
    WriteProtect,
    /// Report every pinned page of the slot dirty (always correct, migrates everything).
    ReportAllPinned,
    /// Walk and clear the dirty bits hardware sets (vCPUs and IOMMU alike).
    DirtyBits,
}

impl DirtyTracking {
    /// Every strategy.
    pub const ALL: [DirtyTracking; 3] = [
        DirtyTracking::WriteProtect,
        DirtyTracking::ReportAllPinned,
        DirtyTracking::DirtyBits,
    ];

    /// The strategy's name in scenario files.
    pub const fn name(self) -> &'static str {
        match self {
            DirtyTracking::WriteProtect => "write_protect",
            DirtyTracking::ReportAllPinned => "report_all_pinned",
            DirtyTracking::DirtyBits => "dirty_bits",
        }
    }
}

impl fmt::Display for DirtyTracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no [`DirtyTracking`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownDirtyTracking;

impl fmt::Display for UnknownDirtyTracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dirty tracking is write_protect, report_all_pinned or dirty_bits")
    }
}

impl FromStr for DirtyTracking {
    type Err = UnknownDirtyTracking;
    fn from_str(s: &str) -> Result<DirtyTracking, UnknownDirtyTracking> {
        DirtyTracking::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or(UnknownDirtyTracking)
    }
}

/// The decisions of one design.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The design.
    pub mode: ShareMode,
    /// DMA memory is pinned and present (the device takes no IO page faults).
    pub pins: bool,
    /// The IOMMU walks the vCPUs' own root; otherwise a separate, KVM-managed root.
    pub shares_cpu_root: bool,
    /// What a memslot deletion or move does to the IOMMU's table.
    pub removal: Removal,
    /// Every pinned range is pre-populated into every new root the IOMMU is given.
    pub prepopulate_new_roots: bool,
    /// Huge leaves may map P2P MMIO ranges.
    pub huge_mmio: bool,
    /// IOTLB invalidations of one operation are merged into one range flush.
    pub batch_flushes: bool,
    /// The APIC-access page is visible to DMA (KVM's other private pages always are).
    pub apic_access_visible: bool,
    /// Dirty logging splits the huge leaves of the IOMMU's table (KVM's eager split, for 4 KiB
    /// dirty granularity). Otherwise huge leaves stay and their dirty bits are harvested whole.
    pub split_for_dirty_logging: bool,
    /// The IOMMU holds its own reference on the vCPUs' root it walks, so the root outlives the
    /// vCPUs' loads of it. Without one (the 2021 design, notified only of new roots), a kernel
    /// that frees a root when the last vCPU unloads it (before 6.4) gives the IOMMU a new root
    /// — a root update — after every SMI/RSM and CR0.PG/WP toggle of the last vCPU.
    pub iommu_holds_root: bool,
}

/// Two decisions of a policy that cannot work together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyConflict {
    /// Zapping every leaf on a memslot deletion would take the pins of every other slot away
    /// from a device that cannot fault them back.
    PinsWithZapAllLeaves,
    /// New roots are pre-populated with pinned memory, but nothing is pinned.
    PrepopulateWithoutPins,
}

impl fmt::Display for PolicyConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyConflict::PinsWithZapAllLeaves => {
                "a memslot removal that zaps every leaf cannot go with pinning: the other slots' \
                 pinned leaves would go too, and their device takes no IO page faults"
            }
            PolicyConflict::PrepopulateWithoutPins => {
                "pre-populating new roots needs pinned memory to pre-populate"
            }
        })
    }
}

impl Policy {
    /// Checks that the policy's decisions can work together; a policy is checked when it is
    /// built (every constant here is), not discovered mid-run.
    pub const fn validate(&self) -> Result<(), PolicyConflict> {
        if self.pins && matches!(self.removal, Removal::ZapAllLeaves) {
            return Err(PolicyConflict::PinsWithZapAllLeaves);
        }
        if self.prepopulate_new_roots && !self.pins {
            return Err(PolicyConflict::PrepopulateWithoutPins);
        }
        Ok(())
    }

    /// How dirty pages are found by default: the dirty bits hardware sets when DMA memory is
    /// pinned (a write-protected page would fault the device), write-protection otherwise.
    pub const fn default_dirty_tracking(&self) -> DirtyTracking {
        if self.pins {
            DirtyTracking::DirtyBits
        } else {
            DirtyTracking::WriteProtect
        }
    }
}

// Every design's policy is a valid one.
const _: () = assert!(PIN_PREPOPULATE.validate().is_ok());
const _: () = assert!(EXPORTED_IOPF.validate().is_ok());
const _: () = assert!(SEPARATE_TABLE.validate().is_ok());
const _: () = assert!(OPTIMIZED.validate().is_ok());

/// The 2021 design: pin all user memory at memslot add, pre-populate every new root, notify
/// root updates, flush the IOTLB on root and content updates.
pub const PIN_PREPOPULATE: Policy = Policy {
    mode: ShareMode::PinPrepopulate,
    pins: true,
    shares_cpu_root: true,
    removal: Removal::FastZapAllRoots,
    prepopulate_new_roots: true,
    huge_mmio: false,
    batch_flushes: false,
    apic_access_visible: true,
    split_for_dirty_logging: true,
    iommu_holds_root: false,
};

/// The 2023 RFC: no pinning, IO page faults resolved by the TDP fault path, an exported root
/// that is never invalidated (a fast zap zaps its leaves instead).
pub const EXPORTED_IOPF: Policy = Policy {
    mode: ShareMode::ExportedIopf,
    pins: false,
    shares_cpu_root: true,
    removal: Removal::ZapAllLeaves,
    prepopulate_new_roots: false,
    huge_mmio: false,
    batch_flushes: false,
    apic_access_visible: true,
    split_for_dirty_logging: true,
    iommu_holds_root: true,
};

/// The reviewers' alternative: KVM maintains a second table for the IOMMU with its own policy
/// (APIC-access page invisible, no splits for the vCPUs' sake, no zap-all on memslot delete)
/// and mirrors content updates into it.
pub const SEPARATE_TABLE: Policy = Policy {
    mode: ShareMode::SeparateTable,
    pins: true,
    shares_cpu_root: false,
    removal: Removal::ZapSlot,
    prepopulate_new_roots: false,
    huge_mmio: true,
    batch_flushes: false,
    apic_access_visible: false,
    split_for_dirty_logging: false,
    iommu_holds_root: false,
};

/// This project's: the seed's TODOs done — a persistent shared root (a memslot deletion zaps the
/// slot's range instead of allocating new roots, so the full pre-population happens once), huge
/// pages wherever both sides allow (P2P MMIO included, and kept through dirty logging, whose
/// dirty bits are harvested per leaf), and the IOTLB invalidations of one operation batched into
/// one range flush.
pub const OPTIMIZED: Policy = Policy {
    mode: ShareMode::Optimized,
    pins: true,
    shares_cpu_root: true,
    removal: Removal::ZapSlot,
    prepopulate_new_roots: true,
    huge_mmio: true,
    batch_flushes: true,
    apic_access_visible: true,
    split_for_dirty_logging: false,
    iommu_holds_root: true,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_has_its_policy_and_one_name() {
        for mode in ShareMode::ALL {
            assert_eq!(mode.policy().mode, mode);
            assert_eq!(mode.name().parse(), Ok(mode));
        }
        assert_eq!("pin-prepopulate".parse(), Ok(ShareMode::PinPrepopulate));
        assert_eq!("pin_prepopulat".parse::<ShareMode>(), Err(UnknownMode));
        assert_eq!("pinXprepopulate".parse::<ShareMode>(), Err(UnknownMode));
        for d in DirtyTracking::ALL {
            assert_eq!(d.name().parse(), Ok(d));
        }
    }

    #[test]
    fn conflicting_policies_are_refused_when_built() {
        let zap_all_with_pins = Policy {
            pins: true,
            ..EXPORTED_IOPF
        };
        assert_eq!(
            zap_all_with_pins.validate(),
            Err(PolicyConflict::PinsWithZapAllLeaves)
        );
        let prepopulate_nothing = Policy {
            pins: false,
            removal: Removal::ZapSlot,
            ..OPTIMIZED
        };
        assert_eq!(
            prepopulate_nothing.validate(),
            Err(PolicyConflict::PrepopulateWithoutPins)
        );
        for mode in ShareMode::ALL {
            assert_eq!(mode.policy().validate(), Ok(()));
        }
    }
}
