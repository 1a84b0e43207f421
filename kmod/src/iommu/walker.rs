//! The IOMMU's hardware page walker: translates an IO-virtual address through a table exactly as
//! the hardware would.
//!
//! Locking rule: `translate` takes `&self` and may run on any number of threads at once,
//! concurrently with the TDP MMU's writer; a walk holds the allocator's read-side section.

use core::fmt;
use core::sync::atomic::Ordering;

use crate::decision::addr::{Hpa, Iova, Level, PageSize};
use crate::decision::format::{Kind, Perms, PteFormat};
use crate::decision::iommu::{IommuFormat, IommuMode};
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

/// The hardware page walker of one IOMMU configuration: it reads KVM's entries by the IOMMU's
/// own rules ([`IommuFormat`]), not by KVM's.
#[derive(Debug, Clone, Copy)]
pub struct DmaWalker {
    /// How the IOMMU reads entries.
    pub rules: IommuFormat,
    /// The level of the root it is pointed at (4 or 5).
    pub levels: Level,
    /// Largest leaf level the IOMMU accepts (superpage support).
    pub max_leaf_level: Level,
}

impl DmaWalker {
    /// The walker of the IOMMU that natively walks `format`'s kind — VT-d second-level
    /// (scalable mode, snoop control) for EPT, AMD v2 for NPT — with A/D updates if `ad`.
    pub const fn native(format: &PteFormat, ad: bool) -> DmaWalker {
        let rules = match format.kind {
            Kind::Ept => IommuFormat::vtd(48, IommuMode::VtdScalable, true, ad),
            Kind::Npt => IommuFormat::amd_v2(52, ad),
        };
        DmaWalker {
            rules,
            levels: format.levels,
            max_leaf_level: format.max_huge_level,
        }
    }

    /// One past the highest IOVA frame the walk reaches.
    const fn gfn_limit(&self) -> u64 {
        self.levels.table_frames()
    }

    /// Translates `iova` for `access` by walking the table at `root`. Locking rule: the caller
    /// holds the allocator's read-side section (see [`DmaWalker::translate`]).
    pub fn translate_locked<A: PageAllocator>(
        &self,
        alloc: &A,
        root: Hpa,
        iova: Iova,
        access: Access,
    ) -> Result<Translation, DmaFault> {
        self.walk_from(alloc, root, self.levels, iova, access, &mut |_, _| {})
    }

    /// Translates `iova` for `access` starting at `table`, a table at `level` (the root, or a
    /// table a paging-structure cache entry points at); `visit(level, child)` sees every table
    /// entry the walk follows. Locking rule: the caller holds the allocator's read-side section.
    pub fn walk_from<A: PageAllocator>(
        &self,
        alloc: &A,
        table: Hpa,
        level: Level,
        iova: Iova,
        access: Access,
        visit: &mut dyn FnMut(Level, Hpa),
    ) -> Result<Translation, DmaFault> {
        let r = &self.rules;
        let gfn = iova.gfn();
        if gfn.0 >= self.gfn_limit() {
            return Err(DmaFault::AddressWidth { iova });
        }
        let mut table_pa = table;
        let mut level = level;
        loop {
            let table = alloc
                .table(table_pa)
                .ok_or(DmaFault::BadTable { iova, level })?;
            let sptep = &table[level.index(gfn)];
            let e = sptep.load(Ordering::Acquire);
            if !r.is_present(e) {
                return Err(DmaFault::NotPresent { iova, level });
            }
            // Rights first, then reserved bits (the order QEMU's VT-d checks them in).
            if !r.perms(e).contains(access.needs()) {
                return Err(DmaFault::Permission { iova, access });
            }
            let leaf = r.is_leaf(e, level);
            if e & r.reserved(level, leaf) != 0 {
                return Err(DmaFault::Reserved { iova, level });
            }
            if r.user != 0 && e & r.user == 0 {
                // x86-64 format: device requests are user-mode accesses.
                return Err(DmaFault::Permission { iova, access });
            }
            if r.sets_ad() {
                let want = r.accessed
                    | if leaf && access == Access::Write {
                        r.dirty
                    } else {
                        0
                    };
                if e & want != want {
                    sptep.fetch_or(want, Ordering::AcqRel);
                }
            }
            if !leaf {
                match level.down() {
                    Some(below) => {
                        table_pa = r.addr(e);
                        visit(level, table_pa);
                        level = below;
                        continue;
                    }
                    None => return Err(DmaFault::Reserved { iova, level }),
                }
            }
            let page_size = match level.page_size() {
                Some(size) if level <= self.max_leaf_level => size,
                _ => return Err(DmaFault::Reserved { iova, level }),
            };
            return Ok(Translation {
                hpa: r.addr(e) + (iova.0 & (level.size() - 1)),
                page_size,
                perms: r.perms(e),
                snoop: r.snp_in_leaves && e & r.snp != 0,
            });
        }
    }

    /// Translates `iova` for `access` by walking the table at `root`, in a read-side section of
    /// the allocator of its own.
    pub fn translate<A: PageAllocator>(
        &self,
        alloc: &A,
        root: Hpa,
        iova: Iova,
        access: Access,
    ) -> Result<Translation, DmaFault> {
        let _section = alloc.read_lock();
        self.translate_locked(alloc, root, iova, access)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::decision::addr::Gfn;
    use crate::decision::format::LeafAttrs;
    use crate::event::clock::ManualClock;
    use crate::event::{NullSink, RootCause};
    use crate::table::mmu::RootRole;
    use crate::table::mmu::{Mapping, RootId, TdpMmu};
    use crate::table::page_alloc::Arena;

    const G: u64 = 0x40_0000_0000;

    fn setup(arena: &Arena, format: PteFormat) -> (TdpMmu<&Arena, NullSink, ManualClock>, RootId) {
        let mut m = TdpMmu::new(arena, format, NullSink, ManualClock::new(0), 1);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
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
            let w = DmaWalker::native(&format, false);
            let t = w
                .translate(&arena, root, Iova(0x1f_f123), Access::Write)
                .unwrap();
            assert_eq!(t.hpa, Hpa(G + 0x1f_f123), "{format}");
            assert_eq!(t.page_size, PageSize::Size2M);
            assert_eq!(
                t.snoop,
                format.kind == Kind::Ept,
                "{format}: SNP only where the IOMMU has it"
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
            max_leaf_level: Level::L2,
            ..DmaWalker::native(&PteFormat::EPT4, false)
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
        let w = DmaWalker::native(&PteFormat::EPT4, true);
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

    #[test]
    fn reserved_bits_fault_as_the_hardware_does() {
        use crate::decision::caps::IommuCaps;
        use crate::decision::format::{Kind, Layout};
        // Linux 6.12's own NPT entries, walked by QEMU's VT-d: MMU-present is bit 11, which
        // VT-d reserves in non-leaf entries — the walk fails at level 4 (what the lab saw).
        let qemu = |snoop| DmaWalker {
            rules: IommuCaps::qemu_vtd(false, snoop).format(),
            levels: Level::L4,
            max_leaf_level: Level::L3,
        };
        for (layout, want) in [
            (
                Layout::Stock,
                Err(DmaFault::Reserved {
                    iova: Iova(0x1234),
                    level: Level::L4,
                }),
            ),
            (Layout::Sharing, Ok(Hpa(G + 0x1234))),
        ] {
            let format = PteFormat::with_layout(Kind::Npt, 4, layout).unwrap();
            let arena = Arena::new(32).unwrap();
            let (m, r) = setup(&arena, format);
            let root = m.root(r).unwrap().pa;
            let got = qemu(true)
                .translate(&arena, root, Iova(0x1234), Access::Read)
                .map(|t| t.hpa);
            assert_eq!(got, want, "{format}");
        }
        // SNP in a leaf is reserved on a legacy unit without snoop control.
        let arena = Arena::new(32).unwrap();
        let (m, r) = setup(&arena, PteFormat::EPT4);
        let root = m.root(r).unwrap().pa;
        assert_eq!(
            qemu(false).translate(&arena, root, Iova(0x1000), Access::Read),
            Err(DmaFault::Reserved {
                iova: Iova(0x1000),
                level: Level::L2
            })
        );
        assert!(
            qemu(true)
                .translate(&arena, root, Iova(0x1000), Access::Read)
                .unwrap()
                .snoop
        );
    }

    #[test]
    fn an_mmio_spte_is_a_dma_target_so_none_may_be_in_a_walked_table() {
        let mmio = Gfn(0xfeb00);
        // KVM's MMIO SPTEs are not present to the CPU, but an IOMMU reads them its own way: EPT
        // ones are write+execute, and VT-d writes to the address they hold. (NPT ones are
        // present with reserved bit 51, which a VT-d of 48-bit width — the lab's — reserves
        // too; one of 52 bits would read through.) Hence the series installs none while an
        // IOMMU walks the table (the engine's fault path).
        let vtd = crate::decision::caps::IommuCaps::qemu_vtd(false, true).format();
        let walker = DmaWalker {
            rules: vtd,
            levels: Level::L4,
            max_leaf_level: Level::L3,
        };
        for format in [PteFormat::EPT4, PteFormat::NPT4] {
            let arena = Arena::new(32).unwrap();
            let mut m = TdpMmu::new(&arena, format, NullSink, ManualClock::new(0), 1);
            let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
            assert!(m.map_mmio(r, mmio, 42).unwrap(), "{format}");
            m.check_well_formed(r).unwrap();
            let root = m.root(r).unwrap().pa;
            let access = match format.kind {
                crate::decision::format::Kind::Ept => Access::Write,
                crate::decision::format::Kind::Npt => Access::Read,
            };
            let got = walker.translate(&arena, root, mmio.iova(), access);
            match format.kind {
                crate::decision::format::Kind::Ept => {
                    assert_eq!(got.map(|t| t.hpa), Ok(Hpa(mmio.gpa().0)), "{format}")
                }
                crate::decision::format::Kind::Npt => assert_eq!(
                    got,
                    Err(DmaFault::Reserved {
                        iova: mmio.iova(),
                        level: Level::L1
                    }),
                    "{format}"
                ),
            }
            assert!(!format.layout.mmio_while_walked());
            // Taken away, it is not present.
            assert_eq!(m.zap_mmio(r).unwrap(), 1);
            let got = walker.translate(&arena, root, mmio.iova(), access);
            assert_eq!(
                got,
                Err(DmaFault::NotPresent {
                    iova: mmio.iova(),
                    level: Level::L1
                }),
                "{format}"
            );
        }
    }
}
