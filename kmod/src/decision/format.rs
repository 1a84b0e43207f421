//! KVM's TDP entries (SPTEs), as data: EPT and NPT (the x86-64 long-mode format), 4 or 5
//! levels, in two layouts of KVM's software bits — Linux 6.12's own ([`Layout::Stock`]) and the
//! one sharing needs ([`Layout::Sharing`], what the kernel series and this crate use).
//!
//! Nothing else in the crate tests for a format: every encode/decode goes through the masks of a
//! [`PteFormat`], so a new format is a new constant, not new `if`s.
//!
//! Bit assignments (bit numbers), after `arch/x86/kvm/mmu/spte.h` and `spte.c` of 6.12:
//!
//! | meaning                      | EPT                        | NPT (x86-64)               |
//! |------------------------------|----------------------------|----------------------------|
//! | hardware present             | any of R/W/X               | 0 (P)                      |
//! | read / write                 | 0 / 1                      | 0 (P) / 1 (R/W)            |
//! | execute                      | 2                          | not 63 (NX)                |
//! | user                         | —                          | 2 (U/S)                    |
//! | memory type, ignore PAT      | 3..5, 6                    | —                          |
//! | huge (PS)                    | 7                          | 7                          |
//! | accessed / dirty             | 8 / 9                      | 5 / 6                      |
//! | host-writable / MMU-writable | 57 / 58                    | 9 / 10                     |
//! | A/D type (`SPTE_TDP_AD_*`)   | 52..53                     | 52..53                     |
//! | access-track saved R / X     | 54 / 56                    | —                          |
//! | always set when present      | 63 (suppress #VE)          | —                          |
//! | non-present value            | 63 (`SHADOW_NONPRESENT_VALUE`) | 63                     |
//! | frozen value                 | 63 + 0x5a0 (`FROZEN_SPTE`) | 63 + 0x5a0                 |
//! | KVM MMU-present: stock       | 11                         | 11                         |
//! | KVM MMU-present: sharing     | 59                         | 59                         |
//! | tdpshare pinned (sharing)    | 60                         | 60                         |
//! | MMIO generation: stock       | 3..10, 52..62              | 3..10, 52..62              |
//! | MMIO generation: sharing     | 3..10, 52..58              | 3..10, 52..58              |
//! | frame number                 | 12..51                     | 12..51                     |
//!
//! Why a sharing layout: an IOMMU walking KVM's table reads these entries with its own rules.
//! VT-d second-level entries give bit 11 the meaning SNP in leaves and reserve it elsewhere, so
//! KVM's MMU-present marker moves to bit 59 in TDP SPTEs (ignored by the CPU's EPT and NPT walks
//! and by VT-d; shadow paging keeps bit 11, since bits 62:52 are reserved in PAE paging), and the
//! MMIO generation loses bits 59..62 (15 bits instead of 19: a wrap, and the zap it forces, comes
//! 16× sooner) — as the 2023 RFC did, and as the kernel series' patch 3 does. KVM's MMIO SPTEs
//! keep their values, which an IOMMU could use (stock EPT ones are write+execute, writable to
//! VT-d; NPT ones are present with a reserved bit, readable to an IOMMU without it): so while an
//! IOMMU walks the table KVM installs none ([`Layout::mmio_while_walked`]), and emulated MMIO
//! takes the slow path, as with `enable_mmio_caching=0`. tdpshare's own pinned marker sits in
//! bit 60 (the model's: the kernel series keeps its pins per memslot instead).

use core::fmt;
use core::str::FromStr;

use super::addr::{Gfn, Gpa, Hpa, Level};

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
    /// Pinned for DMA: may only change present → present (see the TDP MMU).
    pub pinned: bool,
}

/// The memory type KVM uses for normal RAM.
pub const MEMTYPE_WB: u8 = 6;

/// Which assignment of KVM's software bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Linux 6.12 as shipped: MMU-present in bit 11.
    Stock,
    /// With the sharing series: MMU-present in bit 59, no MMIO SPTE while an IOMMU walks.
    Sharing,
}

impl Layout {
    /// Both layouts.
    pub const ALL: [Layout; 2] = [Layout::Stock, Layout::Sharing];

    /// The name scenario files use (`stock`, `sharing`).
    pub const fn name(self) -> &'static str {
        match self {
            Layout::Stock => "stock",
            Layout::Sharing => "sharing",
        }
    }

    /// KVM may install MMIO SPTEs in a table an IOMMU walks (the stock kernel knows no IOMMU;
    /// the series installs none while one walks, `kvm_handle_noslot_fault`).
    pub const fn mmio_while_walked(self) -> bool {
        matches!(self, Layout::Stock)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no [`Layout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownLayout;

impl fmt::Display for UnknownLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an SPTE layout is \"stock\" or \"sharing\"")
    }
}

impl FromStr for Layout {
    type Err = UnknownLayout;
    fn from_str(s: &str) -> Result<Layout, UnknownLayout> {
        Layout::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or(UnknownLayout)
    }
}

/// How KVM recognises an MMIO SPTE: `(spte & mask) == value` (`shadow_mmio_value/mask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSpte {
    /// The value the masked bits have.
    pub value: u64,
    /// The bits that tell an MMIO SPTE.
    pub mask: u64,
}

/// One SPTE format, as masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PteFormat {
    /// EPT or NPT.
    pub kind: Kind,
    /// Which assignment of KVM's software bits.
    pub layout: Layout,
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
    /// Bits KVM sets in every present entry besides the above (EPT: suppress #VE, bit 63).
    pub present_extra: u64,
    /// KVM's software "this entry is in use" marker (`SPTE_MMU_PRESENT_MASK`).
    pub mmu_present: u64,
    /// The host mapping is writable (`shadow_host_writable_mask`).
    pub host_writable: u64,
    /// KVM does not write-protect the entry for its own reasons (`shadow_mmu_writable_mask`).
    pub mmu_writable: u64,
    /// The A/D tracking type of the entry (`SPTE_TDP_AD_MASK`; 0 = A/D bits enabled).
    pub ad_type_mask: u64,
    /// Where an access-tracked entry saves its R and X bits; 0 when the format has none.
    pub acc_track_saved: u64,
    /// The value of a non-present entry (`SHADOW_NONPRESENT_VALUE`).
    pub nonpresent: u64,
    /// The bits of an MMIO SPTE that hold the memslot generation.
    pub mmio_gen_mask: u64,
    /// How MMIO SPTEs look; `None`: KVM caches no MMIO SPTEs (emulated MMIO takes the slow path).
    pub mmio: Option<MmioSpte>,
    /// tdpshare's software "pinned for DMA" marker (0 in the stock layout).
    pub pinned: u64,
    /// The host physical frame address field.
    pub addr_mask: u64,
    /// Bits set in every non-leaf entry besides the address, `present_extra` and `mmu_present`.
    pub table_bits: u64,
}

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Bits `lo..=hi` (`lo <= hi <= 63`).
const fn bits(lo: u32, hi: u32) -> u64 {
    u64::MAX.wrapping_shr(63u32.wrapping_sub(hi)) & u64::MAX.wrapping_shl(lo)
}

/// Bits 12..=51: the physical address of the next table or of the page.
const ADDR_MASK: u64 = bits(12, 51);

/// `FROZEN_SPTE` less the non-present value: a semi-arbitrary pattern no present entry has.
const FROZEN_PATTERN: u64 = 0x5a0;

impl PteFormat {
    /// EPT, 4 levels, sharing layout.
    pub const EPT4: PteFormat = PteFormat::ept(Level::L4, Layout::Sharing);
    /// EPT, 5 levels, sharing layout.
    pub const EPT5: PteFormat = PteFormat::ept(Level::L5, Layout::Sharing);
    /// NPT, 4 levels, sharing layout.
    pub const NPT4: PteFormat = PteFormat::npt(Level::L4, Layout::Sharing);
    /// NPT, 5 levels, sharing layout.
    pub const NPT5: PteFormat = PteFormat::npt(Level::L5, Layout::Sharing);
    /// Every format of the sharing layout.
    pub const ALL: [PteFormat; 4] = [Self::EPT4, Self::EPT5, Self::NPT4, Self::NPT5];

    const fn ept(levels: Level, layout: Layout) -> PteFormat {
        let (mmu_present, mmio_gen_mask, mmio, pinned) = match layout {
            Layout::Stock => (
                bit(11),
                bits(3, 10) | bits(52, 62),
                // VMX_EPT_MISCONFIG_WX_VALUE under VMX_EPT_RWX_MASK | suppress #VE.
                MmioSpte {
                    value: 0b110,
                    mask: 0b111 | bit(63),
                },
                0,
            ),
            Layout::Sharing => (
                bit(59),
                bits(3, 10) | bits(52, 58),
                MmioSpte {
                    value: 0b110,
                    mask: 0b111 | bit(63),
                },
                bit(60),
            ),
        };
        PteFormat {
            kind: Kind::Ept,
            layout,
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
            present_extra: bit(63),
            mmu_present,
            host_writable: bit(57),
            mmu_writable: bit(58),
            ad_type_mask: bits(52, 53),
            acc_track_saved: bit(54) | bit(56),
            nonpresent: bit(63),
            mmio_gen_mask,
            mmio: Some(mmio),
            pinned,
            addr_mask: ADDR_MASK,
            table_bits: bit(0) | bit(1) | bit(2),
        }
    }

    const fn npt(levels: Level, layout: Layout) -> PteFormat {
        let (mmu_present, mmio_gen_mask, mmio, pinned) = match layout {
            Layout::Stock => (
                bit(11),
                bits(3, 10) | bits(52, 62),
                // A reserved physical-address bit with P: a reserved-bit #NPF (hosts with fewer
                // than 52 physical address bits).
                Some(MmioSpte {
                    value: bit(51) | bit(0),
                    mask: bit(51) | bit(0),
                }),
                0,
            ),
            Layout::Sharing => (
                bit(59),
                bits(3, 10) | bits(52, 58),
                Some(MmioSpte {
                    value: bit(51) | bit(0),
                    mask: bit(51) | bit(0),
                }),
                bit(60),
            ),
        };
        PteFormat {
            kind: Kind::Npt,
            layout,
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
            present_extra: 0,
            mmu_present,
            host_writable: bit(9),
            mmu_writable: bit(10),
            ad_type_mask: bits(52, 53),
            acc_track_saved: 0,
            nonpresent: bit(63),
            mmio_gen_mask,
            mmio,
            pinned,
            addr_mask: ADDR_MASK,
            table_bits: bit(0) | bit(1) | bit(2),
        }
    }

    /// The format of `kind` with `levels` levels in the sharing layout, if there is one.
    pub const fn of(kind: Kind, levels: u8) -> Option<PteFormat> {
        Self::with_layout(kind, levels, Layout::Sharing)
    }

    /// The format of `kind` with `levels` levels in `layout`, if there is one.
    pub const fn with_layout(kind: Kind, levels: u8, layout: Layout) -> Option<PteFormat> {
        let levels = match levels {
            4 => Level::L4,
            5 => Level::L5,
            _ => return None,
        };
        Some(match kind {
            Kind::Ept => Self::ept(levels, layout),
            Kind::Npt => Self::npt(levels, layout),
        })
    }

    /// One past the highest guest frame this format can translate.
    pub const fn gfn_limit(&self) -> Gfn {
        Gfn(self.levels.table_frames())
    }

    /// `hpa` fits the address field (page-aligned, below 2^52).
    pub const fn can_address(&self, hpa: Hpa) -> bool {
        hpa.0 & !self.addr_mask == 0
    }

    /// `FROZEN_SPTE`: what a writer without exclusive access parks an entry at while it works
    /// on it; non-present to every walker, and no other writer may touch it meanwhile.
    pub const fn frozen(&self) -> u64 {
        self.nonpresent | FROZEN_PATTERN
    }

    /// The entry is frozen by another writer.
    pub const fn is_frozen(&self, e: u64) -> bool {
        e == self.frozen()
    }

    /// Encodes a non-leaf entry pointing at the table at `table`.
    pub const fn table(&self, table: Hpa) -> u64 {
        (table.0 & self.addr_mask) | self.table_bits | self.mmu_present | self.present_extra
    }

    /// Encodes a leaf at `level` mapping host physical `hpa` (`make_spte`): writable leaves
    /// are host- and MMU-writable.
    pub const fn leaf(&self, hpa: Hpa, level: Level, perms: Perms, attrs: LeafAttrs) -> u64 {
        // NPT's present bit is its read bit: a leaf without read is not present to hardware.
        let mut e = (hpa.0 & self.addr_mask) | self.mmu_present | self.present_extra | self.user;
        if perms.contains(Perms::R) {
            e |= self.read;
        }
        if perms.contains(Perms::W) {
            e |= self.write | self.mmu_writable | self.host_writable;
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
        if attrs.snoop && self.snp_free() {
            // VT-d's SNP bit, where the IOMMU's leaves have one (negotiation says where).
            e |= SNP;
        }
        if attrs.pinned {
            e |= self.pinned;
        }
        e
    }

    /// The MMIO SPTE KVM caches for emulated MMIO at `gpa` while the memslots are at
    /// `generation` (`make_mmio_spte`); `None` when this layout caches none.
    pub const fn mmio_spte(&self, gpa: Gpa, generation: u64) -> Option<u64> {
        let Some(mmio) = self.mmio else {
            return None;
        };
        Some(mmio.value | (gpa.0 & self.addr_mask) | self.spread_generation(generation))
    }

    /// `generation`'s low bits spread over the generation bits, lowest first.
    const fn spread_generation(&self, generation: u64) -> u64 {
        let mut out = 0;
        let mut g = generation;
        let mut rest = self.mmio_gen_mask;
        while rest != 0 {
            let lowest = rest & rest.wrapping_neg();
            if g & 1 != 0 {
                out |= lowest;
            }
            g >>= 1;
            rest &= !lowest;
        }
        out
    }

    /// The entry is an MMIO SPTE (`is_mmio_spte`).
    pub const fn is_mmio(&self, e: u64) -> bool {
        match self.mmio {
            Some(mmio) => e & mmio.mask == mmio.value && !self.is_present(e),
            None => false,
        }
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

    /// Replaces the rights of leaf `e`, keeping everything else: granting write makes it
    /// MMU- and host-writable, taking write away makes it not MMU-writable (KVM protecting it
    /// for its own reasons).
    pub const fn with_perms(&self, e: u64, perms: Perms) -> u64 {
        // NPT's read bit is the present bit: a leaf without read stays present to software but
        // not to hardware, exactly as KVM encodes it.
        let mut n = e & !(self.read | self.write | self.exec | self.nx | self.mmu_writable);
        if perms.contains(Perms::R) {
            n |= self.read;
        }
        if perms.contains(Perms::W) {
            n |= self.write | self.mmu_writable | self.host_writable;
        }
        if perms.contains(Perms::X) {
            n |= self.exec;
        } else {
            n |= self.nx;
        }
        n
    }

    /// Leaf `e` write-protected for dirty logging: W cleared, MMU-writable kept, so the write
    /// fault that follows may restore W without KVM's other reasons in the way.
    pub const fn write_protected(&self, e: u64) -> u64 {
        e & !self.write
    }

    /// KVM's writable invariants hold (`check_spte_writable_invariants`): MMU-writable only if
    /// host-writable, writable only if MMU-writable.
    pub const fn writable_invariants_hold(&self, e: u64) -> bool {
        if e & self.mmu_writable != 0 {
            e & self.host_writable != 0
        } else {
            e & self.write == 0
        }
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
            snoop: self.snp_free() && e & SNP != 0,
            pinned: e & self.pinned != 0,
        }
    }

    /// Bit 11 is free to carry an IOMMU's SNP bit in this layout's leaves.
    pub const fn snp_free(&self) -> bool {
        self.mmu_present != SNP
    }

    /// Bits KVM may set in a present leaf of this format.
    pub const fn leaf_bits(&self) -> u64 {
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
            | self.present_extra
            | self.mmu_present
            | self.host_writable
            | self.mmu_writable
            | self.pinned
            | self.addr_mask
            | if self.snp_free() { SNP } else { 0 }
    }

    /// Bits KVM may set in a non-leaf entry of this format.
    pub const fn table_entry_bits(&self) -> u64 {
        self.table_bits | self.accessed | self.mmu_present | self.present_extra | self.addr_mask
    }

    /// Bits an entry of this format may have; anything else is malformed.
    pub const fn known_bits(&self) -> u64 {
        self.leaf_bits() | self.table_entry_bits()
    }
}

/// VT-d's per-entry snoop bit (SNP), in second-level leaves.
pub const SNP: u64 = 1 << 11;

impl fmt::Display for PteFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.kind, self.levels)?;
        if self.layout == Layout::Stock {
            f.write_str(" (stock layout)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;
    use crate::decision::addr::Gpa;

    fn every_format() -> impl Iterator<Item = PteFormat> {
        Layout::ALL.into_iter().flat_map(|layout| {
            [
                (Kind::Ept, 4),
                (Kind::Ept, 5),
                (Kind::Npt, 4),
                (Kind::Npt, 5),
            ]
            .into_iter()
            .map(move |(k, l)| PteFormat::with_layout(k, l, layout).unwrap())
        })
    }

    #[test]
    fn software_bits_avoid_hardware_bits_and_each_other() {
        for f in every_format() {
            let hw = f.read | f.write | f.exec | f.nx | f.user | f.present | f.huge;
            let hw = hw | f.accessed | f.dirty | f.memtype_mask | f.ipat | f.addr_mask;
            let kvm = [
                ("MMU-present", f.mmu_present),
                ("host-writable", f.host_writable),
                ("MMU-writable", f.mmu_writable),
                ("A/D type", f.ad_type_mask),
                ("access-track saved", f.acc_track_saved),
                ("pinned", f.pinned),
            ];
            for (i, (name, mask)) in kvm.iter().enumerate() {
                assert_eq!(mask & hw, 0, "{f}: {name} overlaps hardware bits");
                for (other, m) in &kvm[i + 1..] {
                    assert_eq!(mask & m, 0, "{f}: {name} overlaps {other}");
                }
            }
            // MMIO SPTEs are not MMU-present, and their generation stays clear of the marker.
            assert_eq!(f.mmio_gen_mask & f.mmu_present, 0, "{f}");
            assert!(!f.is_present(f.nonpresent) && !f.is_present(f.frozen()));
            assert_eq!(
                f.frozen() & f.addr_mask,
                0,
                "{f}: FROZEN_SPTE has no PFN bits"
            );
        }
        // 6.12's own assignment, and where sharing moves it.
        let stock = PteFormat::with_layout(Kind::Ept, 4, Layout::Stock).unwrap();
        assert_eq!(stock.mmu_present, 1 << 11);
        assert_eq!(
            (stock.host_writable, stock.mmu_writable),
            (1 << 57, 1 << 58)
        );
        assert_eq!(PteFormat::EPT4.mmu_present, 1 << 59);
        assert_eq!(PteFormat::NPT4.host_writable, 1 << 9);
        assert_eq!(PteFormat::EPT4.pinned, 1 << 60);
        assert_eq!(PteFormat::EPT4.frozen(), (1 << 63) | 0x5a0);
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
                    assert!(!f.is_mmio(e));
                    assert!(f.writable_invariants_hold(e));
                    assert_eq!(f.addr(e), hpa);
                    assert_eq!(f.perms(e), perms, "{f} level {level}");
                    let got = f.attrs(e);
                    assert!(got.pinned);
                    assert!(got.snoop);
                    assert_eq!(e & !f.known_bits(), 0);
                    for q in 0..8 {
                        let q = Perms::from_bits(q);
                        let changed = f.with_perms(e, q);
                        assert_eq!(f.perms(changed), q);
                        assert_eq!(f.addr(changed), hpa);
                        assert!(f.writable_invariants_hold(changed));
                        assert!(f.is_present(changed), "perm change keeps the entry present");
                    }
                    let wp = f.write_protected(e);
                    assert!(!f.perms(wp).contains(Perms::W));
                    assert!(f.writable_invariants_hold(wp));
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
        let writable = (1 << 57) | (1 << 58);
        assert_eq!(
            ept,
            0x20_0000 | 0b11 | (6 << 3) | (1 << 7) | (1 << 59) | (1 << 63) | writable
        );
        let npt = PteFormat::NPT4.leaf(Hpa(0x1000), Level::L1, Perms::RW, LeafAttrs::default());
        assert_eq!(
            npt,
            0x1000 | 0b111 | (1 << 9) | (1 << 10) | (1 << 59) | (1 << 63)
        );
        assert_eq!(
            PteFormat::EPT5.table(Hpa(0xabc000)),
            0xabc000 | 0b111 | (1 << 59) | (1 << 63)
        );
        assert!(!PteFormat::NPT4.is_leaf(PteFormat::NPT4.table(Hpa(0x1000)), Level::L2));
        // The stock leaf the lab traced in L1 (NPT, 4 KiB, writable, A/D set) decodes.
        let stock = PteFormat::with_layout(Kind::Npt, 4, Layout::Stock).unwrap();
        let traced = 0x7fde_fe67;
        assert!(stock.is_present(traced) && stock.writable_invariants_hold(traced));
        assert_eq!(stock.perms(traced), Perms::RWX);
        assert!(
            !PteFormat::NPT4.is_present(traced),
            "bit 11 is no marker with the series"
        );
    }

    #[test]
    fn mmio_sptes() {
        let gpa = Gpa(0xfeb0_0000);
        let stock = PteFormat::with_layout(Kind::Ept, 4, Layout::Stock).unwrap();
        let s = stock.mmio_spte(gpa, 0x7_ffff).unwrap();
        assert!(stock.is_mmio(s) && !stock.is_present(s));
        assert_eq!(s & 0b111, 0b110, "write+execute: an EPT misconfiguration");
        assert_eq!(
            s & stock.mmio_gen_mask,
            stock.mmio_gen_mask,
            "19 generation bits"
        );
        let s = PteFormat::EPT4.mmio_spte(gpa, u64::MAX).unwrap();
        assert!(PteFormat::EPT4.is_mmio(s) && !PteFormat::EPT4.is_present(s));
        assert_eq!(s & 0b111, 0b110, "the series keeps the value");
        assert_eq!(
            PteFormat::EPT4.mmio_gen_mask.count_ones(),
            15,
            "bits 59..62 left out"
        );
        let s = PteFormat::NPT4.mmio_spte(gpa, 1).unwrap();
        assert!(PteFormat::NPT4.is_mmio(s) && !PteFormat::NPT4.is_present(s));
        assert!(!Layout::Sharing.mmio_while_walked() && Layout::Stock.mmio_while_walked());
        // A present leaf is never taken for MMIO.
        let leaf = PteFormat::EPT4.leaf(Hpa(0x1000), Level::L1, Perms::X, LeafAttrs::default());
        assert!(!PteFormat::EPT4.is_mmio(leaf));
    }

    #[test]
    fn geometry() {
        assert_eq!(PteFormat::EPT4.gfn_limit(), Gfn(1 << 36));
        assert_eq!(PteFormat::of(Kind::Npt, 5), Some(PteFormat::NPT5));
        assert_eq!(PteFormat::of(Kind::Npt, 3), None);
        assert_eq!("NPT".parse(), Ok(Kind::Npt));
        assert_eq!("arm".parse::<Kind>(), Err(UnknownKind));
        assert_eq!("stock".parse(), Ok(Layout::Stock));
    }
}
