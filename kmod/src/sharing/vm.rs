//! The VM as KVM sees it for sharing: memslots per address space, vCPUs (and which are in SMM),
//! KVM's private slots, peer-device MMIO ranges, and the configuration the handshake checks.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use crate::decision::addr::{Gfn, Gpa, Hpa, bytes_to_frames};
use crate::decision::caps::KvmCaps;
use crate::decision::kvm::{CR0_RESET, KvmKernel};
use crate::decision::policy::Policy;
use crate::decision::prereq::{SlotsNamed, VIommu, VmFacts};
use crate::event::{GpaRange, Memslot as SlotEvent, VmId};
use crate::table::mmu::{RootId, RootRole};

/// KVM's private memslots: created by KVM itself, not by the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum PrivateKind {
    /// The VMX APIC-access page.
    ApicAccess,
    /// The real-mode TSS (VMX without unrestricted guest).
    Tss,
    /// The identity-mapped page table for real mode (VMX without unrestricted guest).
    IdentityMap,
}

impl PrivateKind {
    /// DMA may see this private page under `policy` (the APIC-access page only where the
    /// policy lets it; the others always).
    pub const fn visible_to_dma(self, policy: &Policy) -> bool {
        !matches!(self, PrivateKind::ApicAccess) || policy.apic_access_visible
    }

    /// KVM's slot id and size in pages (`__x86_set_memory_region`).
    pub const fn slot_and_pages(self) -> (u16, u64) {
        match self {
            PrivateKind::Tss => (509, 3),
            PrivateKind::IdentityMap => (510, 1),
            PrivateKind::ApicAccess => (511, 1),
        }
    }
}

/// Who created a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlotKind {
    /// The VMM's guest memory (`KVM_SET_USER_MEMORY_REGION`).
    User,
    Private(PrivateKind),
}

/// A memslot with its host backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memslot {
    pub id: u16,
    /// 0 normal, 1 SMM.
    pub as_id: u8,
    pub gpa: Gpa,
    pub size: u64,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// Host address backing `gpa` (the backing is contiguous in the model; scenarios from VMM
    /// traces use the VMM's userspace address).
    pub hpa: Hpa,
    pub kind: SlotKind,
}

impl Memslot {
    pub fn range(&self) -> GpaRange {
        GpaRange::new(self.gpa, self.size)
    }
    pub fn gfn(&self) -> Gfn {
        self.gpa.gfn()
    }
    pub fn frames(&self) -> u64 {
        bytes_to_frames(self.size)
    }
    /// One past the slot's last frame.
    pub fn end_gfn(&self) -> Gfn {
        self.gfn() + self.frames()
    }
    pub fn readonly(&self) -> bool {
        self.flags & SlotEvent::FLAG_READONLY != 0
    }
    pub fn dirty_logging(&self) -> bool {
        self.flags & SlotEvent::FLAG_LOG_DIRTY != 0
    }
    pub fn guest_memfd(&self) -> bool {
        self.flags & SlotEvent::FLAG_GUEST_MEMFD != 0
    }
    /// A user slot of the normal address space: what sharing pins.
    pub fn is_user_memory(&self) -> bool {
        self.kind == SlotKind::User && self.as_id == 0
    }
    pub fn contains_gfn(&self, gfn: Gfn) -> bool {
        gfn >= self.gfn() && gfn < self.end_gfn()
    }
    /// Host address of guest frame `gfn` (inside the slot).
    pub fn hpa_of(&self, gfn: Gfn) -> Hpa {
        self.hpa.offset_frames(gfn - self.gfn())
    }
    /// The event model's view.
    pub fn event(&self) -> SlotEvent {
        SlotEvent {
            slot: self.id,
            as_id: self.as_id,
            gpa: self.gpa,
            size: self.size,
            flags: self.flags,
            ua: self.hpa.0,
        }
    }
}

/// A peer device's MMIO range mapped into the guest (BAR), target of P2P DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioRange {
    pub gpa: Gpa,
    pub size: u64,
    pub hpa: Hpa,
}

impl MmioRange {
    pub fn range(&self) -> GpaRange {
        GpaRange::new(self.gpa, self.size)
    }
    pub fn gfn(&self) -> Gfn {
        self.gpa.gfn()
    }
    pub fn frames(&self) -> u64 {
        bytes_to_frames(self.size)
    }
    pub fn contains_gfn(&self, gfn: Gfn) -> bool {
        gfn >= self.gfn() && gfn < self.gfn() + self.frames()
    }
}

/// What the VM was created with; what the handshake checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmConfig {
    /// KVM uses TDP (EPT/NPT) rather than shadow paging.
    pub tdp: bool,
    /// The vCPU model exposes EPT/NPT to the guest (nested virtualization).
    pub nested_tdp_exposed: bool,
    pub viommu: VIommu,
    pub kvm: KvmCaps,
    /// Host memory is backed by huge pages (THP / hugetlbfs), so KVM may map huge leaves.
    pub huge_pages: bool,
    /// The assigned device can take IO page faults (PRI / stall).
    pub device_iopf: bool,
    /// A device doing non-coherent DMA is attached.
    pub noncoherent_dma: bool,
    /// The host's KVM generation (its root lifecycle).
    pub kernel: KvmKernel,
}

/// What KVM keeps about one of the vCPUs' roots beyond its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootRefs {
    /// Which vCPUs may load it.
    pub role: RootRole,
    /// Not invalidated: vCPUs may still load it.
    pub valid: bool,
    /// vCPUs that have it loaded.
    pub vcpus: u32,
}

/// A vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vcpu {
    pub id: u32,
    pub in_smm: bool,
    /// The root it has loaded (`None`: unloaded; it loads one on its next entry).
    pub loaded: Option<RootId>,
    /// Its CR0 and CR4 (for the MMU-role bits).
    pub cr0: u64,
    pub cr4: u64,
}

impl Vcpu {
    /// The role of the root it runs on now (never guest mode: nested TDP is not exposed to a
    /// VM that shares, the handshake refuses it).
    pub const fn role(&self) -> RootRole {
        if self.in_smm {
            RootRole::SMM
        } else {
            RootRole::NORMAL
        }
    }

    /// vCPU `id` after RESET.
    pub const fn new(id: u32) -> Self {
        Self {
            id,
            in_smm: false,
            loaded: None,
            cr0: CR0_RESET,
            cr4: 0,
        }
    }
}

/// A memslot request that KVM would refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotError {
    Overlap { slot: u16, other: u16 },
    NoSuchSlot { as_id: u8, slot: u16 },
    Exists { as_id: u8, slot: u16 },
    Unaligned { gpa: Gpa, size: u64 },
}

impl fmt::Display for SlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotError::Overlap { slot, other } => {
                write!(f, "memslot {slot} overlaps memslot {other}")
            }
            SlotError::NoSuchSlot { as_id, slot } => {
                write!(f, "no memslot {slot} in address space {as_id}")
            }
            SlotError::Exists { as_id, slot } => {
                write!(f, "memslot {slot} already exists in address space {as_id}")
            }
            SlotError::Unaligned { gpa, size } => {
                write!(f, "memslot at {gpa} of {size:#x} bytes is not page-aligned")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for SlotError {}

/// The VM.
#[derive(Debug, Clone)]
pub struct Vm {
    pub id: VmId,
    pub config: VmConfig,
    slots: BTreeMap<(u8, u16), Memslot>,
    pub vcpus: Vec<Vcpu>,
    pub mmio: Vec<MmioRange>,
}

impl Vm {
    pub fn new(id: VmId, config: VmConfig, vcpus: u32) -> Self {
        Self {
            id,
            config,
            slots: BTreeMap::new(),
            vcpus: (0..vcpus).map(Vcpu::new).collect(),
            mmio: Vec::new(),
        }
    }

    pub fn slots(&self) -> impl Iterator<Item = &Memslot> {
        self.slots.values()
    }

    pub fn slot(&self, as_id: u8, id: u16) -> Option<&Memslot> {
        self.slots.get(&(as_id, id))
    }

    /// The slot of address space `as_id` holding `gfn`.
    pub fn slot_of(&self, as_id: u8, gfn: Gfn) -> Option<&Memslot> {
        self.slots
            .values()
            .find(|s| s.as_id == as_id && s.contains_gfn(gfn))
    }

    /// The P2P MMIO range holding `gfn`.
    pub fn mmio_of(&self, gfn: Gfn) -> Option<&MmioRange> {
        self.mmio.iter().find(|m| m.contains_gfn(gfn))
    }

    /// Adds a slot after KVM's checks (page alignment, no overlap in its address space).
    pub fn add_slot(&mut self, slot: Memslot) -> Result<(), SlotError> {
        if slot.gpa.page_offset() != 0
            || slot.size & crate::decision::addr::PAGE_MASK != 0
            || slot.size == 0
        {
            return Err(SlotError::Unaligned {
                gpa: slot.gpa,
                size: slot.size,
            });
        }
        if self.slots.contains_key(&(slot.as_id, slot.id)) {
            return Err(SlotError::Exists {
                as_id: slot.as_id,
                slot: slot.id,
            });
        }
        let (start, end) = (slot.gfn(), slot.end_gfn());
        if let Some(other) = self
            .slots
            .values()
            .find(|o| o.as_id == slot.as_id && o.gfn() < end && start < o.end_gfn())
        {
            return Err(SlotError::Overlap {
                slot: slot.id,
                other: other.id,
            });
        }
        self.slots.insert((slot.as_id, slot.id), slot);
        Ok(())
    }

    pub fn remove_slot(&mut self, as_id: u8, id: u16) -> Result<Memslot, SlotError> {
        self.slots
            .remove(&(as_id, id))
            .ok_or(SlotError::NoSuchSlot { as_id, slot: id })
    }

    pub fn set_slot_flags(&mut self, as_id: u8, id: u16, flags: u32) -> Result<Memslot, SlotError> {
        let slot = self
            .slots
            .get_mut(&(as_id, id))
            .ok_or(SlotError::NoSuchSlot { as_id, slot: id })?;
        slot.flags = flags;
        Ok(*slot)
    }

    /// The vCPU `id`.
    pub fn vcpu_mut(&mut self, id: u32) -> Option<&mut Vcpu> {
        self.vcpus.iter_mut().find(|v| v.id == id)
    }

    pub fn vcpu(&self, id: u32) -> Option<&Vcpu> {
        self.vcpus.iter().find(|v| v.id == id)
    }

    /// vCPUs currently in SMM.
    pub fn vcpus_in_smm(&self) -> usize {
        self.vcpus.iter().filter(|v| v.in_smm).count()
    }

    /// What the handshake's checks need to know.
    pub fn facts(&self) -> VmFacts {
        let c = &self.config;
        let mut guest_memfd = SlotsNamed::default();
        for slot in self.slots().filter(|s| s.guest_memfd()) {
            guest_memfd.add(slot.id);
        }
        VmFacts {
            tdp: c.tdp,
            nested_tdp_exposed: c.nested_tdp_exposed,
            viommu: c.viommu,
            kvm: c.kvm,
            device_iopf: c.device_iopf,
            noncoherent_dma: c.noncoherent_dma,
            vcpus: u32::try_from(self.vcpus.len()).unwrap_or(u32::MAX),
            guest_memfd,
            kernel: c.kernel,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::decision::format::Kind;

    pub(crate) fn config() -> VmConfig {
        VmConfig {
            tdp: true,
            nested_tdp_exposed: false,
            viommu: VIommu::None,
            kvm: KvmCaps {
                kind: Kind::Ept,
                levels: 4,
                max_huge_level: 3,
                layout: crate::decision::format::Layout::Sharing,
            },
            huge_pages: true,
            device_iopf: false,
            noncoherent_dma: false,
            kernel: KvmKernel::V6_12,
        }
    }

    fn slot(id: u16, gpa: u64, size: u64) -> Memslot {
        Memslot {
            id,
            as_id: 0,
            gpa: Gpa(gpa),
            size,
            flags: 0,
            hpa: Hpa(0x40_0000_0000 + gpa),
            kind: SlotKind::User,
        }
    }

    #[test]
    fn slots_follow_kvm_rules() {
        let mut vm = Vm::new(1, config(), 2);
        vm.add_slot(slot(0, 0, 0xa0000)).unwrap();
        assert_eq!(
            vm.add_slot(slot(1, 0x9f000, 0x2000)),
            Err(SlotError::Overlap { slot: 1, other: 0 })
        );
        assert!(matches!(
            vm.add_slot(slot(0, 0x100000, 0x1000)),
            Err(SlotError::Exists { .. })
        ));
        assert!(matches!(
            vm.add_slot(slot(2, 0x100, 0x1000)),
            Err(SlotError::Unaligned { .. })
        ));
        // The same range in the SMM address space is fine.
        vm.add_slot(Memslot {
            as_id: 1,
            ..slot(0, 0, 0xa0000)
        })
        .unwrap();
        assert_eq!(vm.slot_of(0, Gfn(0x9f)).unwrap().id, 0);
        assert_eq!(vm.slot_of(0, Gfn(0xa0)), None);
        assert_eq!(vm.slot(0, 0).unwrap().hpa_of(Gfn(5)), Hpa(0x40_0000_5000));
        vm.remove_slot(0, 0).unwrap();
        assert_eq!(
            vm.remove_slot(0, 0),
            Err(SlotError::NoSuchSlot { as_id: 0, slot: 0 })
        );
    }

    #[test]
    fn facts_name_guest_memfd_slots() {
        let mut vm = Vm::new(1, config(), 0);
        vm.add_slot(Memslot {
            flags: SlotEvent::FLAG_GUEST_MEMFD,
            ..slot(3, 0, 0x1000)
        })
        .unwrap();
        let f = vm.facts();
        assert_eq!(
            (f.guest_memfd.first, f.guest_memfd.count, f.vcpus),
            (Some(3), 1, 0)
        );
    }
}
