//! The IOTLB: set-associative caches of IOMMU translations — the leaves (the IOTLB proper) and
//! the paging-structure caches (VT-d's PML4E/PDPE/PDE caches: a table entry's child table, so a
//! walk can start below the root) — with domain- and range-selective invalidation, a flush
//! counter and a cost model.
//!
//! A paging-structure cache entry can point at a table KVM has since unlinked: a walk that
//! starts there reads the old table. That is why an unlinked table may be reused only after an
//! invalidation that drops such entries: a domain flush, or a range flush without the
//! invalidation hint (VT-d's IH=1, `leaf_only` here, keeps them — Linux sets it when no table
//! was freed, `cache_tag_flush_range(…, ih)`).
//!
//! Locking rule: one spinlock guards the cache and its generation; every method takes `&self`.
//!
//! The generation makes walks and flushes safe to race: a walker reads it before its page walk
//! and [`Iotlb::fill`] caches the result only if no invalidation ran meanwhile. So after
//! `invalidate` returns, no translation read before it can come back.
//!
//! Range invalidations follow VT-d page-selective invalidation (PSI): one descriptor whose
//! address mask covers the smallest naturally aligned power-of-two block holding the range
//! (`calculate_psi_aligned_address` in Linux); when that block exceeds the hardware's maximum
//! mask it falls back to one domain-selective descriptor. The cost of a flush is *modelled*
//! ([`CostModel`]): queued-invalidation submission plus the wait descriptor's round trip.

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::decision::addr::{Hpa, Iova, Level, PAGE_SHIFT, PageSize};
use crate::decision::format::Perms;
use crate::event::{FlushScope, GpaRange};
use crate::iommu::walker::{Access, Translation};
use crate::table::sync::SpinLock;

/// What to invalidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushRequest {
    /// Everything, every domain.
    All,
    /// Everything of one domain.
    Domain(u16),
    /// The translations of `[iova, iova + size)` in `domain`, and — unless `leaf_only` (VT-d's
    /// invalidation hint) — the paging-structure cache entries covering it.
    Range {
        domain: u16,
        iova: Iova,
        size: u64,
        leaf_only: bool,
    },
}

impl FlushRequest {
    /// The event model's scope, domain and range of this request.
    pub fn scope(&self) -> (FlushScope, Option<u32>, Option<GpaRange>) {
        match *self {
            FlushRequest::All => (FlushScope::All, None, None),
            FlushRequest::Domain(d) => (FlushScope::Domain, Some(u32::from(d)), None),
            FlushRequest::Range {
                domain,
                iova,
                size,
                leaf_only,
            } => (
                if leaf_only {
                    FlushScope::RangeLeaves
                } else {
                    FlushScope::Range
                },
                Some(u32::from(domain)),
                Some(GpaRange::new(iova.gpa(), size)),
            ),
        }
    }
}

/// What a flush did and what it cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Cached translations dropped.
    pub dropped: u64,
    /// Invalidation descriptors submitted.
    pub descriptors: u64,
    /// Modelled hardware cost.
    pub cost_ns: u64,
    /// A range request widened to the whole domain.
    pub fell_back_to_domain: bool,
}

/// Parameters of the flush cost model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostModel {
    /// Submitting the batch and waiting for its wait descriptor (`qi_submit_sync`).
    pub wait_ns: u64,
    pub per_descriptor_ns: u64,
    /// Largest PSI address mask, in 4 KiB pages as a power of two (VT-d MAMV).
    pub max_mask_order: u32,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            wait_ns: 1_000,
            per_descriptor_ns: 100,
            max_mask_order: 18,
        }
    }
}

/// One cached translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IotlbEntry {
    pub domain: u16,
    pub level: Level,
    /// IOVA >> the page size's shift.
    pub tag: u64,
    pub hpa_base: Hpa,
    pub perms: Perms,
    pub snoop: bool,
}

impl IotlbEntry {
    /// The entry for translation `t` of `iova`.
    pub fn new(domain: u16, iova: Iova, t: Translation) -> Self {
        let level = t.page_size.level();
        Self {
            domain,
            level,
            tag: iova.0 >> level.shift(),
            hpa_base: t.hpa.align_down(level.size()),
            perms: t.perms,
            snoop: t.snoop,
        }
    }

    fn start(&self) -> Iova {
        Iova(self.tag << self.level.shift())
    }

    fn end(&self) -> Iova {
        self.start() + self.level.size()
    }
}

/// One cached table entry: the child table of the entry at `level` covering `tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PsEntry {
    pub domain: u16,
    /// The level of the cached entry (2 and up).
    pub level: Level,
    /// IOVA >> the level's shift.
    pub tag: u64,
    /// The table the entry points at (at the level below).
    pub table: Hpa,
}

impl PsEntry {
    /// The cached entry at `level` covering `iova`, pointing at `table`.
    pub fn new(domain: u16, level: Level, iova: Iova, table: Hpa) -> Self {
        Self {
            domain,
            level,
            tag: iova.0 >> level.shift(),
            table,
        }
    }

    fn start(&self) -> Iova {
        Iova(self.tag << self.level.shift())
    }

    fn end(&self) -> Iova {
        self.start() + self.level.size()
    }
}

const WAYS: usize = 4;

/// A set-associative cache of `T`, with round-robin replacement.
#[derive(Debug)]
struct Cache<T> {
    sets: Vec<[Option<T>; WAYS]>,
    victim: Vec<u8>,
}

impl<T: Copy> Cache<T> {
    fn new(entries: usize) -> Self {
        let sets = entries.div_ceil(WAYS).max(1);
        Self {
            sets: vec![[None; WAYS]; sets],
            victim: vec![0; sets],
        }
    }

    fn set(&self, domain: u16, level: Level, tag: u64) -> &[Option<T>; WAYS] {
        &self.sets[set_of(domain, level, tag, self.sets.len())]
    }

    /// Puts `entry` in its set: over an entry `same` says it replaces, else a free way, else
    /// the next victim.
    fn insert(&mut self, domain: u16, level: Level, tag: u64, entry: T, same: impl Fn(&T) -> bool) {
        let index = set_of(domain, level, tag, self.sets.len());
        let way = self.sets[index]
            .iter()
            .position(|w| w.as_ref().is_none_or(&same));
        let way = way.unwrap_or_else(|| {
            let v = self.victim[index] as usize;
            self.victim[index] = ((v + 1) % WAYS) as u8;
            v
        });
        self.sets[index][way] = Some(entry);
    }

    /// Drops every entry `hit` says; returns how many.
    fn drop_where(&mut self, hit: impl Fn(&T) -> bool) -> u64 {
        let mut dropped = 0;
        for way in self.sets.iter_mut().flatten() {
            if way.as_ref().is_some_and(&hit) {
                *way = None;
                dropped += 1;
            }
        }
        dropped
    }

    fn len(&self) -> usize {
        self.sets.iter().flatten().flatten().count()
    }
}

#[derive(Debug)]
struct Inner {
    leaves: Cache<IotlbEntry>,
    tables: Cache<PsEntry>,
    generation: u64,
}

/// Running totals.
#[derive(Debug, Default)]
pub struct IotlbStats {
    pub flushes: AtomicU64,
    pub descriptors: AtomicU64,
    pub cost_ns: AtomicU64,
    pub dropped: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Walks that started below the root, from a paging-structure cache entry.
    pub table_hits: AtomicU64,
}

#[derive(Debug)]
pub struct Iotlb {
    inner: SpinLock<Inner>,
    cost: CostModel,
    pub stats: IotlbStats,
}

fn set_of(domain: u16, level: Level, tag: u64, sets: usize) -> usize {
    let mut h = tag ^ (u64::from(domain) << 48) ^ (u64::from(level.get()) << 56);
    h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 32) as usize % sets
}

impl Iotlb {
    /// An IOTLB of `entries` translations (rounded up to whole sets of 4), with paging-structure
    /// caches a quarter of that size.
    pub fn new(entries: usize, cost: CostModel) -> Self {
        Self {
            inner: SpinLock::new(Inner {
                leaves: Cache::new(entries),
                tables: Cache::new((entries / 4).max(16)),
                generation: 0,
            }),
            cost,
            stats: IotlbStats::default(),
        }
    }

    /// The current generation; pass it to [`Iotlb::fill`] after the walk.
    pub fn generation(&self) -> u64 {
        self.inner.lock().generation
    }

    /// A cached translation of `iova` in `domain` that grants `access`.
    pub fn lookup(&self, domain: u16, iova: Iova, access: Access) -> Option<Translation> {
        let need = access.needs();
        let inner = self.inner.lock();
        for size in PageSize::ALL {
            let level = size.level();
            let tag = iova.0 >> level.shift();
            let set = inner.leaves.set(domain, level, tag);
            let hit = set.iter().flatten().find(|e| {
                e.domain == domain && e.level == level && e.tag == tag && e.perms.contains(need)
            });
            if let Some(e) = hit {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Some(Translation {
                    hpa: e.hpa_base + (iova.0 & (size.bytes() - 1)),
                    page_size: size,
                    perms: e.perms,
                    snoop: e.snoop,
                });
            }
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Where a walk of `iova` in `domain` (with roots at `levels`) can start: the table and
    /// its level, from the lowest paging-structure cache entry that covers it.
    pub fn walk_start(&self, domain: u16, iova: Iova, levels: Level) -> Option<(Hpa, Level)> {
        let inner = self.inner.lock();
        let mut level = Level::L2;
        loop {
            let tag = iova.0 >> level.shift();
            let hit = inner
                .tables
                .set(domain, level, tag)
                .iter()
                .flatten()
                .find(|e| e.domain == domain && e.level == level && e.tag == tag);
            if let (Some(e), Some(below)) = (hit, level.down()) {
                self.stats.table_hits.fetch_add(1, Ordering::Relaxed);
                return Some((e.table, below));
            }
            match level.up() {
                Some(above) if above <= levels => level = above,
                _ => return None,
            }
        }
    }

    /// Caches `entry` and the table entries `tables` its walk went through, unless an
    /// invalidation ran since `generation` was read.
    pub fn fill(&self, generation: u64, entry: IotlbEntry, tables: &[PsEntry]) -> bool {
        let mut inner = self.inner.lock();
        if inner.generation != generation {
            return false;
        }
        let same = |e: &IotlbEntry| {
            e.domain == entry.domain && e.level == entry.level && e.tag == entry.tag
        };
        inner
            .leaves
            .insert(entry.domain, entry.level, entry.tag, entry, same);
        for t in tables {
            let same = |e: &PsEntry| e.domain == t.domain && e.level == t.level && e.tag == t.tag;
            inner.tables.insert(t.domain, t.level, t.tag, *t, same);
        }
        true
    }

    /// Invalidates what `request` covers.
    pub fn invalidate(&self, request: FlushRequest) -> FlushOutcome {
        let mut fell_back = false;
        let request = match request {
            FlushRequest::Range {
                domain,
                iova,
                size,
                leaf_only,
            } => match psi_block(iova, size, self.cost.max_mask_order) {
                Some((start, len)) => FlushRequest::Range {
                    domain,
                    iova: start,
                    size: len,
                    leaf_only,
                },
                None => {
                    fell_back = true;
                    FlushRequest::Domain(domain)
                }
            },
            other => other,
        };
        let dropped = {
            let mut inner = self.inner.lock();
            inner.generation += 1;
            match request {
                FlushRequest::All => {
                    inner.leaves.drop_where(|_| true) + inner.tables.drop_where(|_| true)
                }
                FlushRequest::Domain(d) => {
                    inner.leaves.drop_where(|e| e.domain == d)
                        + inner.tables.drop_where(|e| e.domain == d)
                }
                FlushRequest::Range {
                    domain,
                    iova,
                    size,
                    leaf_only,
                } => {
                    let end = iova + size;
                    let leaves = inner
                        .leaves
                        .drop_where(|e| e.domain == domain && e.start() < end && iova < e.end());
                    let tables = if leaf_only {
                        0
                    } else {
                        inner
                            .tables
                            .drop_where(|e| e.domain == domain && e.start() < end && iova < e.end())
                    };
                    leaves + tables
                }
            }
        };
        let descriptors = 1;
        let cost_ns = self.cost.wait_ns + descriptors * self.cost.per_descriptor_ns;
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .descriptors
            .fetch_add(descriptors, Ordering::Relaxed);
        self.stats.cost_ns.fetch_add(cost_ns, Ordering::Relaxed);
        self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
        FlushOutcome {
            dropped,
            descriptors,
            cost_ns,
            fell_back_to_domain: fell_back,
        }
    }

    /// Cached translations right now (leaves).
    pub fn len(&self) -> usize {
        self.inner.lock().leaves.len()
    }

    /// Cached table entries right now.
    pub fn tables_cached(&self) -> usize {
        self.inner.lock().tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The naturally aligned power-of-two block of 4 KiB pages that covers `[iova, iova + size)`,
/// as `(start, len)`; `None` if it needs a mask above `max_order`.
pub fn psi_block(iova: Iova, size: u64, max_order: u32) -> Option<(Iova, u64)> {
    let first = iova.gfn().0;
    let last = iova.offset(size.max(1) - 1).gfn().0;
    let mut order = 0u32;
    while (first >> order) != (last >> order) {
        order += 1;
        if order > max_order {
            return None;
        }
    }
    let start = Iova((first >> order) << order << PAGE_SHIFT);
    Some((start, 1u64 << (order + PAGE_SHIFT)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(hpa: u64, page_size: PageSize) -> Translation {
        Translation {
            hpa: Hpa(hpa),
            page_size,
            perms: Perms::RW,
            snoop: false,
        }
    }

    #[test]
    fn psi_blocks_are_aligned_and_cover() {
        assert_eq!(
            psi_block(Iova(0x1000), 0x1000, 18),
            Some((Iova(0x1000), 0x1000))
        );
        assert_eq!(
            psi_block(Iova(0x1000), 0x2000, 18),
            Some((Iova(0x0), 0x4000))
        );
        assert_eq!(
            psi_block(Iova(0x3000), 0x2000, 18),
            Some((Iova(0x0), 0x8000))
        );
        assert_eq!(psi_block(Iova(0), 1 << 30, 18), Some((Iova(0), 1 << 30)));
        assert_eq!(psi_block(Iova(0), 1 << 31, 18), None);
    }

    #[test]
    fn fill_lookup_and_selective_invalidation() {
        let tlb = Iotlb::new(64, CostModel::default());
        let g = tlb.generation();
        assert!(tlb.fill(
            g,
            IotlbEntry::new(1, Iova(0x20_1234), t(0x8020_1234, PageSize::Size2M)),
            &[]
        ));
        assert!(tlb.fill(
            g,
            IotlbEntry::new(1, Iova(0x5000), t(0x9000, PageSize::Size4K)),
            &[]
        ));
        assert!(tlb.fill(
            g,
            IotlbEntry::new(2, Iova(0x5000), t(0xa000, PageSize::Size4K)),
            &[]
        ));
        let hit = tlb.lookup(1, Iova(0x3f_ffff), Access::Write).unwrap();
        assert_eq!(hit.hpa, Hpa(0x803f_ffff));
        assert_eq!(
            tlb.lookup(1, Iova(0x5010), Access::Read).unwrap().hpa,
            Hpa(0x9010)
        );
        // A range flush of one page in domain 1 leaves domain 2 and the 2M entry alone.
        let out = tlb.invalidate(FlushRequest::Range {
            domain: 1,
            iova: Iova(0x5000),
            size: 0x1000,
            leaf_only: true,
        });
        assert_eq!(out.dropped, 1);
        assert!(tlb.lookup(1, Iova(0x5000), Access::Read).is_none());
        assert!(tlb.lookup(2, Iova(0x5000), Access::Read).is_some());
        assert!(tlb.lookup(1, Iova(0x20_0000), Access::Read).is_some());
        assert_eq!(tlb.invalidate(FlushRequest::Domain(2)).dropped, 1);
        assert_eq!(tlb.invalidate(FlushRequest::All).dropped, 1);
        assert!(tlb.is_empty());
        assert_eq!(tlb.stats.flushes.load(Ordering::Relaxed), 3);
        assert_eq!(tlb.stats.cost_ns.load(Ordering::Relaxed), 3 * 1_100);
    }

    #[test]
    fn a_fill_racing_with_a_flush_is_dropped() {
        let tlb = Iotlb::new(16, CostModel::default());
        let before_walk = tlb.generation();
        tlb.invalidate(FlushRequest::All);
        assert!(!tlb.fill(
            before_walk,
            IotlbEntry::new(1, Iova(0), t(0x1000, PageSize::Size4K)),
            &[PsEntry::new(1, Level::L2, Iova(0), Hpa(0x7000))]
        ));
        assert!(tlb.lookup(1, Iova(0), Access::Read).is_none());
        assert_eq!(tlb.walk_start(1, Iova(0), Level::L4), None);
    }

    #[test]
    fn huge_range_falls_back_to_domain() {
        let tlb = Iotlb::new(16, CostModel::default());
        let out = tlb.invalidate(FlushRequest::Range {
            domain: 1,
            iova: Iova(0),
            size: 4 << 30,
            leaf_only: false,
        });
        assert!(out.fell_back_to_domain);
    }

    #[test]
    fn lookup_requires_the_permission() {
        let tlb = Iotlb::new(16, CostModel::default());
        let ro = Translation {
            perms: Perms::R,
            ..t(0x1000, PageSize::Size4K)
        };
        tlb.fill(tlb.generation(), IotlbEntry::new(1, Iova(0), ro), &[]);
        assert!(tlb.lookup(1, Iova(0), Access::Read).is_some());
        assert!(tlb.lookup(1, Iova(0), Access::Write).is_none());
    }

    #[test]
    fn table_entries_start_walks_until_a_non_leaf_flush() {
        let tlb = Iotlb::new(64, CostModel::default());
        let pde = PsEntry::new(1, Level::L2, Iova(0x20_5000), Hpa(0xa000));
        let pdpe = PsEntry::new(1, Level::L3, Iova(0x20_5000), Hpa(0xb000));
        let leaf = IotlbEntry::new(1, Iova(0x20_5000), t(0x5000, PageSize::Size4K));
        assert!(tlb.fill(tlb.generation(), leaf, &[pdpe, pde]));
        // The lowest cached table entry covering an address wins.
        assert_eq!(
            tlb.walk_start(1, Iova(0x20_7000), Level::L4),
            Some((Hpa(0xa000), Level::L1))
        );
        assert_eq!(
            tlb.walk_start(1, Iova(0x40_0000), Level::L4),
            Some((Hpa(0xb000), Level::L2))
        );
        assert_eq!(tlb.walk_start(2, Iova(0x20_7000), Level::L4), None);
        // A leaf-only flush (IH=1) keeps them; a non-leaf one drops those it covers.
        let range = |leaf_only| FlushRequest::Range {
            domain: 1,
            iova: Iova(0x20_5000),
            size: 0x1000,
            leaf_only,
        };
        tlb.invalidate(range(true));
        assert!(tlb.lookup(1, Iova(0x20_5000), Access::Read).is_none());
        assert_eq!(tlb.tables_cached(), 2);
        tlb.invalidate(range(false));
        assert_eq!(tlb.tables_cached(), 0);
        assert_eq!(tlb.walk_start(1, Iova(0x20_7000), Level::L4), None);
    }
}
