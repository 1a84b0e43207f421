//! Page-table entry formats, as data: EPT (4/5-level, also what VT-d second-level walks) and
//! NPT (the x86-64 long-mode format, 4/5-level, also what AMD IOMMU v2 walks).
//!
//! Nothing else in the crate tests for a format: every encode/decode goes through the masks of a
//! [`PteFormat`], so a new format is a new constant, not new `if`s.
//!
//! Bit assignments (bit numbers):
//!
//! | meaning          | EPT / VT-d SL            | NPT / x86-64 / AMD v2     |
//! |------------------|--------------------------|---------------------------|
//! | hardware present | none: any of R/W/X       | 0 (P)                     |
//! | read             | 0                        | 0 (P implies read)        |
//! | write            | 1                        | 1 (R/W)                   |
//! | execute          | 2                        | not 63 (NX)               |
//! | user             | —                        | 2 (U/S)                   |
//! | memory type      | 3..5, IPAT 6             | —                         |
//! | huge (PS)        | 7                        | 7                         |
//! | accessed / dirty | 8 / 9                    | 5 / 6                     |
//! | VT-d SNP         | 11                       | —                         |
//! | KVM MMU-present  | 59 (software)            | 11 (software)             |
//! | tdpshare pinned  | 58 (software)            | 58 (software)             |
//! | frame number     | 12..51                   | 12..51                    |
//!
//! VT-d second-level has no designated present bit and gives bit 11 the meaning SNP, so KVM's
//! own "MMU present" marker cannot stay in bit 11 for EPT: as in the 2023 RFC it moves to bit 59
//! (ignored by both the CPU's EPT walk and VT-d). For NPT bit 11 is available to software in both
//! the CPU's and the AMD IOMMU v2's walk, so KVM's choice stays.

use core::fmt;
use core::str::FromStr;

use super::addr::{Gfn, Hpa, Level};

/// The family of a page-table format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Intel EPT; VT-d second-level tables use the same layout.
    Ept,
    /// AMD NPT: the x86-64 long-mode layout; AMD IOMMU v2 (guest tables) uses the same.
    Npt,
}

impl Kind {
    /// Both kinds.
    pub const ALL: [Kind; 2] = [Kind::Ept, Kind::Npt];

    /// The lower-case name scenario files and command lines use (`ept`, `npt`).
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Ept => "ept",
            Kind::Npt => "npt",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Ept => "EPT",
            Kind::Npt => "NPT",
        })
    }
}

/// A name that is not a [`Kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownKind;

impl fmt::Display for UnknownKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a page-table format kind is \"ept\" or \"npt\"")
    }
}

impl FromStr for Kind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Kind, UnknownKind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or(UnknownKind)
    }
}

/// Access rights of a leaf, independent of the encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perms(u8);

impl Perms {
    /// No access.
    pub const NONE: Perms = Perms(0);
    /// Read.
    pub const R: Perms = Perms(1);
    /// Write.
    pub const W: Perms = Perms(2);
    /// Execute.
    pub const X: Perms = Perms(4);
    /// Read and write.
    pub const RW: Perms = Perms(3);
    /// Read and execute.
    pub const RX: Perms = Perms(5);
    /// Everything.
    pub const RWX: Perms = Perms(7);

    /// Grants everything `other` grants.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }
    /// Both sets of rights.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }
    /// These rights less `other`.
    pub const fn without(self, other: Perms) -> Perms {
        Perms(self.0 & !other.0)
    }
    /// The bits (R = 1, W = 2, X = 4).
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// Rights from bits (R = 1, W = 2, X = 4; others ignored).
    pub const fn from_bits(bits: u8) -> Perms {
        Perms(bits & 7)
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |p: Perms, l| if self.contains(p) { l } else { '-' };
        write!(
            f,
            "{}{}{}",
            c(Perms::R, 'r'),
            c(Perms::W, 'w'),
            c(Perms::X, 'x')
        )
    }
}

/// Attributes of a leaf besides its rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeafAttrs {
    /// EPT memory type (0 UC, 6 WB); ignored by formats without one.
    pub memtype: u8,
    /// EPT "ignore PAT".
    pub ipat: bool,
    /// VT-d SNP: force snooping of DMA through this entry.
    pub snoop: bool,
    /// Pinned for DMA: may only change non-zero → non-zero (see the TDP MMU).
    pub pinned: bool,
}

/// The memory type KVM uses for normal RAM.
pub const MEMTYPE_WB: u8 = 6;

/// One page-table entry format, as masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PteFormat {
    /// EPT or NPT.
    pub kind: Kind,
    /// Paging levels: the root's level (4 or 5).
    pub levels: Level,
    /// Largest level a leaf may sit at (3 = 1 GiB).
    pub max_huge_level: Level,
    /// The bit a hardware walker needs to treat an entry as present; 0 when the format has none
    /// (EPT: present means any of R/W/X).
    pub present: u64,
    /// Read permission.
    pub read: u64,
    /// Write permission.
    pub write: u64,
    /// Set to allow execution (EPT); 0 when execution is allowed by the absence of `nx`.
    pub exec: u64,
    /// Set to forbid execution (x86-64 NX); 0 when the format has `exec`.
    pub nx: u64,
    /// User-mode access (x86-64 U/S); 0 when the format has none.
    pub user: u64,
    /// A leaf above level 1 (PS).
    pub huge: u64,
    /// Set by hardware on use.
    pub accessed: u64,
    /// Set by hardware on write.
    pub dirty: u64,
    /// Position of the memory-type field.
    pub memtype_shift: u32,
    /// The memory-type field; 0 when the format has none.
    pub memtype_mask: u64,
    /// Ignore PAT (EPT); 0 when the format has none.
    pub ipat: u64,
    /// VT-d SNP; 0 when the format has none.
    pub snp: u64,
    /// KVM's software "this entry is in use" marker (`SPTE_MMU_PRESENT_MASK`).
    pub mmu_present: u64,
    /// tdpshare's software "pinned for DMA" marker.
    pub pinned: u64,
    /// The host physical frame address field.
    pub addr_mask: u64,
    /// Bits set in every non-leaf entry besides the address and `mmu_present`.
    pub table_bits: u64,
}

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Bits 12..=51: the physical address of the next table or of the page.
const ADDR_MASK: u64 = ((1 << 52) - 1) & !0xfff;

impl PteFormat {
    /// EPT, 4 levels.
    pub const EPT4: PteFormat = PteFormat::ept(Level::L4);
    /// EPT, 5 levels.
    pub const EPT5: PteFormat = PteFormat::ept(Level::L5);
    /// NPT, 4 levels.
    pub const NPT4: PteFormat = PteFormat::npt(Level::L4);
    /// NPT, 5 levels.
    pub const NPT5: PteFormat = PteFormat::npt(Level::L5);
    /// Every format.
    pub const ALL: [PteFormat; 4] = [Self::EPT4, Self::EPT5, Self::NPT4, Self::NPT5];

    const fn ept(levels: Level) -> PteFormat {
        PteFormat {
            kind: Kind::Ept,
            levels,
            max_huge_level: Level::L3,
            present: 0,
            read: bit(0),
            write: bit(1),
            exec: bit(2),
            nx: 0,
            user: 0,
            huge: bit(7),
            accessed: bit(8),
            dirty: bit(9),
            memtype_shift: 3,
            memtype_mask: 0b111 << 3,
            ipat: bit(6),
            snp: bit(11),
            mmu_present: bit(59),
            pinned: bit(58),
            addr_mask: ADDR_MASK,
            table_bits: bit(0) | bit(1) | bit(2),
        }
    }

    const fn npt(levels: Level) -> PteFormat {
        PteFormat {
            kind: Kind::Npt,
            levels,
            max_huge_level: Level::L3,
            present: bit(0),
            read: bit(0),
            write: bit(1),
            exec: 0,
            nx: bit(63),
            user: bit(2),
            huge: bit(7),
            accessed: bit(5),
            dirty: bit(6),
            memtype_shift: 0,
            memtype_mask: 0,
            ipat: 0,
            snp: 0,
            mmu_present: bit(11),
            pinned: bit(58),
            addr_mask: ADDR_MASK,
            table_bits: bit(0) | bit(1) | bit(2),
        }
    }

    /// The format of `kind` with `levels` levels, if there is one.
    pub const fn of(kind: Kind, levels: u8) -> Option<PteFormat> {
        match (kind, levels) {
            (Kind::Ept, 4) => Some(Self::EPT4),
            (Kind::Ept, 5) => Some(Self::EPT5),
            (Kind::Npt, 4) => Some(Self::NPT4),
            (Kind::Npt, 5) => Some(Self::NPT5),
            _ => None,
        }
    }

    /// One past the highest guest frame this format can translate.
    pub const fn gfn_limit(&self) -> Gfn {
        Gfn(self.levels.table_frames())
    }

    /// `hpa` fits the address field (page-aligned, below 2^52).
    pub const fn can_address(&self, hpa: Hpa) -> bool {
        hpa.0 & !self.addr_mask == 0
    }

    /// Encodes a non-leaf entry pointing at the table at `table`.
    pub const fn table(&self, table: Hpa) -> u64 {
        (table.0 & self.addr_mask) | self.table_bits | self.mmu_present
    }

    /// Encodes a leaf at `level` mapping host physical `hpa`.
    pub const fn leaf(&self, hpa: Hpa, level: Level, perms: Perms, attrs: LeafAttrs) -> u64 {
        // NPT's present bit is its read bit: a leaf without read is not present to hardware.
        let mut e = (hpa.0 & self.addr_mask) | self.mmu_present | self.user;
        if perms.contains(Perms::R) {
            e |= self.read;
        }
        if perms.contains(Perms::W) {
            e |= self.write;
        }
        if perms.contains(Perms::X) {
            e |= self.exec;
        } else {
            e |= self.nx;
        }
        if level.get() > 1 {
            e |= self.huge;
        }
        e |= ((attrs.memtype as u64) << self.memtype_shift) & self.memtype_mask;
        if attrs.ipat {
            e |= self.ipat;
        }
        if attrs.snoop {
            e |= self.snp;
        }
        if attrs.pinned {
            e |= self.pinned;
        }
        e
    }

    /// KVM considers the entry in use.
    pub const fn is_present(&self, e: u64) -> bool {
        e & self.mmu_present != 0
    }

    /// A present entry at `level` is a leaf (level 1, or a huge page).
    pub const fn is_leaf(&self, e: u64, level: Level) -> bool {
        level.get() == 1 || e & self.huge != 0
    }

    /// The host address an entry points at (a table or a page).
    pub const fn addr(&self, e: u64) -> Hpa {
        Hpa(e & self.addr_mask)
    }

    /// The entry carries the pinned marker.
    pub const fn is_pinned(&self, e: u64) -> bool {
        e & self.pinned != 0
    }

    /// The accessed and dirty bits together.
    pub const fn ad_bits(&self) -> u64 {
        self.accessed | self.dirty
    }

    /// The rights a leaf grants.
    pub const fn perms(&self, e: u64) -> Perms {
        let mut p = 0;
        if e & self.read != 0 {
            p |= 1;
        }
        if e & self.write != 0 {
            p |= 2;
        }
        if (self.exec != 0 && e & self.exec != 0) || (self.nx != 0 && e & self.nx == 0) {
            p |= 4;
        }
        Perms(p)
    }

    /// Replaces the rights of leaf `e`, keeping everything else.
    pub const fn with_perms(&self, e: u64, perms: Perms) -> u64 {
        // NPT's read bit is the present bit: a leaf without read stays present to software but
        // not to hardware, exactly as KVM encodes it.
        let mut n = e & !(self.read | self.write | self.exec | self.nx);
        if perms.contains(Perms::R) {
            n |= self.read;
        }
        if perms.contains(Perms::W) {
            n |= self.write;
        }
        if perms.contains(Perms::X) {
            n |= self.exec;
        } else {
            n |= self.nx;
        }
        n
    }

    /// The leaf attributes of `e`.
    pub const fn attrs(&self, e: u64) -> LeafAttrs {
        LeafAttrs {
            memtype: if self.memtype_mask == 0 {
                0
            } else {
                ((e & self.memtype_mask) >> self.memtype_shift) as u8
            },
            ipat: e & self.ipat != 0,
            snoop: e & self.snp != 0,
            pinned: e & self.pinned != 0,
        }
    }

    /// Bits an entry of this format may have; anything else is malformed.
    pub const fn known_bits(&self) -> u64 {
        self.read
            | self.write
            | self.exec
            | self.nx
            | self.user
            | self.present
            | self.huge
            | self.accessed
            | self.dirty
            | self.memtype_mask
            | self.ipat
            | self.snp
            | self.mmu_present
            | self.pinned
            | self.addr_mask
            | self.table_bits
    }
}

impl fmt::Display for PteFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.kind, self.levels)
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn software_markers_avoid_hardware_bits() {
        for f in PteFormat::ALL {
            let hw = f.read | f.write | f.exec | f.nx | f.user | f.present | f.huge;
            let hw = hw | f.accessed | f.dirty | f.memtype_mask | f.ipat | f.snp | f.addr_mask;
            assert_eq!(
                f.mmu_present & hw,
                0,
                "{f}: MMU-present overlaps hardware bits"
            );
            assert_eq!(f.pinned & hw, 0, "{f}: pinned overlaps hardware bits");
            assert_eq!(f.pinned & f.mmu_present, 0, "{f}");
        }
        // VT-d SL gives bit 11 the meaning SNP: KVM's marker must not be there for EPT.
        assert_eq!(PteFormat::EPT4.snp, 1 << 11);
        assert_eq!(PteFormat::EPT4.mmu_present, 1 << 59);
    }

    #[test]
    fn leaf_encodings_round_trip() {
        let attrs = LeafAttrs {
            memtype: MEMTYPE_WB,
            ipat: true,
            snoop: true,
            pinned: true,
        };
        for f in PteFormat::ALL {
            for level in [Level::L1, Level::L2, Level::L3] {
                for p in 0..8 {
                    let perms = Perms::from_bits(p);
                    let hpa = Hpa(0x1234_5000_0000).align_down(level.size());
                    let e = f.leaf(hpa, level, perms, attrs);
                    assert!(f.is_present(e));
                    assert!(f.is_leaf(e, level));
                    assert_eq!(f.addr(e), hpa);
                    assert_eq!(f.perms(e), perms, "{f} level {level}");
                    let got = f.attrs(e);
                    assert!(got.pinned);
                    assert_eq!(got.snoop, f.snp != 0);
                    assert_eq!(e & !f.known_bits(), 0);
                    for q in 0..8 {
                        let q = Perms::from_bits(q);
                        let changed = f.with_perms(e, q);
                        assert_eq!(f.perms(changed), q);
                        assert_eq!(f.addr(changed), hpa);
                        assert!(
                            f.is_present(changed),
                            "perm change keeps the entry non-zero"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn concrete_encodings() {
        let ept = PteFormat::EPT4.leaf(
            Hpa(0x20_0000),
            Level::L2,
            Perms::RW,
            LeafAttrs {
                memtype: MEMTYPE_WB,
                ..LeafAttrs::default()
            },
        );
        assert_eq!(ept, 0x20_0000 | 0b11 | (6 << 3) | (1 << 7) | (1 << 59));
        let npt = PteFormat::NPT4.leaf(Hpa(0x1000), Level::L1, Perms::RW, LeafAttrs::default());
        assert_eq!(npt, 0x1000 | 0b111 | (1 << 11) | (1 << 63));
        assert_eq!(
            PteFormat::EPT5.table(Hpa(0xabc000)),
            0xabc000 | 0b111 | (1 << 59)
        );
        assert!(!PteFormat::NPT4.is_leaf(PteFormat::NPT4.table(Hpa(0x1000)), Level::L2));
    }

    #[test]
    fn geometry() {
        assert_eq!(PteFormat::EPT4.gfn_limit(), Gfn(1 << 36));
        assert_eq!(PteFormat::of(Kind::Npt, 5), Some(PteFormat::NPT5));
        assert_eq!(PteFormat::of(Kind::Npt, 3), None);
        assert_eq!("NPT".parse(), Ok(Kind::Npt));
        assert_eq!("arm".parse::<Kind>(), Err(UnknownKind));
    }
}
