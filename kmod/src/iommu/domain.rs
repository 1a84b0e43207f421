//! An IOMMU domain whose table is a TDP root: the walker, the root pointer and the IOTLB in
//! front of them — the device side of sharing.
//!
//! Locking rule: everything takes `&self` and may run on any number of threads at once,
//! concurrently with the TDP MMU's writer.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::decision::addr::Level;
use crate::decision::addr::{Hpa, Iova};
use crate::iommu::iotlb::{FlushOutcome, FlushRequest, Iotlb, IotlbEntry, PsEntry};
use crate::iommu::walker::{Access, DmaFault, DmaWalker, Translation};
use crate::table::page_alloc::PageAllocator;

/// Counters of one domain.
#[derive(Debug, Default)]
pub struct DomainStats {
    pub translations: AtomicU64,
    pub iotlb_hits: AtomicU64,
    pub walks: AtomicU64,
    pub faults: AtomicU64,
}

/// An IOMMU domain whose table is a TDP root: the walker, the root pointer and the IOTLB.
#[derive(Debug)]
pub struct IommuDomain<'a> {
    pub id: u16,
    walker: DmaWalker,
    root: AtomicU64,
    iotlb: &'a Iotlb,
    pub stats: DomainStats,
}

impl<'a> IommuDomain<'a> {
    pub fn new(id: u16, walker: DmaWalker, iotlb: &'a Iotlb) -> Self {
        Self {
            id,
            walker,
            root: AtomicU64::new(0),
            iotlb,
            stats: DomainStats::default(),
        }
    }

    pub fn walker(&self) -> &DmaWalker {
        &self.walker
    }

    /// The table the domain walks (`None`: no table attached, every DMA faults).
    pub fn root(&self) -> Option<Hpa> {
        match self.root.load(Ordering::Acquire) {
            0 => None,
            pa => Some(Hpa(pa)),
        }
    }

    /// Points the domain at a new root (the root-update notification) and drops every cached
    /// translation of the old one.
    pub fn set_root(&self, root: Option<Hpa>) -> FlushOutcome {
        self.root
            .store(root.map_or(0, |pa| pa.0), Ordering::Release);
        self.iotlb.invalidate(FlushRequest::Domain(self.id))
    }

    /// Flushes cached translations after a content update.
    pub fn flush(&self, request: FlushRequest) -> FlushOutcome {
        self.iotlb.invalidate(request)
    }

    /// One DMA: the IOTLB, or a walk whose result is cached unless an invalidation ran
    /// meanwhile (a walk racing with a flush must not re-insert what the flush removed).
    pub fn dma<A: PageAllocator>(
        &self,
        alloc: &A,
        iova: Iova,
        access: Access,
    ) -> Result<Translation, DmaFault> {
        self.stats.translations.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = self.iotlb.lookup(self.id, iova, access) {
            self.stats.iotlb_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(t);
        }
        self.stats.walks.fetch_add(1, Ordering::Relaxed);
        let generation = self.iotlb.generation();
        // The root is read inside the read-side section: a root switched away from and freed
        // meanwhile stays readable until the walk ends.
        let _section = alloc.read_lock();
        let Some(root) = self.root() else {
            self.stats.faults.fetch_add(1, Ordering::Relaxed);
            return Err(DmaFault::NoRoot { iova });
        };
        // The walk starts below the root where a paging-structure cache entry covers the IOVA,
        // and caches the table entries it follows.
        let levels = self.walker.levels;
        let (table, level) = self
            .iotlb
            .walk_start(self.id, iova, levels)
            .unwrap_or((root, levels));
        let mut followed = [PsEntry::new(self.id, Level::L2, iova, Hpa(0)); 4];
        let mut n = 0;
        let mut visit = |at: Level, child: Hpa| {
            if let Some(slot) = followed.get_mut(n) {
                *slot = PsEntry::new(self.id, at, iova, child);
                n += 1;
            }
        };
        let walk = self
            .walker
            .walk_from(alloc, table, level, iova, access, &mut visit);
        match walk {
            Ok(t) => {
                let entry = IotlbEntry::new(self.id, iova, t);
                self.iotlb.fill(generation, entry, &followed[..n]);
                Ok(t)
            }
            Err(fault) => {
                self.stats.faults.fetch_add(1, Ordering::Relaxed);
                Err(fault)
            }
        }
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::decision::addr::{Gfn, Level, PageSize};
    use crate::decision::format::{LeafAttrs, Perms, PteFormat};
    use crate::event::NullSink;
    use crate::event::RootCause;
    use crate::event::clock::ManualClock;
    use crate::iommu::iotlb::CostModel;
    use crate::table::mmu::RootRole;
    use crate::table::mmu::{Mapping, RootId, TdpMmu};
    use crate::table::page_alloc::{Arena, PageAllocator};

    #[test]
    fn domain_caches_walks_and_drops_them_on_root_update() {
        let arena = Arena::new(32).unwrap();
        let mut m = TdpMmu::new(&arena, PteFormat::EPT4, NullSink, ManualClock::new(0), 1);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        m.map(
            r,
            &Mapping {
                gfn: Gfn(0),
                frames: 512,
                hpa: Hpa(0x40_0000_0000),
                level: Level::L2,
                perms: Perms::RW,
                attrs: LeafAttrs::default(),
            },
        )
        .unwrap();
        let tlb = Iotlb::new(64, CostModel::default());
        let w = DmaWalker::native(&PteFormat::EPT4, false);
        let d = IommuDomain::new(3, w, &tlb);
        assert_eq!(
            d.dma(&arena, Iova(0), Access::Read),
            Err(DmaFault::NoRoot { iova: Iova(0) })
        );
        d.set_root(Some(m.root(r).unwrap().pa));
        d.dma(&arena, Iova(0x1000), Access::Read).unwrap();
        d.dma(&arena, Iova(0x2000), Access::Read).unwrap();
        assert_eq!(
            d.stats.iotlb_hits.load(Ordering::Relaxed),
            1,
            "second DMA hit the 2M entry"
        );
        assert_eq!(d.stats.faults.load(Ordering::Relaxed), 1);
        let out = d.set_root(Some(m.root(r).unwrap().pa));
        assert_eq!(
            out.dropped, 3,
            "the 2M leaf and the PML4E and PDPTE above it"
        );
    }

    /// Two pinned 2 MiB pages A (guest 0) and B (guest 2 MiB); A split to 4 KiB leaves, and a
    /// DMA to A that leaves A's PDE in the paging-structure cache.
    fn split_a_cached<'t>(
        arena: &'t Arena,
        tlb: &'t Iotlb,
    ) -> (
        TdpMmu<&'t Arena, NullSink, ManualClock>,
        RootId,
        IommuDomain<'t>,
    ) {
        let mut m = TdpMmu::new(arena, PteFormat::EPT4, NullSink, ManualClock::new(0), 1);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        let attrs = LeafAttrs {
            pinned: true,
            ..LeafAttrs::default()
        };
        m.map(
            r,
            &Mapping {
                gfn: Gfn(0),
                frames: 1024,
                hpa: Hpa(A_HPA),
                level: Level::L2,
                perms: Perms::RW,
                attrs,
            },
        )
        .unwrap();
        m.split(r, Gfn(0), Level::L2).unwrap();
        let d = IommuDomain::new(3, DmaWalker::native(&PteFormat::EPT4, true), tlb);
        d.set_root(Some(m.root(r).unwrap().pa));
        d.dma(arena, Iova(0x1000), Access::Read).unwrap();
        assert!(tlb.tables_cached() > 0, "the walk cached A's table entries");
        (m, r, d)
    }

    const A_HPA: u64 = 0x40_0000_0000;

    #[test]
    fn an_unlinked_table_is_not_reused_before_the_invalidation_that_covers_it() {
        for deferred in [false, true] {
            let arena = Arena::new(32).unwrap();
            let tlb = Iotlb::new(64, CostModel::default());
            let (mut m, r, d) = split_a_cached(&arena, &tlb);
            m.set_defer_free(deferred);
            // One operation collapses A and splits B; its flush is batched to the end, so the
            // IOMMU's cached PDE of A still points at A's old table of small leaves.
            m.collapse(r, Gfn(0), Level::L2).unwrap();
            // A grace period passes: no software walker holds A's old table any more — the
            // arena's RCU-like scheme would let it be reused, the IOMMU's cache takes no part.
            arena.reclaim();
            m.split(r, Gfn(512), Level::L2).unwrap();
            let t = d.dma(&arena, Iova(0x2000), Access::Read).unwrap();
            if deferred {
                // The stale walk reads A's old table: the old translation, still A's memory.
                assert_eq!(t.hpa, Hpa(A_HPA + 0x2000));
            } else {
                // The table was retired and reused for B: A's address reaches B's memory.
                assert_eq!(t.hpa, Hpa(A_HPA + (2 << 20) + 0x2000), "old behaviour");
                continue;
            }
            assert_eq!(m.unlinked_span(), Some((Gfn(0), Gfn(512))));
            // A leaf-only flush keeps the cached PDE: the table still may not go.
            d.flush(FlushRequest::Range {
                domain: 3,
                iova: Iova(0),
                size: 4 << 20,
                leaf_only: true,
            });
            assert!(tlb.tables_cached() > 0);
            // The full invalidation of A's range drops it; then the table is retired.
            d.flush(FlushRequest::Range {
                domain: 3,
                iova: Iova(0),
                size: 4 << 20,
                leaf_only: false,
            });
            assert_eq!(m.release_unlinked(Some((Gfn(0), Gfn(1024)))).tables, 1);
            assert_eq!(m.unlinked_span(), None);
            let t = d.dma(&arena, Iova(0x3000), Access::Read).unwrap();
            assert_eq!(t.hpa, Hpa(A_HPA + 0x3000));
            assert_eq!(
                t.page_size,
                PageSize::Size2M,
                "walked the new huge leaf from the root"
            );
        }
    }

    #[test]
    fn a_dirty_bit_set_through_a_stale_entry_reaches_the_dirty_log() {
        let arena = Arena::new(32).unwrap();
        let tlb = Iotlb::new(64, CostModel::default());
        let (mut m, r, d) = split_a_cached(&arena, &tlb);
        m.set_defer_free(true);
        m.collapse(r, Gfn(0), Level::L2).unwrap();
        // The dirty-log harvest: 4 KiB frames reported dirty (and cleared).
        let huge_dirty = |m: &mut TdpMmu<&Arena, NullSink, ManualClock>| {
            assert_eq!(m.lookup(r, Gfn(5)).unwrap().unwrap().level, Level::L2);
            m.clear_dirty(r, Gfn(0), 512).unwrap().1 > 0
        };
        assert!(!huge_dirty(&mut m), "nothing written before the collapse");
        // The device writes page 5 of A through the stale PDE: D lands in the unlinked table.
        d.dma(&arena, Iova(0x5000), Access::Write).unwrap();
        assert!(!huge_dirty(&mut m));
        d.flush(FlushRequest::Range {
            domain: 3,
            iova: Iova(0),
            size: 2 << 20,
            leaf_only: false,
        });
        let released = m.release_unlinked(Some((Gfn(0), Gfn(512))));
        assert_eq!(released.late_dirty, 1);
        assert!(
            huge_dirty(&mut m),
            "the late write is in the huge leaf's D bit"
        );
    }

    /// An arena whose read-side section opens only after `hook` ran: the writer gets in
    /// between a DMA's IOTLB miss and the start of its walk.
    struct LateSection<'a> {
        arena: &'a Arena,
        hook: std::sync::Mutex<Option<Box<dyn FnOnce() + Send + 'a>>>,
    }

    impl PageAllocator for LateSection<'_> {
        type ReadGuard<'g>
            = <Arena as PageAllocator>::ReadGuard<'g>
        where
            Self: 'g;

        fn alloc_table(&self, init: u64) -> Option<Hpa> {
            self.arena.alloc_table(init)
        }
        fn free_table(&self, pa: Hpa) {
            self.arena.free_table(pa);
        }
        fn table(&self, pa: Hpa) -> Option<&crate::table::page_alloc::Table> {
            self.arena.table(pa)
        }
        fn read_lock(&self) -> Self::ReadGuard<'_> {
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
            self.arena.read_lock()
        }
        fn pages_in_use(&self) -> u64 {
            self.arena.pages_in_use()
        }
    }

    #[test]
    fn a_root_switched_and_freed_before_the_walk_starts_is_never_walked() {
        let arena = Arena::new(32).unwrap();
        let mut m = TdpMmu::new(&arena, PteFormat::EPT4, NullSink, ManualClock::new(0), 1);
        let mapping = Mapping {
            gfn: Gfn(0),
            frames: 512,
            hpa: Hpa(A_HPA),
            level: Level::L2,
            perms: Perms::RW,
            attrs: LeafAttrs::default(),
        };
        let old = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        let new = m
            .alloc_root(RootRole::NORMAL, RootCause::MemslotChange)
            .unwrap();
        m.map(old, &mapping).unwrap();
        m.map(new, &mapping).unwrap();
        let (old_pa, new_pa) = (m.root(old).unwrap().pa, m.root(new).unwrap().pa);
        let tlb = Iotlb::new(64, CostModel::default());
        let d = IommuDomain::new(3, DmaWalker::native(&PteFormat::EPT4, false), &tlb);
        d.set_root(Some(old_pa));
        // Between the IOTLB miss and the walk: the root update, the old root page retired, a
        // grace period, and the page reused as an empty table.
        let nonpresent = PteFormat::EPT4.nonpresent;
        let alloc = LateSection {
            arena: &arena,
            hook: std::sync::Mutex::new(Some(Box::new(|| {
                d.set_root(Some(new_pa));
                arena.free_table(old_pa);
                arena.reclaim();
                assert_eq!(arena.alloc_table(nonpresent), Some(old_pa));
            }))),
        };
        let t = d.dma(&alloc, Iova(0x1000), Access::Read);
        assert_eq!(t.map(|t| t.hpa), Ok(Hpa(A_HPA + 0x1000)));
    }
}
