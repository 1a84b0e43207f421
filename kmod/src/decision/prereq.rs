//! The prerequisites of sharing: every condition a mode needs, checked at once, so that a
//! refusal names all that is missing, not only the first. Each [`Unmet`] has a stable code
//! ([`Unmet::code`], one bit) for the kernel's UAPI.

use core::fmt;
use core::str::FromStr;

use super::caps::{self, IommuCaps, KvmCaps, Shared};
use super::format::Layout;
use super::kvm::KvmKernel;
use super::policy::{Policy, Removal, ShareMode};

/// How the guest sees an IOMMU, if at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VIommu {
    /// No vIOMMU: the IOMMU translates guest-physical addresses.
    #[default]
    None,
    /// Nested translation in hardware: stage 2 is still GPA → HPA.
    Nested,
    /// Shadowed by the VMM: the IOMMU table translates IOVA, not GPA.
    Shadow,
}

impl VIommu {
    /// Every kind.
    pub const ALL: [VIommu; 3] = [VIommu::None, VIommu::Nested, VIommu::Shadow];

    /// The name in scenario files (`none`, `nested`, `shadow`).
    pub const fn name(self) -> &'static str {
        match self {
            VIommu::None => "none",
            VIommu::Nested => "nested",
            VIommu::Shadow => "shadow",
        }
    }
}

impl fmt::Display for VIommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no [`VIommu`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownVIommu;

impl fmt::Display for UnknownVIommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a vIOMMU is none, nested or shadow")
    }
}

impl FromStr for VIommu {
    type Err = UnknownVIommu;
    fn from_str(s: &str) -> Result<VIommu, UnknownVIommu> {
        VIommu::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or(UnknownVIommu)
    }
}

/// What the checks need to know about the VM (the kernel fills it from `struct kvm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmFacts {
    /// KVM uses TDP (EPT/NPT) rather than shadow paging.
    pub tdp: bool,
    /// The vCPU model exposes EPT/NPT to the guest (nested virtualization).
    pub nested_tdp_exposed: bool,
    /// The guest's view of an IOMMU.
    pub viommu: VIommu,
    /// KVM's TDP format.
    pub kvm: KvmCaps,
    /// The assigned device can take IO page faults (PRI / stall).
    pub device_iopf: bool,
    /// A device doing non-coherent DMA is attached.
    pub noncoherent_dma: bool,
    /// vCPUs created so far.
    pub vcpus: u32,
    /// Memslots backed by guest_memfd (which cannot be pinned).
    pub guest_memfd: SlotsNamed,
    /// The host's KVM generation.
    pub kernel: KvmKernel,
}

/// How many memslots have a property, and the first of them (for the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotsNamed {
    /// The first such slot.
    pub first: Option<u16>,
    /// How many there are.
    pub count: u32,
}

impl SlotsNamed {
    /// Counts `slot`.
    pub fn add(&mut self, slot: u16) {
        self.first = self.first.or(Some(slot));
        self.count = self.count.saturating_add(1);
    }
}

/// One unmet prerequisite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    GuestMemfd {
        /// The first such slot.
        slot: u16,
        /// How many such slots there are.
        count: u32,
    },
    /// The mode keeps the shared root across memslot deletions, zapping only the slot; this
    /// KVM zaps every root (`KVM_X86_QUIRK_SLOT_ZAP_ALL` cannot be disabled before 6.12).
    NoSlotZap,
}

impl Unmet {
    /// The reason's bit in a refusal code (stable: the kernel's UAPI documents it).
    pub const fn code(&self) -> u32 {
        match self {
            Unmet::TdpOff => 1 << 0,
            Unmet::NestedTdpExposed => 1 << 1,
            Unmet::VIommuShadow => 1 << 2,
            Unmet::Format(_) => 1 << 3,
            Unmet::NoIoPageFaults => 1 << 4,
            Unmet::NonCoherentDma => 1 << 5,
            Unmet::NoVcpu => 1 << 6,
            Unmet::GuestMemfd { .. } => 1 << 7,
            Unmet::NoSlotZap => 1 << 8,
        }
    }
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
            Unmet::GuestMemfd { slot, count: 1 } => write!(
                f,
                "memslot {slot} is guest_memfd memory, which cannot be pinned"
            ),
            Unmet::GuestMemfd { slot, count } => write!(
                f,
                "memslot {slot} and {} more are guest_memfd memory, which cannot be pinned",
                count.saturating_sub(1)
            ),
            Unmet::NoSlotZap => f.write_str(
                "this KVM zaps every root on a memslot deletion \
                 (KVM_X86_QUIRK_SLOT_ZAP_ALL cannot be disabled before Linux 6.12)",
            ),
        }
    }
}

/// Sharing refused; every unmet prerequisite is listed (compactly: the reasons as a code, with
/// the details of those that carry any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The mode asked for.
    pub mode: ShareMode,
    code: u32,
    format: Option<caps::Refusal>,
    guest_memfd: SlotsNamed,
}

impl Refusal {
    fn new(mode: ShareMode) -> Refusal {
        Refusal {
            mode,
            code: 0,
            format: None,
            guest_memfd: SlotsNamed::default(),
        }
    }

    fn add(&mut self, unmet: Unmet) {
        self.code |= unmet.code();
        match unmet {
            Unmet::Format(refusal) => self.format = Some(refusal),
            Unmet::GuestMemfd { slot, count } => {
                self.guest_memfd = SlotsNamed {
                    first: Some(slot),
                    count,
                }
            }
            _ => {}
        }
    }

    /// The refusal code: the OR of every unmet prerequisite's [`Unmet::code`].
    pub const fn code(&self) -> u32 {
        self.code
    }

    /// Every unmet prerequisite, in the order of their codes.
    pub fn unmet(&self) -> impl Iterator<Item = Unmet> + '_ {
        let all = [
            Some(Unmet::TdpOff),
            Some(Unmet::NestedTdpExposed),
            Some(Unmet::VIommuShadow),
            self.format.map(Unmet::Format),
            Some(Unmet::NoIoPageFaults),
            Some(Unmet::NonCoherentDma),
            Some(Unmet::NoVcpu),
            self.guest_memfd.first.map(|slot| Unmet::GuestMemfd {
                slot,
                count: self.guest_memfd.count,
            }),
            Some(Unmet::NoSlotZap),
        ];
        all.into_iter()
            .flatten()
            .filter(move |u| self.code & u.code() != 0)
    }

    /// How many prerequisites are unmet.
    pub const fn len(&self) -> u32 {
        self.code.count_ones()
    }

    /// Nothing is unmet (a refusal never is).
    pub const fn is_empty(&self) -> bool {
        self.code == 0
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sharing in mode {} refused: ", self.mode)?;
        for (i, unmet) in self.unmet().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{unmet}")?;
        }
        Ok(())
    }
}

/// The format a separate, KVM-managed IOMMU table uses: the IOMMU's own choice of the formats
/// KVM can build (the first it walks, at its largest level count).
pub fn separate_table_caps(iommu: &IommuCaps, kvm: &KvmCaps) -> KvmCaps {
    let kind = iommu.walks.kinds().first().unwrap_or(kvm.kind);
    KvmCaps {
        kind,
        levels: iommu.walks.levels(kind).max().unwrap_or(kvm.levels),
        max_huge_level: kvm.max_huge_level,
        // KVM builds the separate table in the layout that sharing needs.
        layout: Layout::Sharing,
    }
}

/// Checks every prerequisite of `policy` for a VM with `facts` behind `iommu`.
pub fn check(policy: &Policy, facts: &VmFacts, iommu: &IommuCaps) -> Result<Shared, Refusal> {
    let mut refusal = Refusal::new(policy.mode);
    let kvm = if policy.shares_cpu_root {
        // The IOMMU walks the vCPUs' table: it must be a TDP table of the normal address space.
        if !facts.tdp {
            refusal.add(Unmet::TdpOff);
        }
        if facts.nested_tdp_exposed {
            refusal.add(Unmet::NestedTdpExposed);
        }
        facts.kvm
    } else {
        separate_table_caps(iommu, &facts.kvm)
    };
    if facts.viommu == VIommu::Shadow {
        refusal.add(Unmet::VIommuShadow);
    }
    if policy.shares_cpu_root
        && matches!(policy.removal, Removal::ZapSlot)
        && !facts.kernel.slot_zap()
    {
        refusal.add(Unmet::NoSlotZap);
    }
    let shared = match caps::negotiate(&kvm, iommu) {
        Ok(s) => Some(s),
        Err(mismatch) => {
            refusal.add(Unmet::Format(mismatch));
            None
        }
    };
    if policy.pins {
        if let Some(slot) = facts.guest_memfd.first {
            refusal.add(Unmet::GuestMemfd {
                slot,
                count: facts.guest_memfd.count,
            });
        }
    } else {
        if !facts.device_iopf {
            refusal.add(Unmet::NoIoPageFaults);
        }
        if facts.noncoherent_dma {
            refusal.add(Unmet::NonCoherentDma);
        }
        if facts.vcpus == 0 {
            refusal.add(Unmet::NoVcpu);
        }
    }
    match shared {
        Some(shared) if refusal.is_empty() => Ok(shared),
        _ => Err(refusal),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::decision::format::{Kind, PteFormat};
    use alloc::string::ToString;

    fn facts() -> VmFacts {
        VmFacts {
            tdp: true,
            nested_tdp_exposed: false,
            viommu: VIommu::None,
            kvm: KvmCaps {
                kind: Kind::Ept,
                levels: 4,
                max_huge_level: 3,
                layout: crate::decision::format::Layout::Sharing,
            },
            device_iopf: false,
            noncoherent_dma: false,
            vcpus: 1,
            guest_memfd: SlotsNamed::default(),
            kernel: KvmKernel::V6_12,
        }
    }

    fn vtd() -> IommuCaps {
        IommuCaps::vtd(&[4, 5], true)
    }

    #[test]
    fn a_plain_vm_can_share_in_pinning_modes() {
        for m in [
            ShareMode::PinPrepopulate,
            ShareMode::SeparateTable,
            ShareMode::Optimized,
        ] {
            let s = check(&m.policy(), &facts(), &vtd()).unwrap();
            assert!(s.snoop);
        }
    }

    #[test]
    fn every_refusal_reason_is_named() {
        let mut f = facts();
        f.vcpus = 0;
        f.tdp = false;
        f.nested_tdp_exposed = true;
        f.viommu = VIommu::Shadow;
        f.noncoherent_dma = true;
        f.kvm.levels = 5;
        let err = check(
            &ShareMode::ExportedIopf.policy(),
            &f,
            &IommuCaps::vtd(&[4], true),
        )
        .unwrap_err();
        assert_eq!(err.len(), 7, "{err}");
        assert_eq!(err.code(), 0b111_1111);
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
    fn keeping_the_root_across_deletions_needs_6_12() {
        let mut f = facts();
        f.kernel = KvmKernel::Pre6_4;
        let err = check(&ShareMode::Optimized.policy(), &f, &vtd()).unwrap_err();
        assert_eq!(
            err.unmet().collect::<alloc::vec::Vec<_>>(),
            [Unmet::NoSlotZap]
        );
        assert!(
            err.to_string().contains("KVM_X86_QUIRK_SLOT_ZAP_ALL"),
            "{err}"
        );
        // The 2021 design fast-zaps anyway; the separate table is KVM's own; the exported
        // root is kept by the 2023 RFC's own change.
        for m in [ShareMode::PinPrepopulate, ShareMode::SeparateTable] {
            assert!(check(&m.policy(), &f, &vtd()).is_ok(), "{m}");
        }
    }

    #[test]
    fn guest_memfd_blocks_pinning_modes_only() {
        let mut f = facts();
        f.device_iopf = true;
        f.guest_memfd.add(3);
        let err = check(&ShareMode::PinPrepopulate.policy(), &f, &vtd()).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(
            err.unmet().next(),
            Some(Unmet::GuestMemfd { slot: 3, count: 1 })
        );
        assert!(check(&ShareMode::ExportedIopf.policy(), &f, &vtd()).is_ok());
        f.guest_memfd.add(5);
        let err = check(&ShareMode::Optimized.policy(), &f, &vtd()).unwrap_err();
        assert!(
            err.to_string()
                .contains("memslot 3 and 1 more are guest_memfd")
        );
    }

    #[test]
    fn a_separate_table_does_not_need_the_cpu_tables_shape() {
        let mut f = facts();
        f.tdp = false;
        f.nested_tdp_exposed = true;
        // KVM uses NPT-5 but the separate table is built in the IOMMU's EPT-4.
        f.kvm.kind = Kind::Npt;
        f.kvm.levels = 5;
        let iommu = IommuCaps::vtd(&[4], true);
        let s = check(&ShareMode::SeparateTable.policy(), &f, &iommu).unwrap();
        assert_eq!(s.format, PteFormat::EPT4);
        let err = check(&ShareMode::Optimized.policy(), &f, &iommu).unwrap_err();
        assert_eq!(err.len(), 3, "{err}");
    }

    #[test]
    fn viommu_names() {
        for v in VIommu::ALL {
            assert_eq!(v.name().parse(), Ok(v));
        }
        assert_eq!("full".parse::<VIommu>(), Err(UnknownVIommu));
    }
}
