//! Capability negotiation: can the IOMMU walk the table KVM builds, and with which settings?
//!
//! KVM brings its format, level count and largest huge page; the IOMMU brings the formats it can
//! walk, its superpage sizes, snoop control and whether its page walks are cache-coherent. The
//! answer is one [`Shared`] setting both sides use, or a [`Refusal`] naming every mismatch.

use core::fmt;

use super::addr::Level;
use super::format::{Kind, PteFormat};
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

/// The (format, levels) pairs an IOMMU's page walker understands.
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

    /// The kinds with at least one level count, in [`Kind::ALL`] order.
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
    /// For messages: "VT-d", "AMD IOMMU v2".
    pub name: &'static str,
    /// The formats its page walker understands.
    pub walks: Walks,
    /// 2 MiB superpages.
    pub superpage_2m: bool,
    /// 1 GiB superpages.
    pub superpage_1g: bool,
    /// The IOMMU can force DMA snooping per entry (VT-d SNP) or per domain.
    pub snoop_control: bool,
    /// The IOMMU's page walks snoop CPU caches, so KVM needs no cache flush per update.
    pub coherent_walk: bool,
}

impl IommuCaps {
    /// A VT-d unit with second-level (EPT-format) translation of `levels` levels.
    pub fn vtd(levels: &[u8], superpage_1g: bool) -> Self {
        Self {
            name: "VT-d",
            walks: Walks {
                ept: LevelSet::of(levels),
                npt: LevelSet::default(),
            },
            superpage_2m: true,
            superpage_1g,
            snoop_control: true,
            coherent_walk: true,
        }
    }

    /// An AMD IOMMU walking x86-64 (NPT-format) guest tables (v2) of `levels` levels.
    pub fn amd_v2(levels: &[u8]) -> Self {
        Self {
            name: "AMD IOMMU v2",
            walks: Walks {
                ept: LevelSet::default(),
                npt: LevelSet::of(levels),
            },
            superpage_2m: true,
            superpage_1g: true,
            snoop_control: true,
            coherent_walk: true,
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
    /// The IOMMU cannot force snooping.
    NoSnoopControl,
    /// The IOMMU's page walks do not snoop CPU caches.
    NonCoherentWalk,
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
            Mismatch::NoSnoopControl => f.write_str(
                "IOMMU lacks snoop control: device DMA could bypass the caches KVM's memory types assume",
            ),
            Mismatch::NonCoherentWalk => f.write_str(
                "IOMMU page walks are not cache-coherent: every KVM entry update would need a cache flush",
            ),
        }
    }
}

/// Every mismatch one negotiation can find (format or levels, KVM's own, snoop, coherence).
pub type Mismatches = ReasonList<Mismatch, 4>;

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

/// Negotiates a shared setting.
pub fn negotiate(kvm: &KvmCaps, iommu: &IommuCaps) -> Result<Shared, Refusal> {
    let mut mismatches = Mismatches::new();
    let format = PteFormat::of(kvm.kind, kvm.levels);
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
    match format {
        Some(format) if mismatches.is_empty() => {
            let kvm_max = Level::new(kvm.max_huge_level.clamp(1, 5)).unwrap_or(Level::L1);
            Ok(Shared {
                format,
                max_huge_level: kvm_max
                    .min(iommu.max_leaf_level())
                    .min(format.max_huge_level),
                snoop: iommu.snoop_control && format.snp != 0,
            })
        }
        _ => Err(Refusal {
            iommu: iommu.name,
            mismatches,
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    const EPT4_1G: KvmCaps = KvmCaps {
        kind: Kind::Ept,
        levels: 4,
        max_huge_level: 3,
    };

    #[test]
    fn vtd_and_ept_agree() {
        let s = negotiate(&EPT4_1G, &IommuCaps::vtd(&[4, 5], true)).unwrap();
        assert_eq!(s.format, PteFormat::EPT4);
        assert_eq!(s.max_huge_level, Level::L3);
        assert!(s.snoop);
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
            max_huge_level: 3,
        };
        let s = negotiate(&kvm, &IommuCaps::amd_v2(&[4, 5])).unwrap();
        assert_eq!(s.format, PteFormat::NPT5);
        assert!(!s.snoop, "x86-64 format has no per-entry snoop bit");
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

    #[test]
    fn level_sets() {
        let s = LevelSet::of(&[4, 5, 200]);
        assert!(s.contains(4) && s.contains(5) && !s.contains(3) && !s.contains(200));
        assert_eq!(s.max(), Some(5));
        assert_eq!(s.to_string(), "4/5");
        assert_eq!(LevelSet::default().max(), None);
    }
}
