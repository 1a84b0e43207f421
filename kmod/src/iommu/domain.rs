//! An IOMMU domain whose table is a TDP root: the walker, the root pointer and the IOTLB in
//! front of them — the device side of sharing.
//!
//! Locking rule: everything takes `&self` and may run on any number of threads at once,
//! concurrently with the TDP MMU's writer.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::decision::addr::{Hpa, Iova};
use crate::iommu::iotlb::{FlushOutcome, FlushRequest, Iotlb, IotlbEntry};
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
        match self.walker.translate_locked(alloc, root, iova, access) {
            Ok(t) => {
                self.iotlb
                    .fill(generation, IotlbEntry::new(self.id, iova, t));
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
    use crate::decision::addr::{Gfn, Level};
    use crate::decision::format::{LeafAttrs, Perms, PteFormat};
    use crate::event::NullSink;
    use crate::event::RootCause;
    use crate::event::clock::ManualClock;
    use crate::iommu::iotlb::CostModel;
    use crate::table::mmu::{Mapping, TdpMmu};
    use crate::table::page_alloc::Arena;

    #[test]
    fn domain_caches_walks_and_drops_them_on_root_update() {
        let arena = Arena::new(32).unwrap();
        let mut m = TdpMmu::new(&arena, PteFormat::EPT4, NullSink, ManualClock::new(0), 1);
        let r = m.alloc_root(false, RootCause::Initial).unwrap();
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
        assert_eq!(out.dropped, 1);
    }
}
