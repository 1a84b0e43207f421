//! What the engine does when the VM's memory map changes: memslots added, deleted, moved or
//! re-flagged (`KVM_SET_USER_MEMORY_REGION`), KVM's private slots, P2P MMIO ranges — and SMM
//! entry and exit, which switch a vCPU to the SMM address space.

use crate::decision::addr::{Gpa, Hpa, Level, frames_to_bytes};
use crate::decision::format::{LeafAttrs, Perms};
use crate::decision::policy::Removal;
use crate::event::{EventKind, PrepopCause, RootCause};
use crate::iommu::iotlb::FlushRequest;
use crate::sharing::engine::{SharingError, SharingVm};
use crate::sharing::platform::{IommuDriver, Platform};
use crate::sharing::vm::{Memslot, MmioRange, PrivateKind, SlotError, SlotKind};
use crate::table::mmu::Mapping;

impl<P: Platform> SharingVm<P> {
    /// The memslots changed: a new generation (KVM adds 2 per update; the in-progress bit is
    /// not modelled), so cached MMIO SPTEs of older generations no longer hit.
    fn memslots_changed(&mut self) {
        self.memslot_generation = self.memslot_generation.wrapping_add(2);
    }

    /// `KVM_SET_USER_MEMORY_REGION` creating `slot`.
    pub fn add_slot(&mut self, slot: Memslot) -> Result<(), SharingError> {
        self.vm.add_slot(slot)?;
        self.memslots_changed();
        self.emit(EventKind::MemslotAdd(slot.event()));
        if self.session.is_some() && self.policy.pins && slot.is_user_memory() {
            self.pin_slot(&slot)?;
            self.populate_slot(&slot, PrepopCause::MemslotAdd)?;
        }
        if let SlotKind::Private(kind) = slot.kind {
            self.map_private(&slot, kind)?;
        }
        self.finish_op();
        Ok(())
    }

    /// KVM creates one of its private slots (`__x86_set_memory_region`).
    pub fn add_private_slot(
        &mut self,
        kind: PrivateKind,
        gpa: Gpa,
        hpa: Hpa,
    ) -> Result<(), SharingError> {
        let (id, pages) = kind.slot_and_pages();
        self.add_slot(Memslot {
            id,
            as_id: 0,
            gpa,
            size: frames_to_bytes(pages),
            flags: 0,
            hpa,
            kind: SlotKind::Private(kind),
        })
    }

    /// KVM maps its private pages in the vCPUs' table; a separate IOMMU table mirrors them
    /// only where its policy lets DMA see them.
    fn map_private(&mut self, slot: &Memslot, kind: PrivateKind) -> Result<(), SharingError> {
        let root = self.ensure_cpu_root(RootCause::Initial)?;
        let m = Self::private_mapping(slot, self.leaf_attrs(false));
        self.cpu.map(root, &m)?;
        if kind.visible_to_dma(&self.policy)
            && let Some((mmu, root)) = self.separate.as_mut()
        {
            mmu.map(*root, &m)?;
        }
        Ok(())
    }

    pub(crate) fn private_mapping(slot: &Memslot, attrs: LeafAttrs) -> Mapping {
        Mapping {
            gfn: slot.gfn(),
            frames: slot.frames(),
            hpa: slot.hpa,
            level: Level::L1,
            perms: Perms::RW,
            attrs,
        }
    }

    /// `KVM_SET_USER_MEMORY_REGION` deleting a slot.
    pub fn delete_slot(&mut self, as_id: u8, id: u16) -> Result<(), SharingError> {
        let slot = self.vm.remove_slot(as_id, id)?;
        self.memslots_changed();
        self.emit(EventKind::MemslotDelete(slot.event()));
        self.slot_removed(&slot)?;
        self.finish_op();
        Ok(())
    }

    /// `KVM_SET_USER_MEMORY_REGION` moving a slot to `gpa` (KVM zaps as for a deletion).
    pub fn move_slot(&mut self, as_id: u8, id: u16, gpa: Gpa) -> Result<(), SharingError> {
        let old = self.vm.remove_slot(as_id, id)?;
        let moved = Memslot { gpa, ..old };
        if let Err(e) = self.vm.add_slot(moved) {
            self.vm.add_slot(old)?;
            return Err(e.into());
        }
        self.memslots_changed();
        self.emit(EventKind::MemslotMove {
            old_gpa: old.gpa,
            slot: moved.event(),
        });
        self.slot_removed(&old)?;
        if self.session.is_some() && self.policy.pins && moved.is_user_memory() {
            self.pin_slot(&moved)?;
            self.populate_slot(&moved, PrepopCause::MemslotAdd)?;
        }
        self.finish_op();
        Ok(())
    }

    /// What removing `slot`'s mapping does, per mode. The slot leaves the pinned set first (a
    /// new root must not be pre-populated with it); its pins are released last, after the
    /// IOMMU can no longer reach the memory.
    fn slot_removed(&mut self, slot: &Memslot) -> Result<(), SharingError> {
        let was_pinned = self.pinned.remove(&(slot.as_id, slot.id)).is_some();
        let removal = if self.session.is_some() {
            self.policy.removal
        } else {
            Removal::FastZapAllRoots
        };
        // The vCPUs' side: KVM's own behaviour unless the shared root must persist.
        let cpu_persists = self.iommu_on_cpu_root() && removal != Removal::FastZapAllRoots;
        if cpu_persists && removal == Removal::ZapSlot && slot.as_id != 0 {
            // Zapping only the slot, 6.12 zaps it in the roots of the slot's own address
            // space (`kvm_tdp_mmu_unmap_gfn_range` walks `range->slot->as_id`'s roots): an SMM
            // slot leaves the normal root — the one the IOMMU walks — alone. QEMU registers
            // RAM in both spaces, so SMM slots come and go with SMRAM and PAM changes while
            // the normal slots over the same addresses stay. (A fast zap, as the exported
            // root's design keeps, empties every root whichever space the slot was in.)
            if let Some(smm) = self.smm_root {
                self.cpu.zap(smm, slot.gfn(), slot.frames(), true)?;
            }
        } else if cpu_persists {
            let root = self.ensure_cpu_root(RootCause::Initial)?;
            match removal {
                Removal::ZapAllLeaves => {
                    // The exported root stays; the fast zap empties it instead.
                    self.emit_fast_zap();
                    let limit = self.cpu.format().gfn_limit();
                    self.cpu
                        .zap_released(root, crate::decision::addr::Gfn(0), limit.0, false)?;
                    self.flush_now(FlushRequest::Domain(self.iommu.domain_id()));
                }
                _ => {
                    self.cpu
                        .zap_released(root, slot.gfn(), slot.frames(), true)?;
                    self.content_updated(slot.gfn(), slot.frames());
                }
            }
            // The model's SMM root maps normal slots (it has no SMM memslots of its own), so
            // it loses the range too.
            if let Some(smm) = self.smm_root {
                self.cpu.zap(smm, slot.gfn(), slot.frames(), true)?;
            }
        } else {
            self.fast_zap()?;
        }
        // A separate IOMMU table (it mirrors the normal address space): only the slot's range.
        if slot.as_id == 0
            && let Some((mmu, root)) = self.separate.as_mut()
        {
            mmu.zap_released(*root, slot.gfn(), slot.frames(), true)?;
            self.content_updated(slot.gfn(), slot.frames());
        }
        // Flush before unpinning: the device must not reach memory that is no longer pinned.
        self.finish_op();
        if was_pinned {
            self.release_pins(slot);
        }
        Ok(())
    }

    /// A flags-only change (dirty logging on/off).
    pub fn set_slot_flags(&mut self, as_id: u8, id: u16, flags: u32) -> Result<(), SharingError> {
        let old = *self
            .vm
            .slot(as_id, id)
            .ok_or(SlotError::NoSuchSlot { as_id, slot: id })?;
        let slot = self.vm.set_slot_flags(as_id, id, flags)?;
        self.memslots_changed();
        self.emit(EventKind::MemslotFlags {
            old_flags: old.flags,
            slot: slot.event(),
        });
        if self.pinned.contains_key(&(as_id, id)) {
            self.pinned.insert((as_id, id), slot);
        }
        match (old.dirty_logging(), slot.dirty_logging()) {
            (false, true) => self.dirty_log_started(&slot)?,
            (true, false) => self.dirty_log_stopped(&slot)?,
            _ => {}
        }
        self.finish_op();
        Ok(())
    }

    /// A peer device's MMIO range (P2P target) appears in the guest.
    pub fn add_mmio(&mut self, range: MmioRange) -> Result<(), SharingError> {
        self.vm.mmio.push(range);
        if self.session.is_some() && self.policy.pins {
            self.populate_mmio(&range, PrepopCause::MemslotAdd)?;
        }
        self.finish_op();
        Ok(())
    }
}
