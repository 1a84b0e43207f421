//! Capability negotiation: can the IOMMU walk the table KVM builds, and with which settings?
//!
//! KVM brings its entry format (kind, levels, layout of its software bits) and its largest huge
//! page; the IOMMU brings its mode, the formats it is specified to walk, its address width,
//! superpages, snoop control, coherent walks, A/D tracking and page requests. The answer is one
//! [`Shared`] setting both sides use, or a [`Refusal`] naming every mismatch. Whether KVM's
//! entries read right under the IOMMU's rules is decided bit by bit from the two formats' masks
//! ([`PteFormat`], [`IommuFormat`]), not from a list of known pairs.

use core::fmt;

use super::addr::Level;
use super::format::{Kind, Layout, PteFormat, SNP};
use super::iommu::{IommuFormat, IommuMode};
use super::list::ReasonList;

/// What KVM's TDP MMU uses for this VM (as KVM reports it: values are checked, not trusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmCaps {
    /// EPT or NPT.
    pub kind: Kind,
    /// The root's level (4 or 5).
    pub levels: u8,
    /// Largest level KVM maps leaves at (1 = 4 KiB only, 2 = 2 MiB, 3 = 1 GiB).
    pub max_huge_level: u8,
    /// The assignment of KVM's software bits (stock 6.12, or with the sharing series).
    pub layout: Layout,
}

/// A set of level counts (bit `n` = `n` levels).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct LevelSet(u8);

impl LevelSet {
    /// The set holding each of `levels` (counts of 8 and more are ignored).
    pub fn of(levels: &[u8]) -> LevelSet {
        LevelSet(
            levels
                .iter()
                .filter(|&&l| l < 8)
                .fold(0, |acc, &l| acc | 1u8.wrapping_shl(u32::from(l))),
        )
    }

    /// The set whose bit `n` means `n` levels (the kernel's UAPI encoding).
    pub const fn from_bits(bits: u8) -> LevelSet {
        LevelSet(bits)
    }

    /// The set as bits: bit `n` for `n` levels.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// `levels` is in the set.
    pub const fn contains(self, levels: u8) -> bool {
        levels < 8 && self.0 & (1u8 << (levels & 7)) != 0
    }

    /// The set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The largest count in the set.
    pub const fn max(self) -> Option<u8> {
        if self.0 == 0 {
            None
        } else {
            Some(7u8.wrapping_sub(self.0.leading_zeros() as u8))
        }
    }

    fn iter(self) -> impl Iterator<Item = u8> {
        (0..8u8).filter(move |&l| self.contains(l))
    }
}

impl fmt::Debug for LevelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl fmt::Display for LevelSet {
    /// `4/5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

/// The (format, levels) pairs an IOMMU's page walker is specified to walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Walks {
    /// Level counts of EPT-format (VT-d second-level) tables.
    pub ept: LevelSet,
    /// Level counts of x86-64-format (NPT, AMD v2) tables.
    pub npt: LevelSet,
}

impl Walks {
    /// The level counts of `kind` the walker understands.
    pub const fn levels(&self, kind: Kind) -> LevelSet {
        match kind {
            Kind::Ept => self.ept,
            Kind::Npt => self.npt,
        }
    }

    /// The kinds with at least one level count.
    pub fn kinds(&self) -> KindSet {
        KindSet {
            ept: !self.ept.is_empty(),
            npt: !self.npt.is_empty(),
        }
    }
}

/// A set of format kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KindSet {
    /// EPT is in the set.
    pub ept: bool,
    /// NPT is in the set.
    pub npt: bool,
}

impl KindSet {
    /// The set is empty.
    pub const fn is_empty(self) -> bool {
        !self.ept && !self.npt
    }

    /// The first kind in the set.
    pub const fn first(self) -> Option<Kind> {
        if self.ept {
            Some(Kind::Ept)
        } else if self.npt {
            Some(Kind::Npt)
        } else {
            None
        }
    }
}

impl fmt::Display for KindSet {
    /// `EPT or NPT`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ept, self.npt) {
            (true, true) => f.write_str("EPT or NPT"),
            (true, false) => f.write_str("EPT"),
            (false, true) => f.write_str("NPT"),
            (false, false) => f.write_str("no known format"),
        }
    }
}

/// What the IOMMU hardware can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IommuCaps {
    /// For messages: "VT-d", "AMD IOMMU v2", "QEMU VT-d".
    pub name: &'static str,
    /// Which IOMMU, in which mode.
    pub mode: IommuMode,
    /// The formats its page walker is specified to walk (level counts: VT-d's SAGAW).
    pub walks: Walks,
    /// Host address width in bits (addresses in entries above it are reserved bits).
    pub address_width: u8,
    /// 2 MiB superpages.
    pub superpage_2m: bool,
    /// 1 GiB superpages.
    pub superpage_1g: bool,
    /// Snoop control: VT-d ECAP.SC (the per-leaf SNP bit), AMD's forced coherency.
    pub snoop_control: bool,
    /// The IOMMU's page walks snoop CPU caches, so KVM needs no cache flush per update.
    pub coherent_walk: bool,
    /// It sets accessed/dirty bits (VT-d SLADS, scalable mode only; AMD HA/HD).
    pub dirty_tracking: bool,
    /// Devices can ask for IO page faults to be resolved (VT-d PRS, scalable mode only; AMD PPR).
    pub page_requests: bool,
}

impl IommuCaps {
    /// A VT-d unit in scalable mode with second-level translation of `levels` levels, 48-bit
    /// host addresses, snoop control, coherent walks, A/D bits and page requests.
    pub fn vtd(levels: &[u8], superpage_1g: bool) -> Self {
        let set = LevelSet::of(levels);
        Self {
            name: "VT-d",
            mode: IommuMode::VtdScalable,
            walks: Walks {
                ept: set,
                npt: LevelSet::default(),
            },
            address_width: 48,
            superpage_2m: true,
            superpage_1g,
            snoop_control: true,
            coherent_walk: true,
            dirty_tracking: true,
            page_requests: true,
        }
    }

    /// QEMU 7.2's emulated VT-d (`-device intel-iommu,aw-bits=48[,x-scalable-mode=on]`), the
    /// lab's: 4 levels, no A/D bits (it never sets them), no page requests, snoop control
    /// only when asked for (`snoop-control=on`). It never looks at bits 2–10, so it walks the
    /// x86-64 format of a nested NPT table as well as EPT — the only place VT-d meets NPT.
    pub fn qemu_vtd(scalable: bool, snoop_control: bool) -> Self {
        Self {
            name: "QEMU VT-d",
            mode: if scalable {
                IommuMode::VtdScalable
            } else {
                IommuMode::VtdLegacy
            },
            walks: Walks {
                ept: LevelSet::of(&[4]),
                npt: LevelSet::of(&[4]),
            },
            address_width: 48,
            superpage_2m: true,
            superpage_1g: true,
            snoop_control,
            coherent_walk: true,
            dirty_tracking: false,
            page_requests: false,
        }
    }

    /// An AMD IOMMU walking x86-64 (NPT-format) guest tables (v2), with A/D and page requests.
    pub fn amd_v2(levels: &[u8]) -> Self {
        Self {
            name: "AMD IOMMU v2",
            mode: IommuMode::AmdV2,
            walks: Walks {
                ept: LevelSet::default(),
                npt: LevelSet::of(levels),
            },
            address_width: 52,
            superpage_2m: true,
            superpage_1g: true,
            snoop_control: true,
            coherent_walk: true,
            dirty_tracking: true,
            page_requests: true,
        }
    }

    /// Largest leaf level the IOMMU can walk (superpages must be supported from 2 MiB up).
    pub const fn max_leaf_level(&self) -> Level {
        match (self.superpage_2m, self.superpage_1g) {
            (true, true) => Level::L3,
            (true, false) => Level::L2,
            _ => Level::L1,
        }
    }

    /// The rules its walker reads entries by.
    pub const fn format(&self) -> IommuFormat {
        match self.mode {
            IommuMode::VtdLegacy | IommuMode::VtdScalable => IommuFormat::vtd(
                self.address_width,
                self.mode,
                self.snoop_control,
                self.dirty_tracking,
            ),
            IommuMode::AmdV2 => IommuFormat::amd_v2(self.address_width, self.dirty_tracking),
        }
    }

    /// Why no real unit has these capabilities, if none does.
    pub const fn impossible(&self) -> Option<ImpossibleCaps> {
        match self.mode {
            IommuMode::VtdLegacy if self.dirty_tracking => Some(ImpossibleCaps::LegacyAd),
            IommuMode::VtdLegacy if self.page_requests => Some(ImpossibleCaps::LegacyPageRequests),
            _ if self.address_width < 32 || self.address_width > 52 => {
                Some(ImpossibleCaps::AddressWidth)
            }
            _ => None,
        }
    }
}

/// The agreed setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shared {
    /// The format both sides use.
    pub format: PteFormat,
    /// Largest leaf level both sides allow; KVM must not map larger leaves while sharing.
    pub max_huge_level: Level,
    /// Set SNP in every leaf (formats that have it) so device DMA is always snooped.
    pub snoop: bool,
    /// The IOMMU sets A/D bits in KVM's entries (they are the same bits as KVM's), so the dirty
    /// bits cover DMA; otherwise its A/D tracking stays off while sharing.
    pub iommu_ad: bool,
}

/// Which of KVM's entries a conflict is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A table pointer at `level`.
    Table(Level),
    /// A leaf at `level`.
    Leaf(Level),
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryKind::Table(l) => write!(f, "level-{l} table entries"),
            EntryKind::Leaf(l) => write!(f, "level-{l} leaves"),
        }
    }
}

/// What a KVM bit is (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitMeaning {
    /// `SPTE_MMU_PRESENT_MASK`.
    MmuPresent,
    /// `shadow_host_writable_mask`.
    HostWritable,
    /// `shadow_mmu_writable_mask`.
    MmuWritable,
    /// EPT's suppress-#VE bit, set in every present entry.
    SuppressVe,
    /// tdpshare's pinned marker.
    Pinned,
    /// Accessed.
    Accessed,
    /// Dirty.
    Dirty,
    /// Huge page (PS).
    Huge,
    /// No-execute.
    NoExecute,
    /// VT-d's snoop bit.
    Snoop,
    /// A permission or memory-type bit.
    Other,
}

impl fmt::Display for BitMeaning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BitMeaning::MmuPresent => "MMU-present",
            BitMeaning::HostWritable => "host-writable",
            BitMeaning::MmuWritable => "MMU-writable",
            BitMeaning::SuppressVe => "suppress #VE",
            BitMeaning::Pinned => "pinned",
            BitMeaning::Accessed => "accessed",
            BitMeaning::Dirty => "dirty",
            BitMeaning::Huge => "huge page",
            BitMeaning::NoExecute => "no-execute",
            BitMeaning::Snoop => "snoop",
            BitMeaning::Other => "a permission or memory-type bit",
        })
    }
}

/// Entries KVM does not count as mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAMapping {
    /// `SHADOW_NONPRESENT_VALUE`.
    NonPresent,
    /// `FROZEN_SPTE`.
    Frozen,
    /// MMIO SPTEs.
    Mmio,
}

impl fmt::Display for NotAMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotAMapping::NonPresent => "non-present",
            NotAMapping::Frozen => "frozen",
            NotAMapping::Mmio => "MMIO",
        })
    }
}

/// Capabilities no real IOMMU has together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImpossibleCaps {
    /// VT-d legacy mode with second-level A/D bits.
    LegacyAd,
    /// VT-d legacy mode with page requests.
    LegacyPageRequests,
    /// A host address width outside 32..=52 bits.
    AddressWidth,
}

impl fmt::Display for ImpossibleCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImpossibleCaps::LegacyAd => {
                "VT-d has second-level A/D bits (SLADS) in scalable mode only, not in legacy mode"
            }
            ImpossibleCaps::LegacyPageRequests => {
                "VT-d takes page requests (PRS) in scalable mode only, not in legacy mode"
            }
            ImpossibleCaps::AddressWidth => "the host address width is outside 32..=52 bits",
        })
    }
}

/// One reason the table cannot be shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// The IOMMU walks no format of KVM's kind.
    Format {
        /// KVM's kind.
        kvm: Kind,
        /// The kinds the IOMMU walks.
        iommu: KindSet,
    },
    /// The IOMMU walks KVM's kind, but not with KVM's level count.
    Levels {
        /// The kind both use.
        kind: Kind,
        /// KVM's level count.
        kvm: u8,
        /// The counts the IOMMU walks.
        iommu: LevelSet,
    },
    /// KVM's own settings are impossible (no such format).
    KvmFormat {
        /// KVM's kind.
        kind: Kind,
        /// KVM's level count.
        levels: u8,
    },
    /// KVM sets, in some of its entries, a bit the IOMMU reserves there.
    ReservedBit {
        /// The bit.
        bit: u8,
        /// What it means to KVM.
        meaning: BitMeaning,
        /// In which entries.
        entries: EntryKind,
    },
    /// Entries KVM does not count as mappings are present to the IOMMU.
    PresentToIommu(NotAMapping),
    /// The IOMMU cannot force snooping.
    NoSnoopControl,
    /// The IOMMU's page walks do not snoop CPU caches.
    NonCoherentWalk,
    /// No real unit has the capabilities given.
    Impossible(ImpossibleCaps),
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Format { kvm, iommu } if iommu.is_empty() => {
                write!(f, "KVM uses {kvm}, the IOMMU walks no known format")
            }
            Mismatch::Format { kvm, iommu } => {
                write!(f, "KVM uses {kvm}, the IOMMU walks {iommu} only")
            }
            Mismatch::Levels { kind, kvm, iommu } => {
                write!(
                    f,
                    "IOMMU supports {kind} {iommu}-level only, KVM uses {kvm}-level"
                )
            }
            Mismatch::KvmFormat { kind, levels } => {
                write!(f, "KVM's {kind} with {levels} levels is not a known format")
            }
            Mismatch::ReservedBit {
                bit,
                meaning,
                entries,
            } => write!(
                f,
                "KVM sets bit {bit} ({meaning}) in its {entries}, a bit the IOMMU reserves there"
            ),
            Mismatch::PresentToIommu(what) => write!(
                f,
                "KVM's {what} entries are present to the IOMMU: DMA would use them"
            ),
            Mismatch::NoSnoopControl => f.write_str(
                "IOMMU lacks snoop control: device DMA could bypass the caches KVM's memory types assume",
            ),
            Mismatch::NonCoherentWalk => f.write_str(
                "IOMMU page walks are not cache-coherent: every KVM entry update would need a cache flush",
            ),
            Mismatch::Impossible(why) => write!(f, "no real IOMMU has these capabilities: {why}"),
        }
    }
}

/// Every mismatch one negotiation reports: the first of each kind.
pub type Mismatches = ReasonList<Mismatch, 10>;

/// Sharing was refused; every mismatch found is listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The IOMMU's name, for the message.
    pub iommu: &'static str,
    /// What does not match.
    pub mismatches: Mismatches,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cannot walk KVM's table: {}",
            self.iommu, self.mismatches
        )
    }
}

/// What KVM's bit `bit` of `format` is (for messages).
const fn meaning(format: &PteFormat, bit: u32) -> BitMeaning {
    let b = 1u64 << (bit & 63);
    if b & format.mmu_present != 0 {
        BitMeaning::MmuPresent
    } else if b & format.host_writable != 0 {
        BitMeaning::HostWritable
    } else if b & format.mmu_writable != 0 {
        BitMeaning::MmuWritable
    } else if b & format.present_extra != 0 {
        BitMeaning::SuppressVe
    } else if b & format.pinned != 0 {
        BitMeaning::Pinned
    } else if b & format.accessed != 0 {
        BitMeaning::Accessed
    } else if b & format.dirty != 0 {
        BitMeaning::Dirty
    } else if b & format.huge != 0 {
        BitMeaning::Huge
    } else if b & format.nx != 0 {
        BitMeaning::NoExecute
    } else if b & SNP != 0 {
        BitMeaning::Snoop
    } else {
        BitMeaning::Other
    }
}

/// A reserved-bit conflict at `bit` (the lowest of `conflict`) in `entries`.
const fn reserved_bit(format: &PteFormat, conflict: u64, entries: EntryKind) -> Mismatch {
    let bit = conflict.trailing_zeros();
    Mismatch::ReservedBit {
        bit: bit as u8,
        meaning: meaning(format, bit),
        entries,
    }
}

/// Checks KVM's entries of `f` under the IOMMU's rules `i`: reserved bits, entries KVM does not
/// count as mappings but the IOMMU would, the bits the IOMMU would set. `max_leaf` is the
/// largest leaf level in use, `snoop` whether leaves carry SNP.
fn check_bits(f: &PteFormat, i: &IommuFormat, max_leaf: Level, snoop: bool, out: &mut Mismatches) {
    // Host addresses above the IOMMU's width are a property of the host's memory, checked when
    // the walk meets one; here, only KVM's own bits.
    let table = f.table_entry_bits() & !f.addr_mask;
    let leaf = (f.leaf_bits() & !f.addr_mask & !SNP) | if snoop { SNP } else { 0 };
    let mut level = f.levels;
    loop {
        let conflict = table & i.reserved(level, false);
        if level > Level::L1 && conflict != 0 {
            out.push(reserved_bit(f, conflict, EntryKind::Table(level)));
            break;
        }
        match level.down() {
            Some(below) => level = below,
            None => break,
        }
    }
    let mut level = Level::L1;
    loop {
        let conflict = leaf & i.reserved(level, true);
        if conflict != 0 {
            out.push(reserved_bit(f, conflict, EntryKind::Leaf(level)));
            break;
        }
        match level.up() {
            Some(above) if above <= max_leaf => level = above,
            _ => break,
        }
    }
    if i.is_present(f.nonpresent) {
        out.push(Mismatch::PresentToIommu(NotAMapping::NonPresent));
    }
    if i.is_present(f.frozen()) {
        out.push(Mismatch::PresentToIommu(NotAMapping::Frozen));
    }
    if f.layout.mmio_while_walked() && f.mmio.is_some_and(|mmio| i.is_present(mmio.value)) {
        out.push(Mismatch::PresentToIommu(NotAMapping::Mmio));
    }
}

/// Negotiates a shared setting.
pub fn negotiate(kvm: &KvmCaps, iommu: &IommuCaps) -> Result<Shared, Refusal> {
    let mut mismatches = Mismatches::new();
    if let Some(why) = iommu.impossible() {
        mismatches.push(Mismatch::Impossible(why));
    }
    let format = PteFormat::with_layout(kvm.kind, kvm.levels, kvm.layout);
    if format.is_none() {
        mismatches.push(Mismatch::KvmFormat {
            kind: kvm.kind,
            levels: kvm.levels,
        });
    }
    let same_kind = iommu.walks.levels(kvm.kind);
    if same_kind.is_empty() {
        mismatches.push(Mismatch::Format {
            kvm: kvm.kind,
            iommu: iommu.walks.kinds(),
        });
    } else if !same_kind.contains(kvm.levels) {
        mismatches.push(Mismatch::Levels {
            kind: kvm.kind,
            kvm: kvm.levels,
            iommu: same_kind,
        });
    }
    if !iommu.snoop_control {
        mismatches.push(Mismatch::NoSnoopControl);
    }
    if !iommu.coherent_walk {
        mismatches.push(Mismatch::NonCoherentWalk);
    }
    let rules = iommu.format();
    let kvm_max = Level::new(kvm.max_huge_level.clamp(1, 5)).unwrap_or(Level::L1);
    let format = match format {
        Some(format) if !same_kind.is_empty() => format,
        _ => {
            return Err(Refusal {
                iommu: iommu.name,
                mismatches,
            });
        }
    };
    let max_huge_level = kvm_max
        .min(iommu.max_leaf_level())
        .min(format.max_huge_level);
    let snoop = iommu.snoop_control && rules.snp_in_leaves && format.snp_free();
    check_bits(&format, &rules, max_huge_level, snoop, &mut mismatches);
    if !mismatches.is_empty() {
        return Err(Refusal {
            iommu: iommu.name,
            mismatches,
        });
    }
    Ok(Shared {
        format,
        max_huge_level,
        snoop,
        iommu_ad: rules.sets_ad()
            && rules.accessed == format.accessed
            && rules.dirty == format.dirty,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    const EPT4_1G: KvmCaps = KvmCaps {
        kind: Kind::Ept,
        levels: 4,
        max_huge_level: 3,
        layout: Layout::Sharing,
    };

    #[test]
    fn vtd_and_ept_agree() {
        let s = negotiate(&EPT4_1G, &IommuCaps::vtd(&[4, 5], true)).unwrap();
        assert_eq!(s.format, PteFormat::EPT4);
        assert_eq!(s.max_huge_level, Level::L3);
        assert!(s.snoop);
        assert!(
            s.iommu_ad,
            "EPT and VT-d scalable mode use the same A/D bits"
        );
    }

    #[test]
    fn superpages_limited_by_the_iommu() {
        let s = negotiate(&EPT4_1G, &IommuCaps::vtd(&[4], false)).unwrap();
        assert_eq!(s.max_huge_level, Level::L2);
    }

    #[test]
    fn amd_shares_npt_without_snp_bit() {
        let kvm = KvmCaps {
            kind: Kind::Npt,
            levels: 5,
            ..EPT4_1G
        };
        let s = negotiate(&kvm, &IommuCaps::amd_v2(&[4, 5])).unwrap();
        assert_eq!(s.format, PteFormat::NPT5);
        assert!(!s.snoop, "x86-64 format has no per-entry snoop bit");
        assert!(s.iommu_ad);
    }

    #[test]
    fn level_mismatch_is_named() {
        let kvm = KvmCaps {
            levels: 5,
            ..EPT4_1G
        };
        let err = negotiate(&kvm, &IommuCaps::vtd(&[4], true)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "VT-d cannot walk KVM's table: IOMMU supports EPT 4-level only, KVM uses 5-level"
        );
    }

    #[test]
    fn every_mismatch_is_listed() {
        let mut iommu = IommuCaps::amd_v2(&[4]);
        iommu.snoop_control = false;
        iommu.coherent_walk = false;
        let err = negotiate(&EPT4_1G, &iommu).unwrap_err();
        assert_eq!(err.mismatches.len(), 3);
        assert_eq!(
            err.mismatches.get(0),
            Some(&Mismatch::Format {
                kvm: Kind::Ept,
                iommu: KindSet {
                    ept: false,
                    npt: true
                }
            })
        );
        let text = err.to_string();
        assert!(
            text.contains("KVM uses EPT, the IOMMU walks NPT only"),
            "{text}"
        );
        assert!(text.contains("snoop control") && text.contains("not cache-coherent"));
        let bogus = KvmCaps {
            levels: 3,
            ..EPT4_1G
        };
        let err = negotiate(&bogus, &IommuCaps::vtd(&[4], true)).unwrap_err();
        assert!(
            err.to_string()
                .contains("KVM's EPT with 3 levels is not a known format")
        );
    }

    /// What the lab found by hand in QEMU: 6.12's own entries fail VT-d at level 4 (reserved
    /// bit 11); with MMU-present moved to bit 59 they are walked.
    #[test]
    fn the_stock_layout_cannot_be_shared_with_vtd_and_the_sharing_layout_can() {
        let stock = KvmCaps {
            kind: Kind::Npt,
            layout: Layout::Stock,
            ..EPT4_1G
        };
        let err = negotiate(&stock, &IommuCaps::qemu_vtd(false, false)).unwrap_err();
        assert_eq!(
            err.mismatches.get(1),
            Some(&Mismatch::ReservedBit {
                bit: 11,
                meaning: BitMeaning::MmuPresent,
                entries: EntryKind::Table(Level::L4)
            }),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("KVM's MMIO entries are present to the IOMMU"),
            "{text}"
        );
        let sharing = KvmCaps {
            layout: Layout::Sharing,
            ..stock
        };
        let s = negotiate(&sharing, &IommuCaps::qemu_vtd(false, true)).unwrap();
        assert!(s.snoop && !s.iommu_ad);
        // Stock EPT: bit 11 again, and its MMIO entries are writable to VT-d.
        let stock_ept = KvmCaps {
            layout: Layout::Stock,
            ..EPT4_1G
        };
        let text = negotiate(&stock_ept, &IommuCaps::vtd(&[4], true))
            .unwrap_err()
            .to_string();
        assert!(text.contains("bit 11 (MMU-present)"), "{text}");
        assert!(text.contains("KVM's MMIO entries are present"), "{text}");
    }

    #[test]
    fn combinations_no_unit_offers_are_refused() {
        let mut legacy = IommuCaps::vtd(&[4], true);
        legacy.mode = IommuMode::VtdLegacy;
        let text = negotiate(&EPT4_1G, &legacy).unwrap_err().to_string();
        assert!(
            text.contains("A/D bits (SLADS) in scalable mode only"),
            "{text}"
        );
        legacy.dirty_tracking = false;
        let text = negotiate(&EPT4_1G, &legacy).unwrap_err().to_string();
        assert!(
            text.contains("page requests (PRS) in scalable mode only"),
            "{text}"
        );
        legacy.page_requests = false;
        let s = negotiate(&EPT4_1G, &legacy).unwrap();
        assert!(s.snoop, "legacy mode with snoop control: SNP in leaves");
        legacy.snoop_control = false;
        assert!(negotiate(&EPT4_1G, &legacy).is_err());
    }

    #[test]
    fn level_sets() {
        let s = LevelSet::of(&[4, 5, 200]);
        assert!(s.contains(4) && s.contains(5) && !s.contains(3) && !s.contains(200));
        assert_eq!(s.max(), Some(5));
        assert_eq!(s.to_string(), "4/5");
        assert_eq!(LevelSet::default().max(), None);
    }
}
