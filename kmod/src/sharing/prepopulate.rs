//! Pre-population: mapping pinned memory into the table the IOMMU walks before any DMA, with
//! the largest leaves both sides allow.

use alloc::vec::Vec;

use crate::decision::addr::{Gfn, Hpa, Level, PageSize};
use crate::decision::format::Perms;
use crate::event::clock::Clock;
use crate::event::{EventKind, EventSink, GpaRange, PrepopCause};
use crate::sharing::engine::{SharingError, SharingVm};
use crate::sharing::platform::Platform;
use crate::sharing::vm::{Memslot, MmioRange};
use crate::table::mmu::{Mapping, MmuError, Outcome, RootId, TdpMmu};
use crate::table::page_alloc::PageAllocator;

/// Most entries a pre-population writes with `mmu_lock` held before it yields the lock (KVM:
/// `tdp_mmu_iter_cond_resched`, which drops and retakes the lock when a vCPU waits for it).
/// 32,768 entries — 64 page tables of 4 KiB leaves, 128 GiB in 1 GiB leaves — take about
/// 15 µs at the measured population rate, so a vCPU fault never waits behind a whole
/// multi-GiB pre-population.
pub const PREPOP_BATCH: u64 = 1 << 15;

/// The lock hold of one pre-population: entries written since the last yield, the yields, the
/// largest batch.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Batches {
    pub(crate) since_yield: u64,
    pub(crate) yields: u64,
    pub(crate) max_batch: u64,
}

impl Batches {
    /// Before writing `entries` more: yields the lock first if they would overrun the batch.
    fn reserve(&mut self, entries: u64) {
        if self.since_yield > 0 && self.since_yield + entries > PREPOP_BATCH {
            self.max_batch = self.max_batch.max(self.since_yield);
            self.since_yield = 0;
            self.yields += 1;
        }
    }

    fn wrote(&mut self, entries: u64) {
        self.since_yield += entries;
        self.max_batch = self.max_batch.max(self.since_yield);
    }
}

/// Maps `template`'s range with leaves up to `max_level`: each naturally aligned chunk with the
/// largest level its guest and host alignment allow; where smaller leaves are already in the
/// way, one level down. Work items are one page table of 4 KiB leaves at most, or one huge
/// leaf, and the lock is yielded between them ([`PREPOP_BATCH`]). Returns the outcome, the
/// largest level used and the leaf entries written by size (4 KiB, 2 MiB, 1 GiB).
///
/// Lock: write (held by the caller; `batches` counts where it is dropped and retaken).
fn populate_range<A: PageAllocator, S: EventSink, C: Clock>(
    mmu: &mut TdpMmu<A, S, C>,
    root: RootId,
    template: Mapping,
    max_level: Level,
    batches: &mut Batches,
) -> Result<(Outcome, Level, [u64; 3]), MmuError> {
    let (gfn, end) = (template.gfn, template.end());
    let mut out = Outcome::default();
    let mut largest = Level::L1;
    let mut leaves = [0u64; 3];
    let by_size = |leaves: &mut [u64; 3], level: Level, n: u64| {
        let i = usize::from(level.get().clamp(1, 3)) - 1;
        leaves[i] += n;
    };
    // (start, level) chunks still to map; processed in order.
    let mut work: Vec<(Gfn, Level)> = Vec::new();
    let mut at = gfn;
    while at < end {
        let mut level = max_level;
        while let Some(below) = level.down() {
            let host_aligned = template.hpa_of(at).is_aligned(level.size());
            if at.is_aligned(level) && host_aligned && at + level.frames() <= end {
                break;
            }
            level = below;
        }
        // Extend a run of this level up to the next boundary of the level above.
        let f = level.frames();
        let next = match level.up().filter(|_| level < Level::L3) {
            Some(up) => at.align_down(up) + up.frames(),
            None => end,
        };
        let run_end = next.min(Gfn(end.0 - (end - at) % f)).max(at + f);
        let mut chunk = at;
        while chunk < run_end {
            work.push((chunk, level));
            // 4 KiB leaves go in runs (one page table at most), huge ones one by one.
            chunk = if level == Level::L1 {
                run_end
            } else {
                chunk + f
            };
        }
        at = run_end;
    }
    let mut i = 0;
    while i < work.len() {
        let (start, level) = work[i];
        let len = if level == Level::L1 {
            work.get(i + 1).map_or(end, |&(s, _)| s) - start
        } else {
            level.frames()
        };
        let m = Mapping {
            gfn: start,
            frames: len,
            hpa: template.hpa_of(start),
            level,
            ..template
        };
        batches.reserve(len / level.frames());
        match mmu.map(root, &m) {
            Ok(o) => {
                batches.wrote(o.entries);
                by_size(&mut leaves, level, o.entries);
                out.add(o);
                largest = largest.max(level);
            }
            // Already covered by a larger leaf (a fault got there first): it stays, but it maps
            // pinned memory now and must be guarded as such.
            Err(MmuError::Occupied { level: l, .. }) if l > level => {
                if template.attrs.pinned {
                    let o = mmu.set_pinned(root, start, len, true)?;
                    by_size(&mut leaves, l, o.entries);
                    out.add(o);
                }
            }
            // Smaller leaves are in the way: one level down, in place.
            Err(MmuError::Occupied { .. }) if level > Level::L1 => {
                let small = level.down().unwrap_or(Level::L1);
                let subs: Vec<(Gfn, Level)> = (0..level.frames() / small.frames())
                    .map(|k| (start + k * small.frames(), small))
                    .collect();
                work.splice(i + 1..i + 1, subs);
            }
            Err(e) => return Err(e),
        }
        i += 1;
    }
    Ok((out, largest, leaves))
}

impl<P: Platform> SharingVm<P> {
    /// Largest leaf level for `slot` in a table the IOMMU walks.
    pub(crate) fn max_level_for_slot(&self, slot: &Memslot) -> Level {
        let cap = self
            .shared()
            .map_or(self.cpu.max_leaf_level(), |s| s.max_huge_level);
        if !self.vm.config.huge_pages
            || (slot.dirty_logging() && self.policy.split_for_dirty_logging)
        {
            Level::L1
        } else {
            cap.min(self.cpu.max_leaf_level())
        }
    }

    pub(crate) fn max_level_for_mmio(&self) -> Level {
        if self.policy.huge_mmio {
            self.shared()
                .map_or(self.cpu.max_leaf_level(), |s| s.max_huge_level)
        } else {
            Level::L1
        }
    }

    /// The mapping template of a range pre-populated into the IOMMU's table.
    fn template(&self, range: GpaRange, hpa: Hpa, perms: Perms) -> Mapping {
        Mapping {
            gfn: range.start.gfn(),
            frames: crate::decision::addr::bytes_to_frames(range.size),
            hpa,
            level: Level::L1,
            perms,
            attrs: self.leaf_attrs(true),
        }
    }

    /// Maps `jobs` (templates with their largest level) into the IOMMU's table as one
    /// pre-population of `span`, timed and reported.
    fn populate(
        &mut self,
        span: GpaRange,
        jobs: &[(Mapping, Level)],
        cause: PrepopCause,
    ) -> Result<Outcome, SharingError> {
        let first = jobs.iter().map(|&(_, l)| l).max().unwrap_or(Level::L1);
        self.emit(EventKind::PrepopulateStart {
            range: span,
            page_size: first.page_size().unwrap_or(PageSize::Size4K),
            cause,
        });
        let start = self.timer.now_ns();
        let mut total = Outcome::default();
        let mut largest = Level::L1;
        let mut leaves = [0u64; 3];
        let mut batches = Batches::default();
        {
            // mmu_lock for write from here: no pinning (it may sleep) until it is dropped.
            self.lock_held = true;
            let result = match self.iommu_table() {
                None => Err(SharingError::State("sharing is not on")),
                Some((mmu, root)) => jobs.iter().try_for_each(|&(template, level)| {
                    let (out, l, by_size) =
                        populate_range(mmu, root, template, level, &mut batches)?;
                    total.add(out);
                    largest = largest.max(l);
                    for (sum, n) in leaves.iter_mut().zip(by_size) {
                        *sum += n;
                    }
                    Ok::<_, SharingError>(())
                }),
            };
            self.lock_held = false;
            result?;
        }
        self.totals.prepop_yields += batches.yields;
        self.totals.prepop_max_batch = self.totals.prepop_max_batch.max(batches.max_batch);
        let ns = self.timer.now_ns().saturating_sub(start);
        self.clock.charge(ns);
        self.totals.prepop_ns += ns;
        self.emit(EventKind::PrepopulateEnd {
            range: span,
            page_size: largest.page_size().unwrap_or(PageSize::Size4K),
            cause,
            entries: total.entries,
            leaves: Some(leaves),
            ns,
        });
        Ok(total)
    }

    /// Pre-populates one pinned slot.
    pub(crate) fn populate_slot(
        &mut self,
        slot: &Memslot,
        cause: PrepopCause,
    ) -> Result<Outcome, SharingError> {
        let job = (
            self.template(slot.range(), slot.hpa, Self::slot_perms(slot)),
            self.max_level_for_slot(slot),
        );
        let out = self.populate(slot.range(), &[job], cause)?;
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
        let job = (
            self.template(range.range(), range.hpa, Perms::RW),
            self.max_level_for_mmio(),
        );
        self.populate(range.range(), &[job], cause)
    }

    /// A full pre-population: every pinned slot and P2P range into the IOMMU's table, reported
    /// as one pre-population of the span they cover.
    pub(crate) fn prepopulate_all(&mut self, cause: PrepopCause) -> Result<Outcome, SharingError> {
        let jobs: Vec<(Mapping, Level)> = self
            .pinned
            .values()
            .map(|s| {
                (
                    self.template(s.range(), s.hpa, Self::slot_perms(s)),
                    self.max_level_for_slot(s),
                )
            })
            .chain(self.vm.mmio.iter().map(|m| {
                (
                    self.template(m.range(), m.hpa, Perms::RW),
                    self.max_level_for_mmio(),
                )
            }))
            .collect();
        let lo = jobs.iter().map(|(m, _)| m.gfn).min();
        let hi = jobs.iter().map(|(m, _)| m.end()).max();
        let (Some(lo), Some(hi)) = (lo, hi) else {
            return Ok(Outcome::default());
        };
        self.populate(GpaRange::of_frames(lo, hi - lo), &jobs, cause)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::decision::format::LeafAttrs;
    use crate::decision::format::PteFormat;
    use crate::event::clock::ManualClock;
    use crate::event::{NullSink, RootCause};
    use crate::table::mmu::RootRole;
    use crate::table::page_alloc::Arena;

    const HOST: u64 = 0x40_0000_0000;

    fn run(gfn: u64, frames: u64, hpa: u64, max: Level) -> (Vec<(u64, Level)>, Outcome) {
        let arena = Arena::new(256).unwrap();
        let mut mmu = TdpMmu::new(&arena, PteFormat::EPT4, NullSink, ManualClock::new(0), 1);
        let root = mmu
            .alloc_root(RootRole::NORMAL, RootCause::Initial)
            .unwrap();
        let t = Mapping {
            gfn: Gfn(gfn),
            frames,
            hpa: Hpa(hpa),
            level: Level::L1,
            perms: Perms::RW,
            attrs: LeafAttrs::default(),
        };
        let (out, _, _) = populate_range(&mut mmu, root, t, max, &mut Batches::default()).unwrap();
        let leaves = mmu
            .leaves(root)
            .unwrap()
            .iter()
            .map(|l| (l.gfn.0, l.level))
            .collect();
        (leaves, out)
    }

    #[test]
    fn uses_the_largest_leaves_alignment_allows() {
        // 4 KiB head, 2 MiB body, 1 GiB in the middle, 4 KiB tail.
        let gfn = (1 << 18) - 512 - 3;
        let frames = 3 + 512 + (1 << 18) + 512 + 5;
        let (leaves, out) = run(gfn, frames, HOST + (gfn << 12), Level::L3);
        let count = |lvl| leaves.iter().filter(|(_, l)| *l == lvl).count();
        assert_eq!(
            (count(Level::L1), count(Level::L2), count(Level::L3)),
            (8, 2, 1)
        );
        assert_eq!(out.entries, 11);
        // Covers exactly the range.
        let covered: u64 = leaves.iter().map(|(_, l)| l.frames()).sum();
        assert_eq!(covered, frames);
    }

    #[test]
    fn misaligned_host_memory_gets_small_leaves() {
        let (leaves, _) = run(0, 1024, HOST + 0x1000, Level::L3);
        assert!(leaves.iter().all(|(_, l)| *l == Level::L1));
        assert_eq!(leaves.len(), 1024);
    }

    #[test]
    fn a_larger_leaf_in_the_way_becomes_pinned() {
        let arena = Arena::new(64).unwrap();
        let mut mmu = TdpMmu::new(&arena, PteFormat::EPT4, NullSink, ManualClock::new(0), 1);
        let root = mmu
            .alloc_root(RootRole::NORMAL, RootCause::Initial)
            .unwrap();
        let huge = Mapping {
            gfn: Gfn(0),
            frames: 512,
            hpa: Hpa(HOST),
            level: Level::L2,
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
            gfn: Gfn(8),
            frames: 8,
            hpa: Hpa(HOST + 0x8000),
            level: Level::L1,
            attrs: pinned,
            ..huge
        };
        populate_range(&mut mmu, root, t, Level::L1, &mut Batches::default()).unwrap();
        let leaf = mmu.lookup(root, Gfn(8)).unwrap().unwrap();
        assert_eq!(leaf.level, Level::L2);
        assert!(leaf.attrs.pinned, "the covering huge leaf is now guarded");
        assert!(mmu.zap(root, Gfn(0), 512, false).is_err());
    }

    #[test]
    fn smaller_leaves_in_the_way_are_kept() {
        let arena = Arena::new(64).unwrap();
        let mut mmu = TdpMmu::new(&arena, PteFormat::EPT4, NullSink, ManualClock::new(0), 1);
        let root = mmu
            .alloc_root(RootRole::NORMAL, RootCause::Initial)
            .unwrap();
        let t = Mapping {
            gfn: Gfn(0),
            frames: 1024,
            hpa: Hpa(HOST),
            level: Level::L1,
            perms: Perms::RW,
            attrs: LeafAttrs::default(),
        };
        mmu.map(
            root,
            &Mapping {
                frames: 1,
                gfn: Gfn(600),
                hpa: Hpa(HOST + (600 << 12)),
                ..t
            },
        )
        .unwrap();
        populate_range(&mut mmu, root, t, Level::L2, &mut Batches::default()).unwrap();
        let leaves = mmu.leaves(root).unwrap();
        assert_eq!(leaves.iter().filter(|l| l.level == Level::L2).count(), 1);
        assert_eq!(leaves.iter().filter(|l| l.level == Level::L1).count(), 512);
        for g in [0u64, 511, 512, 600, 1023] {
            assert_eq!(
                mmu.lookup(root, Gfn(g)).unwrap().unwrap().hpa.pfn(),
                (HOST >> 12) + g - g % if g < 512 { 512 } else { 1 }
            );
        }
    }
}
