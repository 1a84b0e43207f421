//! The sharing handshake: every prerequisite of a mode checked at once, so that a refusal names
//! all that is missing, not only the first.

use alloc::vec::Vec;
use core::fmt;

use crate::decision::caps::{self, IommuCaps, KvmCaps, Shared};
use crate::decision::policy::Mode;
use crate::event::ShareMode;
use crate::sharing::vm::{VIommu, Vm};

/// One unmet prerequisite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmet {
    /// KVM uses shadow paging: there is no TDP table to share.
    TdpOff,
    /// The guest sees EPT/NPT: KVM also builds guest-mode roots the IOMMU must not use.
    NestedTdpExposed,
    /// A shadowing vIOMMU: the IOMMU table translates IOVA, KVM's translates GPA.
    VIommuShadow,
    /// The IOMMU cannot walk KVM's table.
    Format(caps::Refusal),
    /// The mode resolves DMA faults as IO page faults; the device cannot take them.
    NoIoPageFaults,
    /// The 2023 RFC refuses non-coherent DMA (it cannot honour guest memory types).
    NonCoherentDma,
    /// The 2023 RFC exports a root that exists only once a vCPU does.
    NoVcpu,
    /// guest_memfd memory cannot be pinned, and a device without IO page faults needs it pinned.
    GuestMemfd { slot: u16 },
}

impl fmt::Display for Unmet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unmet::TdpOff => f.write_str("TDP is off (KVM uses shadow paging)"),
            Unmet::NestedTdpExposed => f.write_str("the vCPU model exposes EPT/NPT to the guest"),
            Unmet::VIommuShadow => f.write_str(
                "a vIOMMU in shadow mode makes the IOMMU table translate IOVAs, not GPAs",
            ),
            Unmet::Format(refusal) => write!(f, "{refusal}"),
            Unmet::NoIoPageFaults => f.write_str("the device cannot take IO page faults"),
            Unmet::NonCoherentDma => f.write_str("a device does non-coherent DMA"),
            Unmet::NoVcpu => f.write_str("the VM has no vCPU yet"),
            Unmet::GuestMemfd { slot } => {
                write!(
                    f,
                    "memslot {slot} is guest_memfd memory, which cannot be pinned"
                )
            }
        }
    }
}

/// Sharing refused; every unmet prerequisite is listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub mode: ShareMode,
    pub unmet: Vec<Unmet>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sharing in mode {} refused: ", self.mode)?;
        for (i, u) in self.unmet.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{u}")?;
        }
        Ok(())
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Refusal {}

/// The format a separate, KVM-managed IOMMU table uses: the IOMMU's own choice of the formats
/// KVM can build (the first it walks, at its largest level count).
fn separate_table_caps(iommu: &IommuCaps, kvm: &KvmCaps) -> KvmCaps {
    let kind = iommu.walks.first().map_or(kvm.kind, |&(k, _)| k);
    let levels = iommu
        .walks
        .iter()
        .filter(|&&(k, _)| k == kind)
        .map(|&(_, l)| l)
        .max()
        .unwrap_or(kvm.levels);
    KvmCaps {
        kind,
        levels,
        max_huge_level: kvm.max_huge_level,
    }
}

/// Checks every prerequisite of `mode` for `vm` behind `iommu`.
pub fn check(mode: &dyn Mode, vm: &Vm, iommu: &IommuCaps) -> Result<Shared, Refusal> {
    let c = &vm.config;
    let mut unmet = Vec::new();
    let kvm = if mode.shares_cpu_root() {
        // The IOMMU walks the vCPUs' table: it must be a TDP table of the normal address space.
        if !c.tdp {
            unmet.push(Unmet::TdpOff);
        }
        if c.nested_tdp_exposed {
            unmet.push(Unmet::NestedTdpExposed);
        }
        c.kvm
    } else {
        separate_table_caps(iommu, &c.kvm)
    };
    if c.viommu == VIommu::Shadow {
        unmet.push(Unmet::VIommuShadow);
    }
    let shared = match caps::negotiate(&kvm, iommu) {
        Ok(s) => Some(s),
        Err(refusal) => {
            unmet.push(Unmet::Format(refusal));
            None
        }
    };
    if mode.pins() {
        for slot in vm.slots().filter(|s| s.guest_memfd()) {
            unmet.push(Unmet::GuestMemfd { slot: slot.id });
        }
    } else {
        if !c.device_iopf {
            unmet.push(Unmet::NoIoPageFaults);
        }
        if c.noncoherent_dma {
            unmet.push(Unmet::NonCoherentDma);
        }
        if vm.vcpus.is_empty() {
            unmet.push(Unmet::NoVcpu);
        }
    }
    match shared {
        Some(shared) if unmet.is_empty() => Ok(shared),
        _ => Err(Refusal {
            mode: mode.kind(),
            unmet,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::format::Kind;
    use crate::decision::policy::{
        self as mode, EXPORTED_IOPF, OPTIMIZED, PIN_PREPOPULATE, SEPARATE_TABLE,
    };
    use crate::sharing::vm::tests::config;
    use crate::sharing::vm::{Memslot, SlotKind};
    use alloc::string::ToString;
    use alloc::vec;

    fn vtd() -> IommuCaps {
        IommuCaps::vtd(&[4, 5], true)
    }

    #[test]
    fn a_plain_vm_can_share_in_pinning_modes() {
        let vm = Vm::new(1, config(), 1);
        for m in [&PIN_PREPOPULATE, &SEPARATE_TABLE, &OPTIMIZED] {
            let s = check(m, &vm, &vtd()).unwrap();
            assert!(s.snoop);
        }
    }

    #[test]
    fn every_refusal_reason_is_named() {
        let mut vm = Vm::new(1, config(), 0);
        vm.config.tdp = false;
        vm.config.nested_tdp_exposed = true;
        vm.config.viommu = VIommu::Shadow;
        vm.config.noncoherent_dma = true;
        vm.config.kvm.levels = 5;
        let err = check(&EXPORTED_IOPF, &vm, &IommuCaps::vtd(&[4], true)).unwrap_err();
        assert_eq!(err.unmet.len(), 7, "{err}");
        let text = err.to_string();
        for needle in [
            "TDP is off",
            "exposes EPT/NPT",
            "shadow mode",
            "IOMMU supports EPT 4-level only, KVM uses 5-level",
            "cannot take IO page faults",
            "non-coherent DMA",
            "no vCPU",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from {text}");
        }
    }

    #[test]
    fn guest_memfd_blocks_pinning_modes_only() {
        let mut vm = Vm::new(1, config(), 1);
        vm.config.device_iopf = true;
        vm.add_slot(Memslot {
            id: 3,
            as_id: 0,
            gpa: 0,
            size: 4096,
            flags: crate::event::Memslot::FLAG_GUEST_MEMFD,
            hpa: 0,
            kind: SlotKind::User,
        })
        .unwrap();
        assert_eq!(
            check(&PIN_PREPOPULATE, &vm, &vtd()).unwrap_err().unmet,
            vec![Unmet::GuestMemfd { slot: 3 }]
        );
        assert!(check(&EXPORTED_IOPF, &vm, &vtd()).is_ok());
    }

    #[test]
    fn a_separate_table_does_not_need_the_cpu_tables_shape() {
        let mut vm = Vm::new(1, config(), 1);
        vm.config.tdp = false;
        vm.config.nested_tdp_exposed = true;
        // KVM uses NPT-5 but the separate table is built in the IOMMU's EPT-4.
        vm.config.kvm.kind = Kind::Npt;
        vm.config.kvm.levels = 5;
        let s = check(
            mode::mode(ShareMode::SeparateTable),
            &vm,
            &IommuCaps::vtd(&[4], true),
        )
        .unwrap();
        assert_eq!(s.format, crate::decision::format::PteFormat::EPT4);
        let err = check(&OPTIMIZED, &vm, &IommuCaps::vtd(&[4], true)).unwrap_err();
        assert_eq!(err.unmet.len(), 3, "{err}");
    }
}
