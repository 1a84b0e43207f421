//! The fault paths: a vCPU's TDP page fault (KVM's `kvm_tdp_page_fault`) and a DMA fault the
//! IOMMU reports — resolved through the same TDP fault path where the mode takes IO page faults
//! (the 2023 RFC), reported unresolved otherwise.

use crate::decision::addr::{Gfn, Iova};
use crate::decision::format::Perms;
use crate::event::{EventKind, RootCause};
use crate::sharing::engine::{SharingError, SharingVm};
use crate::sharing::platform::Platform;
use crate::table::mmu::{Fault, FaultResult, RootId};

/// Re-entries of a faulting vCPU before the engine gives up (with one thread, only an entry left
/// frozen — a bug — makes a fault retry at all).
const FAULT_RETRIES: u32 = 16;

/// Page-fault error code bits (x86 `PFERR_*`), as KVM's fault path and the `kvm_page_fault`
/// tracepoint carry them.
pub mod error_code {
    /// The entry was present: a protection fault.
    pub const PRESENT: u64 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u64 = 1 << 1;
}

impl<P: Platform> SharingVm<P> {
    /// `vcpu` faulted on `gfn` with x86 `error_code` ([`error_code`]): maps the largest leaf
    /// the backing allows, or — for a write to a write-protected page — logs the write and
    /// restores write access. Returns false when nothing backs the access (emulated MMIO, a
    /// write to ROM): KVM emulates it and the vCPU moves on.
    pub fn tdp_page_fault(
        &mut self,
        vcpu: u32,
        gfn: Gfn,
        error_code: u64,
    ) -> Result<bool, SharingError> {
        let root = self.vcpu_root(vcpu)?;
        let smm = self.vm.vcpu(vcpu).is_some_and(|v| v.in_smm);
        self.totals.cpu_faults += 1;
        self.emit(EventKind::PageFault { gfn, error_code });
        if error_code & error_code::PRESENT != 0 {
            self.write_fault(root, gfn)
        } else {
            self.fault_in(root, gfn, smm)
        }
    }

    /// The IOMMU blocked a DMA to `iova` (a `write` or a read). Where the mode resolves IO page
    /// faults while sharing, the TDP fault path maps the page on the exported root; otherwise
    /// the fault is only reported. Returns whether it was resolved (the device may retry).
    pub fn iommu_fault(&mut self, iova: Iova, write: bool) -> Result<bool, SharingError> {
        let resolved = if self.session.is_some() && !self.policy.pins {
            let root = self.ensure_cpu_root(RootCause::Initial)?;
            let gfn = iova.gfn();
            let write_protected = write
                && self
                    .cpu
                    .lookup(root, gfn)?
                    .is_some_and(|l| !l.perms.contains(Perms::W));
            let resolved = if write_protected {
                self.write_fault(root, gfn)?
            } else {
                self.fault_in(root, gfn, false)?
            };
            if resolved {
                self.totals.iopf_resolved += 1;
            }
            resolved
        } else {
            false
        };
        self.emit(EventKind::IoPageFault {
            iova,
            write,
            resolved,
        });
        Ok(resolved)
    }

    /// The TDP fault path for `gfn` on `root` of the vCPUs' MMU: maps the largest leaf the slot
    /// allows. Returns false when no slot or MMIO range backs `gfn` (emulated MMIO).
    pub(crate) fn fault_in(
        &mut self,
        root: RootId,
        gfn: Gfn,
        smm: bool,
    ) -> Result<bool, SharingError> {
        let as_id = u8::from(smm);
        let slot = self
            .vm
            .slot_of(as_id, gfn)
            .or_else(|| self.vm.slot_of(0, gfn))
            .copied();
        let (base_gfn, frames, hpa, max_level, perms, pinned) = if let Some(s) = slot {
            // Pinned leaves live only where the IOMMU walks: never in the SMM root.
            let pinned =
                self.pinned.contains_key(&(s.as_id, s.id)) && self.policy.shares_cpu_root && !smm;
            (
                s.gfn(),
                s.frames(),
                s.hpa,
                self.max_level_for_slot(&s),
                Self::slot_perms(&s),
                pinned,
            )
        } else if let Some(m) = self.vm.mmio_of(gfn).copied() {
            (
                m.gfn(),
                m.frames(),
                m.hpa,
                self.max_level_for_mmio(),
                Perms::RW,
                false,
            )
        } else {
            // Emulated MMIO: KVM caches an MMIO SPTE where the layout has them — but none in a
            // table an IOMMU walks, which would read it as a mapping — and emulates.
            if !self.iommu_on_cpu_root() || self.cpu.format().layout.mmio_while_walked() {
                self.cpu.map_mmio(root, gfn, self.memslot_generation)?;
            }
            return Ok(false);
        };
        let end = base_gfn + frames;
        let attrs = self.leaf_attrs(pinned);
        // Already mapped (another vCPU, or the device's pre-population, got there first).
        if self.cpu.lookup(root, gfn)?.is_some() {
            return Ok(true);
        }
        // kvm_mmu_hugepage_adjust: the largest leaf holding `gfn` that lies inside the backing
        // with host and guest addresses aligned alike.
        let mut goal = max_level;
        while let Some(below) = goal.down() {
            let start = gfn.align_down(goal);
            let inside = start >= base_gfn && start + goal.frames() <= end;
            if inside && hpa.offset_frames(start - base_gfn).is_aligned(goal.size()) {
                break;
            }
            goal = below;
        }
        let fault = Fault {
            gfn,
            hpa: hpa.offset_frames(gfn - base_gfn),
            goal,
            perms,
            attrs,
        };
        // mmu_lock for read: the fault path runs concurrently with other vCPUs' faults. A
        // retry is the vCPU re-entering the guest and faulting again.
        for _ in 0..FAULT_RETRIES {
            match self.cpu.fault_in(root, &fault)? {
                FaultResult::Mapped { .. } | FaultResult::Spurious { .. } => return Ok(true),
                FaultResult::Retry => {}
            }
        }
        Err(SharingError::State(
            "a TDP fault kept retrying: an entry stays frozen",
        ))
    }

    /// A write to a write-protected page: dirty logging records it and restores write access.
    /// Returns false for read-only memory.
    pub(crate) fn write_fault(&mut self, root: RootId, gfn: Gfn) -> Result<bool, SharingError> {
        let Some(slot) = self.vm.slot_of(0, gfn).copied() else {
            return Ok(false);
        };
        if slot.readonly() {
            return Ok(false);
        }
        self.dirty_frames.insert(gfn);
        self.cpu.set_perms(root, gfn, 1, Self::slot_perms(&slot))?;
        Ok(true)
    }
}
