//! The TDP MMU's writers that run with `mmu_lock` held for read, concurrently with each other:
//! the fault path (`kvm_tdp_mmu_map`) and the atomic zap of one leaf
//! (`tdp_mmu_zap_spte_atomic`). Eager splits, permission changes and dirty clearing, also
//! read-lock writers, live with their write-lock siblings in the parent module.
//!
//! Locking rule (every function here): `&self` — `mmu_lock` held for read; every entry change is
//! a compare-and-swap against the value read.

use core::sync::atomic::Ordering;

use crate::decision::addr::{Gfn, Hpa, Level};
use crate::decision::format::{LeafAttrs, Perms};
use crate::event::clock::Clock;
use crate::event::{EventKind, EventSink};
use crate::table::mmu::{MmuError, Outcome, RootId, TdpMmu};
use crate::table::page_alloc::PageAllocator;

/// A fault to resolve: map `gfn` to host frame `hpa` with a leaf of level `goal` (the level
/// `kvm_mmu_hugepage_adjust` chose: host and guest alignment allow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub gfn: Gfn,
    /// Host address of `gfn`'s own frame; the leaf's frame is it aligned down to `goal`.
    pub hpa: Hpa,
    pub goal: Level,
    pub perms: Perms,
    pub attrs: LeafAttrs,
}

/// What [`TdpMmu::fault_in`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultResult {
    /// A leaf of `level` now maps the address (installed, or its rights raised).
    Mapped { level: Level, outcome: Outcome },
    /// The entry already was what the fault asked for: another writer got there first
    /// (`RET_PF_SPURIOUS`).
    Spurious { level: Level },
    /// An entry on the way was frozen, or another writer changed it between the read and the
    /// compare-and-swap: the vCPU re-enters the guest and faults again (`RET_PF_RETRY`).
    Retry,
}

impl<A: PageAllocator, S: EventSink, C: Clock> TdpMmu<A, S, C> {
    /// Resolves `fault` in `root`, as 6.12's `kvm_tdp_mmu_map`: down the walk, a missing table
    /// is linked (built empty, installed by compare-and-swap, freed again if the swap loses) and
    /// a huge leaf above the goal is split (`tdp_mmu_split_huge_page`); at the goal level the
    /// leaf is installed or its rights raised by compare-and-swap. A frozen entry or a lost
    /// swap answers [`FaultResult::Retry`].
    ///
    /// One deviation: where a table sits at the goal level (the fault could use a huge leaf
    /// but smaller ones are there), KVM replaces the table and frees its children under the
    /// read lock, freezing them; that can take pinned leaves away from an IOMMU walking the
    /// table through its paging-structure cache, so here the fault maps one level down and
    /// collapsing is left to [`TdpMmu::collapse`] under the write lock.
    ///
    /// A pinned leaf is never re-pointed ([`MmuError::PinnedRepoint`]) nor weakened
    /// ([`MmuError::PinnedRights`]).
    ///
    /// Lock: read.
    pub fn fault_in(&self, root: RootId, fault: &Fault) -> Result<FaultResult, MmuError> {
        let f = self.format;
        if fault.goal > self.max_leaf_level {
            return Err(MmuError::BadLevel {
                level: fault.goal,
                max: self.max_leaf_level,
            });
        }
        if fault.hpa.page_offset() != 0 || !f.can_address(fault.hpa) {
            return Err(MmuError::Unaligned {
                what: "hpa",
                value: fault.hpa.0,
                level: Level::L1,
            });
        }
        self.check_range(fault.gfn, 1)?;
        let root_pa = self.root(root)?.pa;
        let ad = f.ad_bits();
        let mut goal = fault.goal;
        let mut out = Outcome::default();
        let mut table_pa = root_pa;
        let mut level = f.levels;
        loop {
            let table = self.alloc.table(table_pa).ok_or(MmuError::NoRoot(root))?;
            let sptep = &table[level.index(fault.gfn)];
            let old = sptep.load(Ordering::Acquire);
            if f.is_frozen(old) {
                return Ok(FaultResult::Retry);
            }
            let present = f.is_present(old);
            let leaf = present && f.is_leaf(old, level);
            if level == goal && present && !leaf {
                // Smaller leaves are in the way of the huge one: map among them.
                match level.down() {
                    Some(below) => {
                        goal = below;
                        table_pa = f.addr(old);
                        level = below;
                        continue;
                    }
                    None => return Ok(FaultResult::Retry),
                }
            }
            if level == goal {
                let base = fault.gfn.align_down(goal);
                let hpa = Hpa(fault.hpa.0.wrapping_sub((fault.gfn - base) * 4096));
                if hpa.0 > fault.hpa.0 || !hpa.is_aligned(goal.size()) {
                    return Err(MmuError::Unaligned {
                        what: "hpa",
                        value: hpa.0,
                        level: goal,
                    });
                }
                let new = f.leaf(hpa, goal, fault.perms, fault.attrs);
                if present && old & !ad == new {
                    return Ok(FaultResult::Spurious { level: goal });
                }
                let want = if leaf && f.addr(old) == hpa {
                    if f.is_pinned(old) {
                        if f.attrs(old) != fault.attrs {
                            return Err(MmuError::PinnedRepoint { gfn: base });
                        }
                        let lost = f.perms(old).without(fault.perms);
                        if lost.bits() & Perms::RW.bits() != 0 {
                            return Err(MmuError::PinnedRights { gfn: base });
                        }
                    }
                    new | (old & ad)
                } else if leaf && f.is_pinned(old) {
                    return Err(MmuError::PinnedRepoint { gfn: base });
                } else {
                    new
                };
                if sptep
                    .compare_exchange(old, want, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    return Ok(FaultResult::Retry);
                }
                out.entries += 1;
                out.flush_needed |= present;
                self.trace_spte(base, goal, old, want);
                return Ok(FaultResult::Mapped {
                    level: goal,
                    outcome: out,
                });
            }
            let Some(below) = level.down() else {
                return Ok(FaultResult::Retry);
            };
            if present && !leaf {
                table_pa = f.addr(old);
                level = below;
                continue;
            }
            // Missing, or a huge leaf above the goal: a table goes there.
            let child = if leaf {
                let child = self
                    .alloc
                    .alloc_table_to_fill()
                    .ok_or(MmuError::OutOfMemory)?;
                let entries = self.alloc.table(child).ok_or(MmuError::OutOfMemory)?;
                let mut e = f.leaf(f.addr(old), below, f.perms(old), f.attrs(old)) | (old & ad);
                for sptep in entries.iter() {
                    sptep.store(e, Ordering::Relaxed);
                    e = e.wrapping_add(below.size());
                }
                child
            } else {
                self.alloc
                    .alloc_table(f.nonpresent)
                    .ok_or(MmuError::OutOfMemory)?
            };
            if sptep
                .compare_exchange(old, f.table(child), Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // Never linked: no walker can hold it.
                self.alloc.free_table(child);
                return Ok(FaultResult::Retry);
            }
            out.tables_allocated += 1;
            if leaf {
                let at = fault.gfn.align_down(level);
                out.flush_needed = true;
                self.trace_spte(at, level, old, f.table(child));
                self.emit(EventKind::HugePageSplit {
                    gfn: at,
                    level: level.get(),
                });
            }
            table_pa = child;
            level = below;
        }
    }

    /// Zaps the leaf mapping `gfn`, as 6.12's `tdp_mmu_zap_spte_atomic`: the leaf is frozen
    /// (`FROZEN_SPTE`, which other writers skip or retry on, and which no walker translates),
    /// `flush` runs for its range — the TLB and IOTLB invalidation — and only then the entry
    /// becomes non-present, so nothing can be installed in its place before the old
    /// translation is gone from every cache. Returns whether a leaf was zapped (`false`: none
    /// there, or another writer changed it first). A pinned leaf is refused
    /// ([`MmuError::PinnedZap`]).
    ///
    /// Lock: read.
    pub fn zap_leaf_atomic(
        &self,
        root: RootId,
        gfn: Gfn,
        flush: impl FnOnce(Gfn, Level),
    ) -> Result<bool, MmuError> {
        self.check_range(gfn, 1)?;
        let root_pa = self.root(root)?.pa;
        let f = self.format;
        let Some(pos) = self
            .walk(root_pa, Level::L1, gfn, gfn + 1)
            .find(|p| f.is_present(p.old) && f.is_leaf(p.old, p.level))
        else {
            return Ok(false);
        };
        if f.is_pinned(pos.old) {
            return Err(MmuError::PinnedZap { gfn: pos.gfn });
        }
        if pos
            .sptep
            .compare_exchange(pos.old, f.frozen(), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ok(false);
        }
        flush(pos.gfn, pos.level);
        // Nobody else writes a frozen entry: a plain store ends it.
        pos.sptep.store(f.nonpresent, Ordering::Release);
        self.trace_spte(pos.gfn, pos.level, pos.old, f.nonpresent);
        Ok(true)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::Iova;
    use crate::decision::format::{MEMTYPE_WB, PteFormat};
    use crate::event::NullSink;
    use crate::event::RootCause;
    use crate::event::clock::ManualClock;
    use crate::iommu::{Access, DmaFault, DmaWalker};
    use crate::table::mmu::Mapping;
    use crate::table::mmu::RootRole;
    use crate::table::page_alloc::Arena;

    const G: u64 = 0x40_0000_0000;
    const WB: LeafAttrs = LeafAttrs {
        memtype: MEMTYPE_WB,
        ipat: false,
        snoop: true,
        pinned: false,
    };
    const PINNED: LeafAttrs = LeafAttrs { pinned: true, ..WB };

    type Mmu<'a> = TdpMmu<&'a Arena, NullSink, ManualClock>;

    fn setup(arena: &Arena) -> (Mmu<'_>, RootId) {
        let mut m = TdpMmu::new(arena, PteFormat::EPT4, NullSink, ManualClock::new(0), 1);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        (m, r)
    }

    fn fault(gfn: u64, goal: Level, attrs: LeafAttrs) -> Fault {
        Fault {
            gfn: Gfn(gfn),
            hpa: Hpa(G + gfn * 4096),
            goal,
            perms: Perms::RW,
            attrs,
        }
    }

    #[test]
    fn a_fault_links_the_tables_it_needs_and_a_second_one_is_spurious() {
        let arena = Arena::new(16).unwrap();
        let (m, r) = setup(&arena);
        let FaultResult::Mapped { level, outcome } =
            m.fault_in(r, &fault(5, Level::L1, WB)).unwrap()
        else {
            panic!("not mapped");
        };
        assert_eq!(
            (level, outcome.tables_allocated, outcome.entries),
            (Level::L1, 3, 1)
        );
        assert!(
            !outcome.flush_needed,
            "non-present → present needs no flush"
        );
        assert_eq!(
            m.fault_in(r, &fault(5, Level::L1, WB)).unwrap(),
            FaultResult::Spurious { level: Level::L1 }
        );
        assert_eq!(m.lookup(r, Gfn(5)).unwrap().unwrap().hpa, Hpa(G + 5 * 4096));
        m.check_well_formed(r).unwrap();
    }

    #[test]
    fn a_fault_below_a_pinned_huge_leaf_splits_it_keeping_every_translation() {
        let arena = Arena::new(16).unwrap();
        let (mut m, r) = setup(&arena);
        m.map(
            r,
            &Mapping {
                gfn: Gfn(0),
                frames: 512,
                hpa: Hpa(G),
                level: Level::L2,
                perms: Perms::RW,
                attrs: PINNED,
            },
        )
        .unwrap();
        // A 4 KiB goal under the 2 MiB leaf (KVM: the NX huge page workaround): split.
        let got = m.fault_in(r, &fault(3, Level::L1, PINNED)).unwrap();
        assert_eq!(got, FaultResult::Spurious { level: Level::L1 });
        let leaf = m.lookup(r, Gfn(300)).unwrap().unwrap();
        assert_eq!((leaf.level, leaf.hpa), (Level::L1, Hpa(G + 300 * 4096)));
        assert!(leaf.attrs.pinned);
        // A pinned leaf is neither re-pointed nor weakened by a fault.
        let other = Fault {
            hpa: Hpa(2 * G),
            ..fault(3, Level::L1, PINNED)
        };
        assert_eq!(
            m.fault_in(r, &other),
            Err(MmuError::PinnedRepoint { gfn: Gfn(3) })
        );
        let weaker = Fault {
            perms: Perms::R,
            ..fault(3, Level::L1, PINNED)
        };
        assert_eq!(
            m.fault_in(r, &weaker),
            Err(MmuError::PinnedRights { gfn: Gfn(3) })
        );
        m.check_well_formed(r).unwrap();
    }

    #[test]
    fn smaller_leaves_in_the_way_of_a_huge_goal_are_joined_not_replaced() {
        let arena = Arena::new(16).unwrap();
        let (m, r) = setup(&arena);
        m.fault_in(r, &fault(0, Level::L1, WB)).unwrap();
        let got = m.fault_in(r, &fault(7, Level::L2, WB)).unwrap();
        assert!(
            matches!(
                got,
                FaultResult::Mapped {
                    level: Level::L1,
                    ..
                }
            ),
            "{got:?}"
        );
        assert_eq!(m.lookup(r, Gfn(0)).unwrap().unwrap().level, Level::L1);
    }

    #[test]
    fn a_zapped_leaf_stays_frozen_until_its_flush_is_done() {
        let arena = Arena::new(16).unwrap();
        let (m, r) = setup(&arena);
        m.fault_in(r, &fault(9, Level::L1, WB)).unwrap();
        let walker = DmaWalker::native(&PteFormat::EPT4, true);
        let root = m.root(r).unwrap().pa;
        let mut flushed = false;
        let zapped = m
            .zap_leaf_atomic(r, Gfn(9), |gfn, level| {
                // While the IOTLB is being flushed nothing may be installed in the entry, and
                // no walker translates it.
                assert_eq!((gfn, level), (Gfn(9), Level::L1));
                assert_eq!(
                    m.fault_in(r, &fault(9, Level::L1, WB)).unwrap(),
                    FaultResult::Retry
                );
                assert!(matches!(
                    walker.translate(&arena, root, Iova(9 << 12), Access::Read),
                    Err(DmaFault::NotPresent { .. })
                ));
                flushed = true;
            })
            .unwrap();
        assert!(zapped && flushed);
        assert!(m.lookup(r, Gfn(9)).unwrap().is_none());
        m.check_well_formed(r).unwrap();
        assert!(matches!(
            m.fault_in(r, &fault(9, Level::L1, WB)).unwrap(),
            FaultResult::Mapped { .. }
        ));
        // Nothing to zap: no flush.
        assert!(
            !m.zap_leaf_atomic(r, Gfn(10), |_, _| panic!("flushed"))
                .unwrap()
        );
    }

    #[test]
    fn a_pinned_leaf_is_never_zapped_under_the_read_lock() {
        let arena = Arena::new(16).unwrap();
        let (m, r) = setup(&arena);
        m.fault_in(r, &fault(9, Level::L1, PINNED)).unwrap();
        assert_eq!(
            m.zap_leaf_atomic(r, Gfn(9), |_, _| panic!("flushed")),
            Err(MmuError::PinnedZap { gfn: Gfn(9) })
        );
        assert!(m.lookup(r, Gfn(9)).unwrap().is_some());
    }
}
