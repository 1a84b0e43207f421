//! Capability negotiation: can the IOMMU walk the table KVM builds, and with which settings?
//!
//! KVM brings its format, level count and largest huge page; the IOMMU brings the formats it can
//! walk, its superpage sizes, snoop control and whether its page walks are cache-coherent. The
//! answer is one [`Shared`] setting both sides use, or a [`Refusal`] naming every mismatch.

use alloc::vec::Vec;
use core::fmt;

use crate::decision::format::{Kind, PteFormat};

/// What KVM's TDP MMU uses for this VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmCaps {
    pub kind: Kind,
    pub levels: u8,
    /// Largest level KVM maps leaves at (1 = 4 KiB only, 2 = 2 MiB, 3 = 1 GiB).
    pub max_huge_level: u8,
}

/// What the IOMMU hardware can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuCaps {
    pub name: &'static str,
    /// (format, levels) pairs the IOMMU's page walker understands.
    pub walks: Vec<(Kind, u8)>,
    pub superpage_2m: bool,
    pub superpage_1g: bool,
    /// The IOMMU can force DMA snooping per entry (VT-d SNP) or per domain.
    pub snoop_control: bool,
    /// The IOMMU's page walks snoop CPU caches, so KVM needs no cache flush per update.
    pub coherent_walk: bool,
}

impl IommuCaps {
    /// A VT-d unit with second-level (EPT-format) translation.
    pub fn vtd(levels: &[u8], superpage_1g: bool) -> Self {
        Self {
            name: "VT-d",
            walks: levels.iter().map(|&l| (Kind::Ept, l)).collect(),
            superpage_2m: true,
            superpage_1g,
            snoop_control: true,
            coherent_walk: true,
        }
    }

    /// An AMD IOMMU walking x86-64 (NPT-format) guest tables (v2).
    pub fn amd_v2(levels: &[u8]) -> Self {
        Self {
            name: "AMD IOMMU v2",
            walks: levels.iter().map(|&l| (Kind::Npt, l)).collect(),
            superpage_2m: true,
            superpage_1g: true,
            snoop_control: true,
            coherent_walk: true,
        }
    }

    /// Largest leaf level the IOMMU can walk (superpages must be supported from 2 MiB up).
    pub fn max_leaf_level(&self) -> u8 {
        match (self.superpage_2m, self.superpage_1g) {
            (true, true) => 3,
            (true, false) => 2,
            _ => 1,
        }
    }
}

/// The agreed setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shared {
    pub format: PteFormat,
    /// Largest leaf level both sides allow; KVM must not map larger leaves while sharing.
    pub max_huge_level: u8,
    /// Set SNP in every leaf (formats that have it) so device DMA is always snooped.
    pub snoop: bool,
}

/// One reason the table cannot be shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// The IOMMU walks no format of KVM's kind.
    Format {
        kvm: Kind,
        iommu: Vec<Kind>,
    },
    /// The IOMMU walks KVM's kind, but not with KVM's level count.
    Levels {
        kind: Kind,
        kvm: u8,
        iommu: Vec<u8>,
    },
    /// KVM's own settings are impossible (no such format).
    KvmFormat {
        kind: Kind,
        levels: u8,
    },
    NoSnoopControl,
    NonCoherentWalk,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Format { kvm, iommu } => {
                write!(f, "KVM uses {kvm}, the IOMMU walks ")?;
                if iommu.is_empty() {
                    f.write_str("no known format")
                } else {
                    join(f, iommu.iter(), " or ")?;
                    f.write_str(" only")
                }
            }
            Mismatch::Levels { kind, kvm, iommu } => {
                write!(f, "IOMMU supports {kind} ")?;
                join(f, iommu.iter(), "/")?;
                write!(f, "-level only, KVM uses {kvm}-level")
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

fn join<T: fmt::Display>(
    f: &mut fmt::Formatter<'_>,
    items: impl Iterator<Item = T>,
    sep: &str,
) -> fmt::Result {
    for (i, item) in items.enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

/// Sharing was refused; every mismatch found is listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub iommu: &'static str,
    pub mismatches: Vec<Mismatch>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} cannot walk KVM's table: ", self.iommu)?;
        join(f, self.mismatches.iter(), "; ")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Refusal {}

/// Negotiates a shared setting.
pub fn negotiate(kvm: &KvmCaps, iommu: &IommuCaps) -> Result<Shared, Refusal> {
    let mut mismatches = Vec::new();
    let format = PteFormat::of(kvm.kind, kvm.levels);
    if format.is_none() {
        mismatches.push(Mismatch::KvmFormat {
            kind: kvm.kind,
            levels: kvm.levels,
        });
    }
    let same_kind: Vec<u8> = iommu
        .walks
        .iter()
        .filter(|(k, _)| *k == kvm.kind)
        .map(|&(_, l)| l)
        .collect();
    if same_kind.is_empty() {
        let mut kinds: Vec<Kind> = iommu.walks.iter().map(|&(k, _)| k).collect();
        kinds.dedup();
        mismatches.push(Mismatch::Format {
            kvm: kvm.kind,
            iommu: kinds,
        });
    } else if !same_kind.contains(&kvm.levels) {
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
        Some(format) if mismatches.is_empty() => Ok(Shared {
            format,
            max_huge_level: kvm
                .max_huge_level
                .min(iommu.max_leaf_level())
                .min(format.max_huge_level)
                .max(1),
            snoop: iommu.snoop_control && format.snp != 0,
        }),
        _ => Err(Refusal {
            iommu: iommu.name,
            mismatches,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    const EPT4_1G: KvmCaps = KvmCaps {
        kind: Kind::Ept,
        levels: 4,
        max_huge_level: 3,
    };

    #[test]
    fn vtd_and_ept_agree() {
        let s = negotiate(&EPT4_1G, &IommuCaps::vtd(&[4, 5], true)).unwrap();
        assert_eq!(s.format, PteFormat::EPT4);
        assert_eq!(s.max_huge_level, 3);
        assert!(s.snoop);
    }

    #[test]
    fn superpages_limited_by_the_iommu() {
        let s = negotiate(&EPT4_1G, &IommuCaps::vtd(&[4], false)).unwrap();
        assert_eq!(s.max_huge_level, 2);
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
            err.mismatches[0],
            Mismatch::Format {
                kvm: Kind::Ept,
                iommu: vec![Kind::Npt]
            }
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
}
