//! The IOMMU's hardware page walker: translates an IO-virtual address through a table exactly as
//! the hardware would.
//!
//! Locking rule: `translate` takes `&self` and may run on any number of threads at once,
//! concurrently with the TDP MMU's writer; a walk holds the allocator's read-side section.

use core::fmt;
use core::sync::atomic::Ordering;

use crate::decision::addr::{Hpa, Iova, Level, PageSize};
use crate::decision::format::{Perms, PteFormat};
use crate::table::page_alloc::PageAllocator;

/// The direction of a DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    /// A write when `write`, else a read.
    pub const fn of(write: bool) -> Access {
        if write { Access::Write } else { Access::Read }
    }

    /// The right the access needs.
    pub const fn needs(self) -> Perms {
        match self {
            Access::Read => Perms::R,
            Access::Write => Perms::W,
        }
    }
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Host physical address of the IOVA's byte.
    pub hpa: Hpa,
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
    NotPresent { iova: Iova, level: Level },
    /// The leaf does not grant the access.
    Permission { iova: Iova, access: Access },
    /// A reserved bit or an unsupported superpage at `level`.
    Reserved { iova: Iova, level: Level },
    /// The IOVA is beyond the table's address width.
    AddressWidth { iova: Iova },
    /// An entry points outside page-table memory.
    BadTable { iova: Iova, level: Level },
    /// The domain has no table attached.
    NoRoot { iova: Iova },
}

impl fmt::Display for DmaFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaFault::NotPresent { iova, level } => {
                write!(f, "DMA to {iova}: not present at level {level}")
            }
            DmaFault::Permission { iova, access } => {
                write!(f, "DMA {access:?} to {iova}: not permitted")
            }
            DmaFault::Reserved { iova, level } => {
                write!(f, "DMA to {iova}: reserved bits set at level {level}")
            }
            DmaFault::AddressWidth { iova } => {
                write!(f, "DMA to {iova}: beyond the address width")
            }
            DmaFault::BadTable { iova, level } => {
                write!(f, "DMA to {iova}: bad table pointer at level {level}")
            }
            DmaFault::NoRoot { iova } => write!(f, "DMA to {iova}: no table attached"),
        }
    }
}

/// The hardware page walker of one IOMMU configuration.
#[derive(Debug, Clone, Copy)]
pub struct DmaWalker {
    pub format: PteFormat,
    /// Largest leaf level the IOMMU accepts (superpage support).
    pub max_leaf_level: Level,
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
        root: Hpa,
        iova: Iova,
        access: Access,
    ) -> Result<Translation, DmaFault> {
        let f = &self.format;
        let gfn = iova.gfn();
        if gfn >= f.gfn_limit() {
            return Err(DmaFault::AddressWidth { iova });
        }
        let _section = alloc.read_lock();
        let mut table_pa = root;
        let mut level = f.levels;
        loop {
            let table = alloc
                .table(table_pa)
                .ok_or(DmaFault::BadTable { iova, level })?;
            let sptep = &table[level.index(gfn)];
            let e = sptep.load(Ordering::Acquire);
            if e & self.present_mask() == 0 {
                return Err(DmaFault::NotPresent { iova, level });
            }
            if f.user != 0 && e & f.user == 0 {
                // x86-64 format: device requests are user-mode accesses.
                return Err(DmaFault::Permission { iova, access });
            }
            let below = match level.down() {
                Some(below) if e & f.huge == 0 => below,
                _ => {
                    return self.leaf(sptep, e, level, iova, access);
                }
            };
            table_pa = f.addr(e);
            level = below;
        }
    }

    fn leaf(
        &self,
        sptep: &core::sync::atomic::AtomicU64,
        e: u64,
        level: Level,
        iova: Iova,
        access: Access,
    ) -> Result<Translation, DmaFault> {
        let f = &self.format;
        let page_size = match level.page_size() {
            Some(size) if level <= self.max_leaf_level => size,
            _ => return Err(DmaFault::Reserved { iova, level }),
        };
        let base = f.addr(e);
        if !base.is_aligned(level.size()) {
            return Err(DmaFault::Reserved { iova, level });
        }
        let perms = f.perms(e);
        if !perms.contains(access.needs()) {
            return Err(DmaFault::Permission { iova, access });
        }
        if self.set_ad {
            let want = f.accessed | if access == Access::Write { f.dirty } else { 0 };
            if e & want != want {
                sptep.fetch_or(want, Ordering::AcqRel);
            }
        }
        Ok(Translation {
            hpa: base + (iova.0 & (level.size() - 1)),
            page_size,
            perms,
            snoop: f.snp != 0 && e & f.snp != 0,
        })
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::decision::addr::Gfn;
    use crate::decision::format::LeafAttrs;
    use crate::event::clock::ManualClock;
    use crate::event::{NullSink, RootCause};
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
                gfn: Gfn(0),
                frames: 512,
                hpa: Hpa(G),
                level: Level::L2,
                perms: Perms::RW,
                attrs,
            },
        )
        .unwrap(); // 0..2M: one 2M leaf
        m.map(
            r,
            &Mapping {
                gfn: Gfn(512),
                frames: 1,
                hpa: Hpa(G + 0x10_0000),
                level: Level::L1,
                perms: Perms::R,
                attrs,
            },
        )
        .unwrap(); // 2M: read-only 4K
        m.map(
            r,
            &Mapping {
                gfn: Gfn(1 << 18),
                frames: 1 << 18,
                hpa: Hpa(G + (1 << 30)),
                level: Level::L3,
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
                max_leaf_level: Level::L3,
                set_ad: false,
            };
            let t = w
                .translate(&arena, root, Iova(0x1f_f123), Access::Write)
                .unwrap();
            assert_eq!(t.hpa, Hpa(G + 0x1f_f123), "{format}");
            assert_eq!(t.page_size, PageSize::Size2M);
            assert_eq!(
                t.snoop,
                format.snp != 0,
                "{format}: SNP only where the format has it"
            );
            let t = w
                .translate(&arena, root, Iova((1 << 30) + 0x1234_5678), Access::Read)
                .unwrap();
            assert_eq!(
                (t.hpa, t.page_size),
                (Hpa(G + (1 << 30) + 0x1234_5678), PageSize::Size1G)
            );
            assert_eq!(
                w.translate(&arena, root, Iova(0x20_0010), Access::Write),
                Err(DmaFault::Permission {
                    iova: Iova(0x20_0010),
                    access: Access::Write
                })
            );
            assert!(
                w.translate(&arena, root, Iova(0x20_0010), Access::Read)
                    .is_ok()
            );
            assert!(matches!(
                w.translate(&arena, root, Iova(0x20_1000), Access::Read),
                Err(DmaFault::NotPresent {
                    level: Level::L1,
                    ..
                })
            ));
            assert!(matches!(
                w.translate(&arena, root, Iova(1 << 40), Access::Read),
                Err(DmaFault::NotPresent { .. })
            ));
            let beyond = format.gfn_limit().iova();
            assert_eq!(
                w.translate(&arena, root, beyond, Access::Read),
                Err(DmaFault::AddressWidth { iova: beyond })
            );
            assert_eq!(
                w.translate(&arena, Hpa(0xdead_b000), Iova(0), Access::Read),
                Err(DmaFault::BadTable {
                    iova: Iova(0),
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
            max_leaf_level: Level::L2,
            set_ad: false,
        };
        let root = m.root(r).unwrap().pa;
        assert_eq!(
            w.translate(&arena, root, Iova(1 << 30), Access::Read),
            Err(DmaFault::Reserved {
                iova: Iova(1 << 30),
                level: Level::L3
            })
        );
    }

    #[test]
    fn accessed_and_dirty_are_set_on_use() {
        let arena = Arena::new(32).unwrap();
        let (m, r) = setup(&arena, PteFormat::EPT4);
        let w = DmaWalker {
            format: PteFormat::EPT4,
            max_leaf_level: Level::L3,
            set_ad: true,
        };
        let root = m.root(r).unwrap().pa;
        w.translate(&arena, root, Iova(0x1000), Access::Write)
            .unwrap();
        let leaf = m.leaves(r).unwrap()[0];
        assert_eq!(leaf.level, Level::L2);
        let l = m.lookup(r, Gfn(0)).unwrap().unwrap();
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
}
