//! The IOMMU side: a DMA page walker that translates an IO virtual address through the shared
//! table exactly as the hardware would, and a domain that puts the IOTLB in front of it.
//!
//! Locking rule: everything here takes `&self` and may run on any number of threads at once,
//! concurrently with the TDP MMU's writer; a walk holds the allocator's read-side section.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::decision::format::{Perms, PteFormat};
use crate::event::PageSize;
use crate::iommu::iotlb::{FlushOutcome, FlushRequest, Iotlb, IotlbEntry};
use crate::table::page_alloc::{PageAllocator, PhysAddr};

/// The direction of a DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Host physical address of the IOVA's byte.
    pub hpa: u64,
    pub page_size: PageSize,
    pub perms: Perms,
    /// The entry forces snooping (VT-d SNP).
    pub snoop: bool,
}

/// A DMA the IOMMU blocks (reported to the fault log, or as an IO page fault where the device
/// supports them). Never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaFault {
    /// No present entry at `level`.
    NotPresent { iova: u64, level: u8 },
    /// The leaf does not grant the access.
    Permission { iova: u64, access: Access },
    /// A reserved bit or an unsupported superpage at `level`.
    Reserved { iova: u64, level: u8 },
    /// The IOVA is beyond the table's address width.
    AddressWidth { iova: u64 },
    /// An entry points outside page-table memory.
    BadTable { iova: u64, level: u8 },
    /// The domain has no table attached.
    NoRoot { iova: u64 },
}

impl fmt::Display for DmaFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaFault::NotPresent { iova, level } => {
                write!(f, "DMA to {iova:#x}: not present at level {level}")
            }
            DmaFault::Permission { iova, access } => {
                write!(f, "DMA {access:?} to {iova:#x}: not permitted")
            }
            DmaFault::Reserved { iova, level } => {
                write!(f, "DMA to {iova:#x}: reserved bits set at level {level}")
            }
            DmaFault::AddressWidth { iova } => {
                write!(f, "DMA to {iova:#x}: beyond the address width")
            }
            DmaFault::BadTable { iova, level } => {
                write!(f, "DMA to {iova:#x}: bad table pointer at level {level}")
            }
            DmaFault::NoRoot { iova } => write!(f, "DMA to {iova:#x}: no table attached"),
        }
    }
}

/// The hardware page walker of one IOMMU configuration.
#[derive(Debug, Clone, Copy)]
pub struct DmaWalker {
    pub format: PteFormat,
    /// Largest leaf level the IOMMU accepts (superpage support).
    pub max_leaf_level: u8,
    /// The IOMMU sets accessed/dirty bits on use (VT-d SLADE, AMD HA/HD).
    pub set_ad: bool,
}

impl DmaWalker {
    /// What the IOMMU treats as present: VT-d second-level has no present bit (R or W), the
    /// x86-64 format has P.
    const fn present_mask(&self) -> u64 {
        if self.format.present != 0 {
            self.format.present
        } else {
            self.format.read | self.format.write
        }
    }

    /// Translates `iova` for `access` by walking the table at `root`.
    pub fn translate<A: PageAllocator>(
        &self,
        alloc: &A,
        root: PhysAddr,
        iova: u64,
        access: Access,
    ) -> Result<Translation, DmaFault> {
        let f = &self.format;
        if iova >> 12 >= f.gfn_limit() {
            return Err(DmaFault::AddressWidth { iova });
        }
        let gfn = iova >> 12;
        let _section = alloc.read_lock();
        let mut table_pa = root;
        let mut level = f.levels;
        loop {
            let table = alloc
                .table(table_pa)
                .ok_or(DmaFault::BadTable { iova, level })?;
            let sptep = &table[PteFormat::index(gfn, level)];
            let e = sptep.load(Ordering::Acquire);
            if e & self.present_mask() == 0 {
                return Err(DmaFault::NotPresent { iova, level });
            }
            if f.user != 0 && e & f.user == 0 {
                // x86-64 format: device requests are user-mode accesses.
                return Err(DmaFault::Permission { iova, access });
            }
            let leaf = level == 1 || e & f.huge != 0;
            if !leaf {
                table_pa = f.addr(e);
                level -= 1;
                continue;
            }
            if level > self.max_leaf_level {
                return Err(DmaFault::Reserved { iova, level });
            }
            let size = PteFormat::level_size(level);
            let base = f.addr(e);
            if base & (size - 1) != 0 {
                return Err(DmaFault::Reserved { iova, level });
            }
            let perms = f.perms(e);
            let need = match access {
                Access::Read => Perms::R,
                Access::Write => Perms::W,
            };
            if !perms.contains(need) {
                return Err(DmaFault::Permission { iova, access });
            }
            if self.set_ad {
                let want = f.accessed | if access == Access::Write { f.dirty } else { 0 };
                if e & want != want {
                    sptep.fetch_or(want, Ordering::AcqRel);
                }
            }
            return Ok(Translation {
                hpa: base + (iova & (size - 1)),
                page_size: PageSize::from_level(level).unwrap_or(PageSize::Size4K),
                perms,
                snoop: f.snp != 0 && e & f.snp != 0,
            });
        }
    }
}

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

    pub fn root(&self) -> PhysAddr {
        self.root.load(Ordering::Acquire)
    }

    /// Points the domain at a new root (the root-update notification) and drops every cached
    /// translation of the old one.
    pub fn set_root(&self, root: PhysAddr) -> FlushOutcome {
        self.root.store(root, Ordering::Release);
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
        iova: u64,
        access: Access,
    ) -> Result<Translation, DmaFault> {
        self.stats.translations.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = self.iotlb.lookup(self.id, iova, access) {
            self.stats.iotlb_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(t);
        }
        self.stats.walks.fetch_add(1, Ordering::Relaxed);
        let generation = self.iotlb.generation();
        let root = self.root();
        if root == 0 {
            self.stats.faults.fetch_add(1, Ordering::Relaxed);
            return Err(DmaFault::NoRoot { iova });
        }
        match self.walker.translate(alloc, root, iova, access) {
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
    use crate::decision::format::LeafAttrs;
    use crate::event::clock::ManualClock;
    use crate::event::{NullSink, RootCause};
    use crate::iommu::iotlb::CostModel;
    use crate::table::mmu::{Mapping, RootId, TdpMmu};
    use crate::table::page_alloc::Arena;

    const G: u64 = 0x40_0000_0000;

    fn setup(arena: &Arena, format: PteFormat) -> (TdpMmu<&Arena, NullSink, ManualClock>, RootId) {
        let mut m = TdpMmu::new(arena, format, NullSink, ManualClock::new(0), 1);
        let r = m.alloc_root(false, RootCause::Initial).unwrap();
        let attrs = LeafAttrs {
            snoop: true,
            ..LeafAttrs::default()
        };
        m.map(
            r,
            &Mapping {
                gfn: 0,
                frames: 512,
                hpa: G,
                level: 2,
                perms: Perms::RW,
                attrs,
            },
        )
        .unwrap(); // 0..2M: one 2M leaf
        m.map(
            r,
            &Mapping {
                gfn: 512,
                frames: 1,
                hpa: G + 0x10_0000,
                level: 1,
                perms: Perms::R,
                attrs,
            },
        )
        .unwrap(); // 2M: read-only 4K
        m.map(
            r,
            &Mapping {
                gfn: 1 << 18,
                frames: 1 << 18,
                hpa: G + (1 << 30),
                level: 3,
                perms: Perms::RW,
                attrs,
            },
        )
        .unwrap(); // 1G..2G: one 1G leaf
        (m, r)
    }

    #[test]
    fn walks_both_formats_like_hardware() {
        for format in PteFormat::ALL {
            let arena = Arena::new(32).unwrap();
            let (m, r) = setup(&arena, format);
            let root = m.root(r).unwrap().pa;
            let w = DmaWalker {
                format,
                max_leaf_level: 3,
                set_ad: false,
            };
            let t = w.translate(&arena, root, 0x1f_f123, Access::Write).unwrap();
            assert_eq!(t.hpa, G + 0x1f_f123, "{format}");
            assert_eq!(t.page_size, PageSize::Size2M);
            assert_eq!(
                t.snoop,
                format.snp != 0,
                "{format}: SNP only where the format has it"
            );
            let t = w
                .translate(&arena, root, (1 << 30) + 0x1234_5678, Access::Read)
                .unwrap();
            assert_eq!(
                (t.hpa, t.page_size),
                (G + (1 << 30) + 0x1234_5678, PageSize::Size1G)
            );
            assert_eq!(
                w.translate(&arena, root, 0x20_0010, Access::Write),
                Err(DmaFault::Permission {
                    iova: 0x20_0010,
                    access: Access::Write
                })
            );
            assert!(w.translate(&arena, root, 0x20_0010, Access::Read).is_ok());
            assert!(matches!(
                w.translate(&arena, root, 0x20_1000, Access::Read),
                Err(DmaFault::NotPresent { level: 1, .. })
            ));
            assert!(matches!(
                w.translate(&arena, root, 1 << 40, Access::Read),
                Err(DmaFault::NotPresent { .. })
            ));
            let beyond = format.gfn_limit() << 12;
            assert_eq!(
                w.translate(&arena, root, beyond, Access::Read),
                Err(DmaFault::AddressWidth { iova: beyond })
            );
            assert_eq!(
                w.translate(&arena, 0xdead_b000, 0, Access::Read),
                Err(DmaFault::BadTable {
                    iova: 0,
                    level: format.levels
                })
            );
        }
    }

    #[test]
    fn superpage_the_iommu_lacks_is_a_fault_not_a_translation() {
        let arena = Arena::new(32).unwrap();
        let (m, r) = setup(&arena, PteFormat::EPT4);
        let w = DmaWalker {
            format: PteFormat::EPT4,
            max_leaf_level: 2,
            set_ad: false,
        };
        let root = m.root(r).unwrap().pa;
        assert_eq!(
            w.translate(&arena, root, 1 << 30, Access::Read),
            Err(DmaFault::Reserved {
                iova: 1 << 30,
                level: 3
            })
        );
    }

    #[test]
    fn accessed_and_dirty_are_set_on_use() {
        let arena = Arena::new(32).unwrap();
        let (m, r) = setup(&arena, PteFormat::EPT4);
        let w = DmaWalker {
            format: PteFormat::EPT4,
            max_leaf_level: 3,
            set_ad: true,
        };
        let root = m.root(r).unwrap().pa;
        w.translate(&arena, root, 0x1000, Access::Write).unwrap();
        let leaf = m.leaves(r).unwrap()[0];
        assert_eq!(leaf.level, 2);
        let l = m.lookup(r, 0).unwrap().unwrap();
        let flags = PteFormat::EPT4.leaf(l.hpa, l.level, l.perms, l.attrs);
        // The table entry itself has A and D now.
        let pdpt = arena.table(root).unwrap()[0].load(Ordering::Relaxed);
        let pd = arena.table(PteFormat::EPT4.addr(pdpt)).unwrap()[0].load(Ordering::Relaxed);
        let pde = arena.table(PteFormat::EPT4.addr(pd)).unwrap()[0].load(Ordering::Relaxed);
        assert_eq!(
            pde & !(PteFormat::EPT4.accessed | PteFormat::EPT4.dirty),
            flags
        );
        assert_ne!(pde & PteFormat::EPT4.dirty, 0);
    }

    #[test]
    fn domain_caches_walks_and_drops_them_on_root_update() {
        let arena = Arena::new(32).unwrap();
        let (m, r) = setup(&arena, PteFormat::EPT4);
        let tlb = Iotlb::new(64, CostModel::default());
        let w = DmaWalker {
            format: PteFormat::EPT4,
            max_leaf_level: 3,
            set_ad: false,
        };
        let d = IommuDomain::new(3, w, &tlb);
        assert_eq!(
            d.dma(&arena, 0, Access::Read),
            Err(DmaFault::NoRoot { iova: 0 })
        );
        d.set_root(m.root(r).unwrap().pa);
        d.dma(&arena, 0x1000, Access::Read).unwrap();
        d.dma(&arena, 0x2000, Access::Read).unwrap();
        assert_eq!(
            d.stats.iotlb_hits.load(Ordering::Relaxed),
            1,
            "second DMA hit the 2M entry"
        );
        assert_eq!(d.stats.faults.load(Ordering::Relaxed), 1);
        let out = d.set_root(m.root(r).unwrap().pa);
        assert_eq!(out.dropped, 1);
    }
}
