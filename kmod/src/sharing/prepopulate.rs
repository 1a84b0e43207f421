//! Pre-population: mapping pinned memory into the table the IOMMU walks before any DMA, with
//! the largest leaves both sides allow.

use alloc::vec::Vec;

use crate::decision::format::{Perms, PteFormat};
use crate::event::clock::Clock;
use crate::event::{EventKind, EventSink, GpaRange, PageSize, PrepopCause};
use crate::sharing::engine::{SharingError, SharingVm};
use crate::sharing::pin::Pinner;
use crate::sharing::vm::{Memslot, MmioRange};
use crate::table::mmu::{Mapping, MmuError, Outcome, RootId, TdpMmu};
use crate::table::page_alloc::PageAllocator;

/// Maps `[gfn, gfn + frames)` → `hpa..` with leaves up to `max_level`: each naturally aligned
/// chunk with the largest level its guest and host alignment allow; where smaller leaves are
/// already in the way, one level down. Returns the outcome and the largest level used.
fn populate_range<A: PageAllocator, S: EventSink, C: Clock>(
    mmu: &mut TdpMmu<&A, S, C>,
    root: RootId,
    template: Mapping,
    max_level: u8,
) -> Result<(Outcome, u8), MmuError> {
    let Mapping {
        gfn, frames, hpa, ..
    } = template;
    let end = gfn + frames;
    let mut out = Outcome::default();
    let mut largest = 1;
    // (start, level) chunks still to map; processed in order.
    let mut work: Vec<(u64, u8)> = Vec::new();
    let mut at = gfn;
    while at < end {
        let mut level = max_level;
        loop {
            let f = PteFormat::frames(level);
            let host = (hpa >> 12) + (at - gfn);
            if level == 1 || (at & (f - 1) == 0 && host & (f - 1) == 0 && at + f <= end) {
                break;
            }
            level -= 1;
        }
        // Extend a run of this level up to the next boundary of the level above.
        let f = PteFormat::frames(level);
        let next = if level < 3 {
            let up = PteFormat::frames(level + 1);
            ((at / up) + 1) * up
        } else {
            end
        };
        let run_end = next.min(end - (end - at) % f).max(at + f);
        let mut chunk = at;
        while chunk < run_end {
            work.push((chunk, level));
            // 4 KiB leaves go in runs (one page table at most), huge ones one by one.
            chunk += if level == 1 { run_end - chunk } else { f };
        }
        at = run_end;
    }
    let mut i = 0;
    while i < work.len() {
        let (start, level) = work[i];
        let f = PteFormat::frames(level);
        let len = if level == 1 {
            work.get(i + 1).map_or(end, |&(s, _)| s) - start
        } else {
            f
        };
        let m = Mapping {
            gfn: start,
            frames: len,
            hpa: hpa + ((start - gfn) << 12),
            level,
            ..template
        };
        match mmu.map(root, &m) {
            Ok(o) => {
                out.add(o);
                largest = largest.max(level);
            }
            // Already covered by a larger leaf (a fault got there first): it stays, but it maps
            // pinned memory now and must be guarded as such.
            Err(MmuError::Occupied { level: l, .. }) if l > level => {
                if template.attrs.pinned {
                    out.add(mmu.set_pinned(root, start, len, true)?);
                }
            }
            // Smaller leaves are in the way: one level down, in place.
            Err(MmuError::Occupied { .. }) if level > 1 => {
                let small = PteFormat::frames(level - 1);
                let subs: Vec<(u64, u8)> = (0..f / small)
                    .map(|k| (start + k * small, level - 1))
                    .collect();
                work.splice(i + 1..i + 1, subs);
            }
            Err(e) => return Err(e),
        }
        i += 1;
    }
    Ok((out, largest))
}

impl<'a, A, S, C, T, P> SharingVm<'a, A, S, C, T, P>
where
    A: PageAllocator,
    S: EventSink + Clone,
    C: Clock + Clone,
    T: Clock,
    P: Pinner,
{
    /// Largest leaf level for `slot` in a table the IOMMU walks.
    pub(crate) fn max_level_for_slot(&self, slot: &Memslot) -> u8 {
        let cap = self
            .shared()
            .map_or(self.cpu.max_leaf_level(), |s| s.max_huge_level);
        if !self.vm.config.huge_pages
            || (slot.dirty_logging() && self.mode.split_for_dirty_logging())
        {
            1
        } else {
            cap.min(self.cpu.max_leaf_level())
        }
    }

    pub(crate) fn max_level_for_mmio(&self) -> u8 {
        if self.mode.huge_mmio() {
            self.shared()
                .map_or(self.cpu.max_leaf_level(), |s| s.max_huge_level)
        } else {
            1
        }
    }

    /// Maps one range into the IOMMU's table, timed and reported as a pre-population.
    fn populate(
        &mut self,
        range: GpaRange,
        hpa: u64,
        perms: Perms,
        max_level: u8,
        cause: PrepopCause,
    ) -> Result<Outcome, SharingError> {
        let attrs = self.leaf_attrs(true);
        let template = Mapping {
            gfn: range.start >> 12,
            frames: range.size >> 12,
            hpa,
            level: 1,
            perms,
            attrs,
        };
        let first = PageSize::from_level(max_level).unwrap_or(PageSize::Size4K);
        self.emit(EventKind::PrepopulateStart {
            range,
            page_size: first,
            cause,
        });
        let start = self.timer.now_ns();
        let (mmu, root) = self
            .iommu_table()
            .ok_or(SharingError::State("sharing is not on"))?;
        let (out, largest) = populate_range(mmu, root, template, max_level)?;
        let ns = self.timer.now_ns().saturating_sub(start);
        self.clock.charge(ns);
        self.totals.prepop_ns += ns;
        self.emit(EventKind::PrepopulateEnd {
            range,
            page_size: PageSize::from_level(largest).unwrap_or(PageSize::Size4K),
            cause,
            entries: out.entries,
            ns,
        });
        Ok(out)
    }

    /// Pre-populates one pinned slot.
    pub(crate) fn populate_slot(
        &mut self,
        slot: &Memslot,
        cause: PrepopCause,
    ) -> Result<Outcome, SharingError> {
        let level = self.max_level_for_slot(slot);
        let out = self.populate(slot.range(), slot.hpa, Self::slot_perms(slot), level, cause)?;
        if out.flush_needed {
            self.content_updated(slot.gfn(), slot.frames());
        }
        Ok(out)
    }

    /// Maps a P2P MMIO range for DMA.
    pub(crate) fn populate_mmio(
        &mut self,
        range: &MmioRange,
        cause: PrepopCause,
    ) -> Result<Outcome, SharingError> {
        let level = self.max_level_for_mmio();
        self.populate(
            GpaRange::new(range.gpa, range.size),
            range.hpa,
            Perms::RW,
            level,
            cause,
        )
    }

    /// A full pre-population: every pinned slot and P2P range into the IOMMU's table, reported
    /// as one pre-population of the span they cover.
    pub(crate) fn prepopulate_all(&mut self, cause: PrepopCause) -> Result<Outcome, SharingError> {
        let slots: Vec<Memslot> = self.pinned.values().copied().collect();
        let mmio = self.vm.mmio.clone();
        let lo = slots
            .iter()
            .map(|s| s.gpa)
            .chain(mmio.iter().map(|m| m.gpa))
            .min();
        let hi = slots
            .iter()
            .map(|s| s.gpa + s.size)
            .chain(mmio.iter().map(|m| m.gpa + m.size))
            .max();
        let (Some(lo), Some(hi)) = (lo, hi) else {
            return Ok(Outcome::default());
        };
        let span = GpaRange::new(lo, hi - lo);
        let max_level = slots
            .iter()
            .map(|s| self.max_level_for_slot(s))
            .chain(mmio.iter().map(|_| self.max_level_for_mmio()))
            .max()
            .unwrap_or(1);
        self.emit(EventKind::PrepopulateStart {
            range: span,
            page_size: PageSize::from_level(max_level).unwrap_or(PageSize::Size4K),
            cause,
        });
        let start = self.timer.now_ns();
        let mut total = Outcome::default();
        let mut largest = 1;
        let attrs = self.leaf_attrs(true);
        let jobs: Vec<(Mapping, u8)> = slots
            .iter()
            .map(|s| {
                (
                    Mapping {
                        gfn: s.gfn(),
                        frames: s.frames(),
                        hpa: s.hpa,
                        level: 1,
                        perms: Self::slot_perms(s),
                        attrs,
                    },
                    self.max_level_for_slot(s),
                )
            })
            .chain(mmio.iter().map(|m| {
                (
                    Mapping {
                        gfn: m.gpa >> 12,
                        frames: m.size >> 12,
                        hpa: m.hpa,
                        level: 1,
                        perms: Perms::RW,
                        attrs,
                    },
                    self.max_level_for_mmio(),
                )
            }))
            .collect();
        {
            let (mmu, root) = self
                .iommu_table()
                .ok_or(SharingError::State("sharing is not on"))?;
            for (template, level) in jobs {
                let (out, l) = populate_range(mmu, root, template, level)?;
                total.add(out);
                largest = largest.max(l);
            }
        }
        let ns = self.timer.now_ns().saturating_sub(start);
        self.clock.charge(ns);
        self.totals.prepop_ns += ns;
        self.emit(EventKind::PrepopulateEnd {
            range: span,
            page_size: PageSize::from_level(largest).unwrap_or(PageSize::Size4K),
            cause,
            entries: total.entries,
            ns,
        });
        Ok(total)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::decision::format::LeafAttrs;
    use crate::event::clock::ManualClock;
    use crate::event::{NullSink, RootCause};
    use crate::table::page_alloc::Arena;

    fn run(gfn: u64, frames: u64, hpa: u64, max: u8) -> (Vec<(u64, u8)>, Outcome) {
        let arena = Arena::new(256).unwrap();
        let mut mmu = TdpMmu::new(&arena, PteFormat::EPT4, NullSink, ManualClock::new(0), 1);
        let root = mmu.alloc_root(false, RootCause::Initial).unwrap();
        let t = Mapping {
            gfn,
            frames,
            hpa,
            level: 1,
            perms: Perms::RW,
            attrs: LeafAttrs::default(),
        };
        let (out, _) = populate_range(&mut mmu, root, t, max).unwrap();
        let leaves = mmu
            .leaves(root)
            .unwrap()
            .iter()
            .map(|l| (l.gfn, l.level))
            .collect();
        (leaves, out)
    }

    #[test]
    fn uses_the_largest_leaves_alignment_allows() {
        // 4 KiB head, 2 MiB body, 1 GiB in the middle, 4 KiB tail.
        let gfn = (1 << 18) - 512 - 3;
        let frames = 3 + 512 + (1 << 18) + 512 + 5;
        let (leaves, out) = run(gfn, frames, 0x40_0000_0000 + (gfn << 12), 3);
        let count = |lvl| leaves.iter().filter(|(_, l)| *l == lvl).count();
        assert_eq!((count(1), count(2), count(3)), (8, 2, 1));
        assert_eq!(out.entries, 11);
        // Covers exactly the range.
        let covered: u64 = leaves.iter().map(|(_, l)| PteFormat::frames(*l)).sum();
        assert_eq!(covered, frames);
    }

    #[test]
    fn misaligned_host_memory_gets_small_leaves() {
        let (leaves, _) = run(0, 1024, 0x40_0000_1000, 3);
        assert!(leaves.iter().all(|(_, l)| *l == 1));
        assert_eq!(leaves.len(), 1024);
    }

    #[test]
    fn a_larger_leaf_in_the_way_becomes_pinned() {
        let arena = Arena::new(64).unwrap();
        let mut mmu = TdpMmu::new(&arena, PteFormat::EPT4, NullSink, ManualClock::new(0), 1);
        let root = mmu.alloc_root(false, RootCause::Initial).unwrap();
        let huge = Mapping {
            gfn: 0,
            frames: 512,
            hpa: 0x40_0000_0000,
            level: 2,
            perms: Perms::RW,
            attrs: LeafAttrs::default(),
        };
        mmu.map(root, &huge).unwrap();
        let pinned = LeafAttrs {
            pinned: true,
            ..LeafAttrs::default()
        };
        // A 4 KiB-only population of part of it (e.g. a slot with dirty logging).
        let t = Mapping {
            gfn: 8,
            frames: 8,
            hpa: 0x40_0000_8000,
            level: 1,
            attrs: pinned,
            ..huge
        };
        populate_range(&mut mmu, root, t, 1).unwrap();
        let leaf = mmu.lookup(root, 8).unwrap().unwrap();
        assert_eq!(leaf.level, 2);
        assert!(leaf.attrs.pinned, "the covering huge leaf is now guarded");
        assert!(mmu.zap(root, 0, 512, false).is_err());
    }

    #[test]
    fn smaller_leaves_in_the_way_are_kept() {
        let arena = Arena::new(64).unwrap();
        let mut mmu = TdpMmu::new(&arena, PteFormat::EPT4, NullSink, ManualClock::new(0), 1);
        let root = mmu.alloc_root(false, RootCause::Initial).unwrap();
        let t = Mapping {
            gfn: 0,
            frames: 1024,
            hpa: 0x40_0000_0000,
            level: 1,
            perms: Perms::RW,
            attrs: LeafAttrs::default(),
        };
        mmu.map(
            root,
            &Mapping {
                frames: 1,
                gfn: 600,
                hpa: 0x40_0000_0000 + (600 << 12),
                ..t
            },
        )
        .unwrap();
        populate_range(&mut mmu, root, t, 2).unwrap();
        let leaves = mmu.leaves(root).unwrap();
        assert_eq!(leaves.iter().filter(|l| l.level == 2).count(), 1);
        assert_eq!(leaves.iter().filter(|l| l.level == 1).count(), 512);
        for g in [0, 511, 512, 600, 1023] {
            assert_eq!(
                mmu.lookup(root, g).unwrap().unwrap().hpa >> 12,
                (0x40_0000_0000 >> 12) + g - g % if g < 512 { 512 } else { 1 }
            );
        }
    }
}
