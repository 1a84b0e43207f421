//! How an IOMMU reads the entries of a table it walks — its rules, not KVM's: the bits that make
//! an entry present and grant rights, the bits it reserves at each level (an entry with one set
//! is a fault), the A/D bits it sets and the per-entry snoop bit it honours. VT-d second-level
//! translation (legacy and scalable mode) and the AMD IOMMU's v2 tables (the x86-64 format).
//!
//! The VT-d masks are those of the VT-d specification as QEMU 7.2 implements them
//! (`hw/i386/intel_iommu_internal.h`, `VTD_SPTE_*_RSVD_MASK`): bits 52–61 and 63 are ignored,
//! bits 2–10 are never looked at, the host-address bits above the address width and bit 62 are
//! reserved, bit 11 is reserved except as SNP in leaves (legacy mode with snoop control, or
//! scalable mode — Linux 6.12 sets SNP in second-level leaves in both, `domain_set_force_snooping`),
//! bit 7 is reserved at levels 4 and 5, and a huge leaf's address bits below its size are
//! reserved. QEMU checks an entry's rights before its reserved bits.

use core::fmt;

use super::addr::{Hpa, Level};
use super::format::Perms;

/// Which IOMMU, in which mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IommuMode {
    /// VT-d with legacy (root/context) tables, second-level translation.
    VtdLegacy,
    /// VT-d in scalable mode (PASID tables), second-level (second-stage) translation.
    VtdScalable,
    /// The AMD IOMMU walking x86-64-format (v2, guest) page tables.
    AmdV2,
}

impl IommuMode {
    /// Every mode.
    pub const ALL: [IommuMode; 3] = [
        IommuMode::VtdLegacy,
        IommuMode::VtdScalable,
        IommuMode::AmdV2,
    ];

    /// A VT-d unit.
    pub const fn is_vtd(self) -> bool {
        matches!(self, IommuMode::VtdLegacy | IommuMode::VtdScalable)
    }
}

impl fmt::Display for IommuMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IommuMode::VtdLegacy => "VT-d (legacy mode)",
            IommuMode::VtdScalable => "VT-d (scalable mode)",
            IommuMode::AmdV2 => "AMD IOMMU v2",
        })
    }
}

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Bits `lo..=hi` (empty when `lo > hi`).
const fn bits(lo: u32, hi: u32) -> u64 {
    if lo > hi || hi > 63 {
        0
    } else {
        u64::MAX.wrapping_shr(63u32.wrapping_sub(hi)) & u64::MAX.wrapping_shl(lo)
    }
}

/// The rules one IOMMU reads a table by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IommuFormat {
    /// Which IOMMU.
    pub mode: IommuMode,
    /// Host address width in bits: address bits at and above it are reserved.
    pub address_width: u8,
    /// An entry with none of these set is not present.
    pub present: u64,
    /// Grants reads.
    pub read: u64,
    /// Grants writes.
    pub write: u64,
    /// Must be set for a device's (user-mode) request; 0 when there is no such bit.
    pub user: u64,
    /// A leaf above level 1.
    pub huge: u64,
    /// What it sets on use and on write when its A/D tracking is on; 0 when it has none.
    pub accessed: u64,
    /// See `accessed`.
    pub dirty: u64,
    /// The per-entry snoop bit of leaves; 0 when it has none.
    pub snp: u64,
    /// Bit 11 may be SNP in leaves (VT-d legacy mode with snoop control, or scalable mode).
    pub snp_in_leaves: bool,
}

/// Where an entry's address field ends (exclusive), in the formats here.
const ADDR_TOP: u32 = 52;

impl IommuFormat {
    /// VT-d second-level rules with `address_width` host address bits; `snoop_control` is
    /// ECAP.SC, `ad` whether second-level A/D bits are on (scalable mode only).
    pub const fn vtd(address_width: u8, mode: IommuMode, snoop_control: bool, ad: bool) -> Self {
        let scalable = matches!(mode, IommuMode::VtdScalable);
        IommuFormat {
            mode,
            address_width,
            present: bit(0) | bit(1),
            read: bit(0),
            write: bit(1),
            user: 0,
            huge: bit(7),
            accessed: if ad && scalable { bit(8) } else { 0 },
            dirty: if ad && scalable { bit(9) } else { 0 },
            snp: bit(11),
            snp_in_leaves: scalable || snoop_control,
        }
    }

    /// AMD IOMMU v2 (x86-64-format) rules with `address_width` host address bits; `ad` whether
    /// it sets A/D bits (HA/HD).
    pub const fn amd_v2(address_width: u8, ad: bool) -> Self {
        IommuFormat {
            mode: IommuMode::AmdV2,
            address_width,
            present: bit(0),
            read: bit(0),
            write: bit(1),
            user: bit(2),
            huge: bit(7),
            accessed: if ad { bit(5) } else { 0 },
            dirty: if ad { bit(6) } else { 0 },
            snp: 0,
            snp_in_leaves: false,
        }
    }

    /// The bits whose being set in an entry at `level` (a `leaf` there or not) is a
    /// reserved-bit fault.
    pub const fn reserved(&self, level: Level, leaf: bool) -> u64 {
        let aw = self.address_width as u32;
        let mut r = bits(aw, ADDR_TOP - 1);
        if level.get() >= 4 {
            // No leaves at levels 4 and 5: PS is reserved there.
            r |= self.huge;
        }
        if leaf {
            // A huge leaf's address bits below its size.
            let low = match self.mode {
                // x86-64: bit 12 of a huge leaf is PAT.
                IommuMode::AmdV2 => 13,
                _ => 12,
            };
            r |= bits(low, level.shift().saturating_sub(1));
        }
        if self.mode.is_vtd() {
            r |= bit(62);
            if !(leaf && self.snp_in_leaves) {
                r |= bit(11);
            }
        }
        r
    }

    /// The entry is present to the IOMMU.
    pub const fn is_present(&self, e: u64) -> bool {
        e & self.present != 0
    }

    /// A present entry at `level` ends the walk.
    pub const fn is_leaf(&self, e: u64, level: Level) -> bool {
        level.get() == 1 || (level.get() <= 3 && e & self.huge != 0)
    }

    /// The rights an entry grants.
    pub const fn perms(&self, e: u64) -> Perms {
        let mut p = Perms::NONE;
        if e & self.read != 0 {
            p = p.union(Perms::R);
        }
        if e & self.write != 0 {
            p = p.union(Perms::W);
        }
        p
    }

    /// The address an entry points at.
    pub const fn addr(&self, e: u64) -> Hpa {
        Hpa(e & bits(12, ADDR_TOP - 1))
    }

    /// It sets A/D bits.
    pub const fn sets_ad(&self) -> bool {
        self.accessed != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtd_masks_are_qemus() {
        // VTD_SPTE_PAGE_L1_RSVD_MASK(48) = 0x800 | ~(HAW | IGN_COM): bits 11, 48..51, 62.
        let legacy = IommuFormat::vtd(48, IommuMode::VtdLegacy, false, false);
        let l1 = bit(11) | bits(48, 51) | bit(62);
        assert_eq!(legacy.reserved(Level::L1, true), l1);
        assert_eq!(legacy.reserved(Level::L2, false), l1);
        assert_eq!(legacy.reserved(Level::L4, false), l1 | bit(7));
        // VTD_SPTE_LPAGE_L2/L3_RSVD_MASK: 0x1ff800 / 0x3ffff800 with the same high bits.
        assert_eq!(
            legacy.reserved(Level::L2, true),
            bits(11, 20) | bits(48, 51) | bit(62)
        );
        assert_eq!(
            legacy.reserved(Level::L3, true),
            bits(11, 29) | bits(48, 51) | bit(62)
        );
        // Snoop control, or scalable mode, frees bit 11 in leaves only.
        for f in [
            IommuFormat::vtd(48, IommuMode::VtdLegacy, true, false),
            IommuFormat::vtd(48, IommuMode::VtdScalable, false, false),
        ] {
            assert_eq!(f.reserved(Level::L1, true) & bit(11), 0);
            assert_eq!(f.reserved(Level::L2, true) & bit(11), 0);
            assert_ne!(f.reserved(Level::L2, false) & bit(11), 0);
        }
        // A/D exist in scalable mode only.
        assert!(!IommuFormat::vtd(48, IommuMode::VtdLegacy, true, true).sets_ad());
        assert!(IommuFormat::vtd(48, IommuMode::VtdScalable, true, true).sets_ad());
        // 3-level (39-bit) units reserve more.
        assert_eq!(
            IommuFormat::vtd(39, IommuMode::VtdLegacy, true, false).reserved(Level::L1, true),
            bits(39, 51) | bit(62)
        );
    }

    #[test]
    fn amd_v2_follows_x86_64() {
        let f = IommuFormat::amd_v2(52, true);
        assert_eq!(f.reserved(Level::L1, true), 0);
        assert_eq!(f.reserved(Level::L2, true), bits(13, 20));
        assert_eq!(f.reserved(Level::L4, false), bit(7));
        assert_eq!((f.accessed, f.dirty), (bit(5), bit(6)));
        assert!(f.is_leaf(bit(7) | 1, Level::L3) && !f.is_leaf(bit(7) | 1, Level::L4));
        assert_eq!(f.perms(0b11), Perms::RW);
    }
}
