//! Dirty tracking while sharing: how the pages DMA and vCPUs wrote are found for migration.
//!
//! With IO page faults, write-protection works as for vCPUs: a write faults and is logged.
//! Without them a write-protected page would fault the device, so either every pinned page is
//! reported dirty, or the hardware-set dirty bits (EPT D, VT-d SLADE) are walked and cleared.

use crate::decision::format::PteFormat;
use crate::event::EventSink;
use crate::event::clock::Clock;
use crate::sharing::engine::{SharingError, SharingVm};
use crate::sharing::pin::Pinner;
use crate::sharing::vm::{Memslot, SlotError};
use crate::table::page_alloc::PageAllocator;

/// How dirty pages are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum DirtyTracking {
    /// Write-protect the slot; writes fault and are logged (needs IO page faults while sharing).
    WriteProtect,
    /// Report every pinned page of the slot dirty (always correct, migrates everything).
    ReportAllPinned,
    /// Walk and clear the dirty bits hardware sets (vCPUs and IOMMU alike).
    DirtyBits,
}

impl<'a, A, S, C, T, P> SharingVm<'a, A, S, C, T, P>
where
    A: PageAllocator,
    S: EventSink + Clone,
    C: Clock + Clone,
    T: Clock,
    P: Pinner,
{
    /// Dirty logging began on `slot`.
    pub(crate) fn dirty_log_started(&mut self, slot: &Memslot) -> Result<(), SharingError> {
        let Some(root) = self.cpu_root else {
            return Ok(());
        };
        let shared_cpu = self.is_sharing() && self.mode.shares_cpu_root();
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
        if self.mode.split_for_dirty_logging() || !shared_cpu {
            self.split_slot(root, slot)?;
        }
        Ok(())
    }

    /// Splits every huge leaf of `slot` in the vCPUs' root down to 4 KiB, each split reported
    /// as a pre-population of its range when the IOMMU walks that root.
    fn split_slot(
        &mut self,
        root: crate::table::mmu::RootId,
        slot: &Memslot,
    ) -> Result<(), SharingError> {
        let shared_cpu = self.is_sharing() && self.mode.shares_cpu_root();
        loop {
            let huge: alloc::vec::Vec<_> = self
                .cpu
                .leaves(root)?
                .into_iter()
                .filter(|l| {
                    l.level > 1
                        && l.gfn < slot.gfn() + slot.frames()
                        && l.gfn + PteFormat::frames(l.level) > slot.gfn()
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
                    let range =
                        crate::event::GpaRange::new(l.gfn << 12, PteFormat::level_size(l.level));
                    let page_size = crate::event::PageSize::from_level(l.level - 1)
                        .unwrap_or(crate::event::PageSize::Size4K);
                    let cause = crate::event::PrepopCause::HugePageSplit;
                    self.emit(crate::event::EventKind::PrepopulateStart {
                        range,
                        page_size,
                        cause,
                    });
                    self.clock.charge(ns);
                    self.totals.prepop_ns += ns;
                    self.emit(crate::event::EventKind::PrepopulateEnd {
                        range,
                        page_size,
                        cause,
                        entries: out.entries,
                        ns,
                    });
                    self.content_updated(l.gfn, PteFormat::frames(l.level));
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
                let frames: alloc::vec::Vec<u64> = self
                    .dirty_frames
                    .iter()
                    .copied()
                    .filter(|&g| slot.contains_gfn(g))
                    .collect();
                for &g in &frames {
                    self.dirty_frames.remove(&g);
                    self.cpu.write_protect(root, g, 1)?;
                }
                if !frames.is_empty() && self.is_sharing() && self.mode.shares_cpu_root() {
                    self.content_updated(slot.gfn(), slot.frames());
                }
                frames.len() as u64
            }
        };
        self.finish_op();
        Ok(dirty)
    }
}
