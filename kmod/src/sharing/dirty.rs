//! Dirty tracking while sharing: how the pages DMA and vCPUs wrote are found for migration.
//!
//! With IO page faults, write-protection works as for vCPUs: a write faults and is logged.
//! Without them a write-protected page would fault the device, so either every pinned page is
//! reported dirty, or the hardware-set dirty bits (EPT D, VT-d SLADE) are walked and cleared.

use alloc::vec::Vec;

use crate::decision::addr::{Gfn, Level, PageSize};
use crate::decision::policy::DirtyTracking;
use crate::event::clock::Clock;
use crate::event::{EventKind, GpaRange, PrepopCause, leaves_of};
use crate::sharing::engine::{SharingError, SharingVm};
use crate::sharing::platform::Platform;
use crate::sharing::vm::{Memslot, SlotError};
use crate::table::mmu::RootId;

impl<P: Platform> SharingVm<P> {
    /// Dirty logging began on `slot`.
    pub(crate) fn dirty_log_started(&mut self, slot: &Memslot) -> Result<(), SharingError> {
        let Some(root) = self.cpu_root else {
            return Ok(());
        };
        let shared_cpu = self.iommu_on_cpu_root();
        if self.dirty_tracking == DirtyTracking::WriteProtect {
            // KVM write-protects; huge leaves go too (they cannot log per page).
            self.split_slot(root, slot)?;
            self.cpu.write_protect(root, slot.gfn(), slot.frames())?;
            self.dirty_frames.clear();
            if shared_cpu {
                self.content_updated(slot.gfn(), slot.frames());
            }
            return Ok(());
        }
        // Pinned DMA without IO page faults: entries stay writable. Huge leaves are split
        // (atomically) for per-page dirty bits where the mode's policy says so, or on the vCPUs'
        // own table when the IOMMU does not walk it.
        if self.policy.split_for_dirty_logging || !shared_cpu {
            self.split_slot(root, slot)?;
        }
        Ok(())
    }

    /// Splits every huge leaf of `slot` in the vCPUs' root down to 4 KiB, each split reported
    /// as a pre-population of its range when the IOMMU walks that root.
    fn split_slot(&mut self, root: RootId, slot: &Memslot) -> Result<(), SharingError> {
        let shared_cpu = self.iommu_on_cpu_root();
        loop {
            let huge: Vec<_> = self
                .cpu
                .leaves(root)?
                .into_iter()
                .filter(|l| {
                    l.level > Level::L1
                        && l.gfn < slot.end_gfn()
                        && l.gfn + l.level.frames() > slot.gfn()
                })
                .collect();
            if huge.is_empty() {
                return Ok(());
            }
            for l in huge {
                let start = self.timer.now_ns();
                let out = self.cpu.split(root, l.gfn, l.level)?;
                let ns = self.timer.now_ns().saturating_sub(start);
                if shared_cpu {
                    let range = GpaRange::of_frames(l.gfn, l.level.frames());
                    let page_size = l
                        .level
                        .down()
                        .and_then(Level::page_size)
                        .unwrap_or(PageSize::Size4K);
                    let cause = PrepopCause::HugePageSplit;
                    self.emit(EventKind::PrepopulateStart {
                        range,
                        page_size,
                        cause,
                    });
                    self.clock.charge(ns);
                    self.totals.prepop_ns += ns;
                    self.emit(EventKind::PrepopulateEnd {
                        range,
                        page_size,
                        cause,
                        entries: out.entries,
                        leaves: Some(leaves_of(page_size, out.entries)),
                        ns,
                    });
                    self.content_updated(l.gfn, l.level.frames());
                }
            }
        }
    }

    /// Dirty logging ended on `slot`: write access comes back where it was taken. Split huge
    /// pages come back lazily, through faults, as in KVM.
    pub(crate) fn dirty_log_stopped(&mut self, slot: &Memslot) -> Result<(), SharingError> {
        let Some(root) = self.cpu_root else {
            return Ok(());
        };
        if self.dirty_tracking == DirtyTracking::WriteProtect {
            self.cpu
                .set_perms(root, slot.gfn(), slot.frames(), Self::slot_perms(slot))?;
        }
        Ok(())
    }

    /// `KVM_GET_DIRTY_LOG`: 4 KiB frames of the slot written since the last call.
    pub fn get_dirty_log(&mut self, as_id: u8, id: u16) -> Result<u64, SharingError> {
        let slot = *self
            .vm
            .slot(as_id, id)
            .ok_or(SlotError::NoSuchSlot { as_id, slot: id })?;
        let Some(root) = self.cpu_root else {
            return Ok(0);
        };
        let dirty = match self.dirty_tracking {
            DirtyTracking::ReportAllPinned if self.pinned.contains_key(&(as_id, id)) => {
                slot.frames()
            }
            DirtyTracking::ReportAllPinned | DirtyTracking::DirtyBits => {
                let (out, frames) = self.cpu.clear_dirty(root, slot.gfn(), slot.frames())?;
                let mut frames = frames;
                if let Some((mmu, r)) = self.separate.as_mut() {
                    let (_, f) = mmu.clear_dirty(*r, slot.gfn(), slot.frames())?;
                    frames = frames.max(f);
                }
                if out.flush_needed || self.separate.is_some() {
                    self.content_updated(slot.gfn(), slot.frames());
                }
                frames
            }
            DirtyTracking::WriteProtect => {
                let frames: Vec<Gfn> = self
                    .dirty_frames
                    .iter()
                    .copied()
                    .filter(|&g| slot.contains_gfn(g))
                    .collect();
                for &g in &frames {
                    self.dirty_frames.remove(&g);
                    self.cpu.write_protect(root, g, 1)?;
                }
                if !frames.is_empty() && self.iommu_on_cpu_root() {
                    self.content_updated(slot.gfn(), slot.frames());
                }
                frames.len() as u64
            }
        };
        self.finish_op();
        Ok(dirty)
    }
}
