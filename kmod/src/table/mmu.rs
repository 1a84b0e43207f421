//! The TDP MMU: roots, and the operations that change their tables, modelled on Linux's
//! `arch/x86/kvm/mmu/tdp_mmu.c`.
//!
//! **Locking rule** — KVM's `mmu_lock`, a reader-writer lock, as Rust borrows. An operation
//! that takes `&mut self` runs with the lock held for write: alone. One that takes `&self` runs
//! with it held for read, concurrently with other such writers (6.12: faults, eager huge-page
//! splits, dirty-log clearing and write-protection, `tdp_mmu_set_spte_atomic`); each function
//! says which. Hardware walkers (vCPUs and the IOMMU) read the tables all the while and may set
//! accessed/dirty bits. Hence:
//!
//! 1. every table is completely built before it is linked, with a single atomic store (write
//!    lock) or compare-and-swap (read lock; a lost race frees the never-linked table) of its
//!    parent entry;
//! 2. every change of an entry under the read lock, and of a present entry under either, is a
//!    compare-and-swap against the value read: a lost race is re-evaluated against the new
//!    value (hardware A/D bits carried over, another writer's change respected), never
//!    overwritten;
//! 3. a writer under the read lock that must take a leaf away parks it at `FROZEN_SPTE` first
//!    (other writers skip or retry it), flushes, and only then clears it
//!    ([`TdpMmu::zap_leaf_atomic`]);
//! 4. an entry marked *pinned* (DMA may hit it at any time, there are no IO page faults) stays
//!    present to the IOMMU with at least its read/write rights: a huge-page split installs the
//!    complete child table in one compare-and-swap, a collapse installs the complete huge leaf
//!    in one, a permission change rewrites the leaf in one; pinned leaves are never zapped,
//!    frozen, re-pointed to another frame, nor made read-only — such requests fail with an
//!    error. Operations that remove a table holding pinned leaves take the write lock: under the
//!    read lock KVM freezes the removed table's entries (`handle_removed_pt`), which would make
//!    them non-present to an IOMMU still walking the table through its paging-structure cache;
//! 5. an unlinked table is retired through [`PageAllocator::free_table`], which defers reuse
//!    until every software walker that might still see it is gone (RCU), and — while an IOMMU
//!    walks this MMU's roots — only after an IOMMU invalidation that covers it
//!    ([`TdpMmu::release_unlinked`]).
//!
//! Under the write lock every operation checks its whole request before it changes anything,
//! so an error leaves the tables as they were; under the read lock a request is atomic per
//! entry, as in KVM. The IOTLB flush a change needs is the caller's job (the outcome says
//! whether one is needed), because the caller knows how to batch them.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::Ordering;

use crate::decision::addr::{ENTRIES_PER_TABLE, Gfn, Hpa, Level};
use crate::decision::format::{LeafAttrs, Perms, PteFormat};
use crate::event::clock::Clock;
use crate::event::{
    Event, EventKind, EventSink, GpaRange, Root as RootEvent, RootCause, Source, SpteFlags, VmId,
};
use crate::table::iter::{IterPos, TdpIter};
use crate::table::page_alloc::PageAllocator;
use crate::table::sync::SpinLock;

mod shared;
pub use shared::{Fault, FaultResult};

/// Names a root of this MMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RootId(pub u64);

/// What went wrong; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MmuError {
    OutOfMemory,
    NoRoot(RootId),
    /// `what` (gfn, hpa or length) is not aligned to the level's page size.
    Unaligned {
        what: &'static str,
        value: u64,
        level: Level,
    },
    /// The level is not one leaves may use here.
    BadLevel {
        level: Level,
        max: Level,
    },
    /// The range lies beyond what the format translates.
    OutOfRange {
        gfn: Gfn,
    },
    /// A pinned leaf would be zapped.
    PinnedZap {
        gfn: Gfn,
    },
    /// A pinned leaf would be pointed at another frame or given other attributes.
    PinnedRepoint {
        gfn: Gfn,
    },
    /// A pinned leaf would lose read or write access, which its device may use at any time.
    PinnedRights {
        gfn: Gfn,
    },
    /// A leaf of another size is in the way (split or zap first).
    Occupied {
        gfn: Gfn,
        level: Level,
    },
    /// No huge leaf of that level at that address.
    NotHuge {
        gfn: Gfn,
        level: Level,
    },
    /// The table cannot become one huge leaf.
    NotCollapsible {
        gfn: Gfn,
        level: Level,
        why: &'static str,
    },
}

impl fmt::Display for MmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmuError::OutOfMemory => f.write_str("out of page-table memory"),
            MmuError::NoRoot(id) => write!(f, "no root {}", id.0),
            MmuError::Unaligned { what, value, level } => write!(
                f,
                "{what} {value:#x} is not aligned to the {} KiB pages of level {level}",
                level.size() / 1024
            ),
            MmuError::BadLevel { level, max } => {
                write!(f, "level {level} is not allowed for leaves (max {max})")
            }
            MmuError::OutOfRange { gfn } => {
                write!(f, "gfn {gfn} is beyond the table's reach")
            }
            MmuError::PinnedZap { gfn } => {
                write!(f, "gfn {gfn} is pinned for DMA and cannot be zapped")
            }
            MmuError::PinnedRepoint { gfn } => write!(
                f,
                "gfn {gfn} is pinned for DMA and cannot be pointed at another frame"
            ),
            MmuError::PinnedRights { gfn } => write!(
                f,
                "gfn {gfn} is pinned for DMA and cannot lose read or write access"
            ),
            MmuError::Occupied { gfn, level } => write!(
                f,
                "gfn {gfn}: a mapping of another size is in the way at level {level}"
            ),
            MmuError::NotHuge { gfn, level } => {
                write!(f, "gfn {gfn}: no huge leaf at level {level}")
            }
            MmuError::NotCollapsible { gfn, level, why } => {
                write!(
                    f,
                    "gfn {gfn}: cannot collapse into a level-{level} leaf: {why}"
                )
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for MmuError {}

/// The role bits of a root that decide which vCPUs may use it (KVM's `kvm_mmu_page_role`
/// for a TDP root: the address space and guest mode; the rest is fixed for direct roots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RootRole {
    /// Serves the SMM address space (`role.smm`, address space 1).
    pub smm: bool,
    /// Serves a vCPU in guest mode (`role.guest_mode`: L2 under nested virtualization).
    pub guest_mode: bool,
}

impl RootRole {
    /// The normal address space, not in guest mode: the only role an IOMMU may walk.
    pub const NORMAL: RootRole = RootRole {
        smm: false,
        guest_mode: false,
    };
    /// The SMM address space.
    pub const SMM: RootRole = RootRole {
        smm: true,
        guest_mode: false,
    };
}

/// A root and what it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootInfo {
    pub id: RootId,
    pub pa: Hpa,
    pub role: RootRole,
}

/// What a change did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Leaf entries written (map), removed (zap) or rewritten (permissions).
    pub entries: u64,
    pub tables_allocated: u64,
    pub tables_freed: u64,
    /// A present translation changed: the IOTLB (and remote TLBs) must be flushed.
    pub flush_needed: bool,
}

impl Outcome {
    /// Sums two outcomes (one operation made of several changes).
    pub fn add(&mut self, other: Outcome) {
        self.entries += other.entries;
        self.tables_allocated += other.tables_allocated;
        self.tables_freed += other.tables_freed;
        self.flush_needed |= other.flush_needed;
    }
}

/// A request to map guest frames `[gfn, gfn + frames)` to host `hpa..` with leaves of `level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub gfn: Gfn,
    pub frames: u64,
    pub hpa: Hpa,
    pub level: Level,
    pub perms: Perms,
    pub attrs: LeafAttrs,
}

impl Mapping {
    /// Where frame `gfn` of the mapping goes.
    pub fn hpa_of(&self, gfn: Gfn) -> Hpa {
        self.hpa.offset_frames(gfn - self.gfn)
    }

    /// One past the last frame.
    pub fn end(&self) -> Gfn {
        self.gfn + self.frames
    }
}

/// A mapping as a software walk finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// First guest frame of the leaf.
    pub gfn: Gfn,
    pub level: Level,
    /// Host physical address of the leaf's first byte.
    pub hpa: Hpa,
    pub perms: Perms,
    pub attrs: LeafAttrs,
}

/// The shape of a root's tree, from [`TdpMmu::check_well_formed`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    /// Table pages reachable from the root, the root included.
    pub tables: u64,
    /// Leaves by level (index 0 = 4 KiB).
    pub leaves: [u64; 3],
}

/// A structural defect found by [`TdpMmu::check_well_formed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub gfn: Gfn,
    pub level: Level,
    pub entry: u64,
    pub why: &'static str,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "entry {:#x} at gfn {} level {}: {}",
            self.entry, self.gfn, self.level, self.why
        )
    }
}

/// A subtree unlinked from a live root, awaiting the invalidation that lets it go.
#[derive(Debug, Clone, Copy)]
struct Unlinked {
    /// The table.
    pa: Hpa,
    /// The level of its entries.
    level: Level,
    /// The first guest frame it covers.
    gfn: Gfn,
    /// The root it hung under.
    root: Hpa,
    /// For a table of leaves: its D bits at the unlink.
    dirty_at_unlink: Option<[u64; 8]>,
}

impl Unlinked {
    fn table(pa: Hpa, level: Level, gfn: Gfn, root: Hpa) -> Self {
        Self {
            pa,
            level,
            gfn,
            root,
            dirty_at_unlink: None,
        }
    }

    /// One past the last guest frame it covers.
    fn end(&self) -> Gfn {
        self.gfn + self.level.table_frames()
    }
}

/// What [`TdpMmu::release_unlinked`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// Unlinked subtrees retired.
    pub tables: u64,
    /// Leaves made dirty because DMA wrote through a stale cached entry after their old table
    /// was unlinked.
    pub late_dirty: u64,
}

/// The TDP MMU of one VM.
pub struct TdpMmu<A: PageAllocator, S, C> {
    alloc: A,
    format: PteFormat,
    /// Largest level leaves may use (negotiated with the IOMMU when shared).
    max_leaf_level: Level,
    sink: SpinLock<S>,
    clock: C,
    vm: VmId,
    source: Source,
    roots: Vec<RootInfo>,
    next_root: u64,
    /// Emit a `spte_set` event per entry change (like the `kvm_tdp_mmu_spte_changed` tracepoint).
    trace_sptes: bool,
    /// Unlinked tables wait for an IOMMU invalidation before they are retired.
    defer_free: bool,
    /// Those tables.
    unlinked: Vec<Unlinked>,
}

impl<A: PageAllocator, S, C> fmt::Debug for TdpMmu<A, S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TdpMmu")
            .field("format", &self.format)
            .field("vm", &self.vm)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

fn check_aligned(what: &'static str, value: u64, level: Level) -> Result<(), MmuError> {
    if value & (level.frames() - 1) != 0 {
        return Err(MmuError::Unaligned { what, value, level });
    }
    Ok(())
}

impl<A: PageAllocator, S: EventSink, C: Clock> TdpMmu<A, S, C> {
    pub fn new(alloc: A, format: PteFormat, sink: S, clock: C, vm: VmId) -> Self {
        Self {
            alloc,
            format,
            max_leaf_level: format.max_huge_level,
            sink: SpinLock::new(sink),
            clock,
            vm,
            source: Source::Simulator,
            roots: Vec::new(),
            next_root: 1,
            trace_sptes: false,
            defer_free: false,
            unlinked: Vec::new(),
        }
    }

    /// Events are stamped with `source` (the simulator's default is [`Source::Simulator`]).
    pub fn with_source(mut self, source: Source) -> Self {
        self.source = source;
        self
    }

    /// Limit leaves to `level` (the negotiated maximum when the table is shared).
    pub fn set_max_leaf_level(&mut self, level: Level) {
        self.max_leaf_level = level.min(self.format.max_huge_level);
    }

    pub fn max_leaf_level(&self) -> Level {
        self.max_leaf_level
    }

    pub fn set_trace_sptes(&mut self, on: bool) {
        self.trace_sptes = on;
    }

    pub fn format(&self) -> PteFormat {
        self.format
    }

    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    pub fn sink(&mut self) -> &mut S {
        self.sink.get_mut()
    }

    pub fn clock(&self) -> &C {
        &self.clock
    }

    pub fn roots(&self) -> &[RootInfo] {
        &self.roots
    }

    pub fn root(&self, id: RootId) -> Result<RootInfo, MmuError> {
        self.roots
            .iter()
            .find(|r| r.id == id)
            .copied()
            .ok_or(MmuError::NoRoot(id))
    }

    /// Reports `kind`. Writers holding the lock for read report concurrently: the sink is
    /// behind its own spinlock (kernel: per-CPU trace buffers).
    fn emit(&self, kind: EventKind) {
        let event = Event::new(self.clock.now_ns(), self.vm, self.source, kind);
        self.sink.lock().emit(event);
    }

    fn trace_spte(&self, gfn: Gfn, level: Level, old: u64, new: u64) {
        if self.trace_sptes {
            let f = &self.format;
            let (old, new) = (
                SpteFlags::of_entry(f, old, level),
                SpteFlags::of_entry(f, new, level),
            );
            self.emit(EventKind::SpteSet {
                gfn,
                level: level.get(),
                old,
                new,
            });
        }
    }

    fn root_event(&self, info: RootInfo, cause: RootCause) -> RootEvent {
        RootEvent {
            root: info.id.0,
            level: self.format.levels.get(),
            smm: info.role.smm,
            cause,
        }
    }

    /// Allocates an empty root.
    pub fn alloc_root(&mut self, role: RootRole, cause: RootCause) -> Result<RootId, MmuError> {
        let pa = self
            .alloc
            .alloc_table(self.format.nonpresent)
            .ok_or(MmuError::OutOfMemory)?;
        let info = RootInfo {
            id: RootId(self.next_root),
            pa,
            role,
        };
        self.next_root += 1;
        self.roots.push(info);
        let ev = self.root_event(info, cause);
        self.emit(EventKind::RootAlloc(ev));
        Ok(info.id)
    }

    /// Frees a root and its whole tree. Pinned leaves go with it: only legal once no IOMMU
    /// walks this root any more (the caller switched the IOMMU to another root or stopped
    /// sharing).
    pub fn free_root(&mut self, id: RootId, cause: RootCause) -> Result<Outcome, MmuError> {
        let info = self.root(id)?;
        let mut out = Outcome::default();
        self.free_subtree(info.pa, self.format.levels, &mut out);
        self.roots.retain(|r| r.id != id);
        let ev = self.root_event(info, cause);
        self.emit(EventKind::RootFree(ev));
        Ok(out)
    }

    /// Retires the table at `pa` (at `level`) and every table below it, counting its leaves.
    fn free_subtree(&self, pa: Hpa, level: Level, out: &mut Outcome) {
        self.count_subtree(pa, level, out);
        self.free_pages(pa, level);
    }

    /// Counts the leaves and tables of the subtree at `pa` (a table at `level`) into `out`.
    fn count_subtree(&self, pa: Hpa, level: Level, out: &mut Outcome) {
        if let Some(table) = self.alloc.table(pa) {
            for sptep in table {
                let e = sptep.load(Ordering::Acquire);
                if !self.format.is_present(e) {
                    continue;
                }
                if self.format.is_leaf(e, level) {
                    out.entries += 1;
                    out.flush_needed = true;
                } else if let Some(below) = level.down() {
                    self.count_subtree(self.format.addr(e), below, out);
                }
            }
        }
        out.tables_freed += 1;
    }

    /// Retires every page of the subtree at `pa` (a table at `level`).
    fn free_pages(&self, pa: Hpa, level: Level) {
        if let (Some(table), Some(below)) = (self.alloc.table(pa), level.down()) {
            for sptep in table {
                let e = sptep.load(Ordering::Acquire);
                if self.format.is_present(e) && !self.format.is_leaf(e, level) {
                    self.free_pages(self.format.addr(e), below);
                }
            }
        }
        self.alloc.free_table(pa);
    }

    /// A subtree was unlinked from a live root: counted now; its pages are retired at once, or
    /// — while an IOMMU walks this MMU's roots — kept until an invalidation covers them
    /// ([`TdpMmu::release_unlinked`]): an IOMMU's paging-structure cache may still point into
    /// it. For a table of leaves, `dirty` is its D bits at the unlink, so that D bits a stale
    /// walk sets afterwards are not lost.
    fn unlink(&mut self, table: Unlinked, out: &mut Outcome) {
        self.count_subtree(table.pa, table.level, out);
        if self.defer_free {
            self.unlinked.push(table);
        } else {
            self.free_pages(table.pa, table.level);
        }
    }

    /// While `on`, tables unlinked from a live root wait for [`TdpMmu::release_unlinked`]
    /// (an IOMMU walks this MMU's roots). Turning it off releases them all.
    pub fn set_defer_free(&mut self, on: bool) {
        self.defer_free = on;
        if !on {
            self.release_unlinked(None);
        }
    }

    /// The guest frames the tables awaiting release cover, as `[start, end)`.
    pub fn unlinked_span(&self) -> Option<(Gfn, Gfn)> {
        let start = self.unlinked.iter().map(|u| u.gfn).min()?;
        let end = self.unlinked.iter().map(Unlinked::end).max()?;
        Some((start, end))
    }

    /// An IOMMU invalidation that drops paging-structure cache entries of `covered` (every
    /// address when `None`) completed: the unlinked tables inside it are retired. D bits that
    /// DMA set in a table of leaves after its unlink (through a stale cached entry) are folded
    /// into the leaf that maps those frames now.
    pub fn release_unlinked(&mut self, covered: Option<(Gfn, Gfn)>) -> Released {
        let mut released = Released::default();
        let pending = core::mem::take(&mut self.unlinked);
        for u in pending {
            let inside = covered.is_none_or(|(start, end)| start <= u.gfn && u.end() <= end);
            if !inside {
                self.unlinked.push(u);
                continue;
            }
            if let Some(before) = u.dirty_at_unlink {
                released.late_dirty += self.fold_late_dirty(&u, &before);
            }
            self.free_pages(u.pa, u.level);
            released.tables += 1;
        }
        released
    }

    /// Sets D on the leaves of `u.root` now mapping the frames whose entries in the unlinked
    /// table `u` gained D since `before`; returns how many did.
    fn fold_late_dirty(&self, u: &Unlinked, before: &[u64; 8]) -> u64 {
        let Some(table) = self.alloc.table(u.pa) else {
            return 0;
        };
        let mut late = 0;
        for (i, sptep) in table.iter().enumerate() {
            let e = sptep.load(Ordering::Acquire);
            let was = before.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0);
            if e & self.format.dirty == 0 || was || !self.format.is_present(e) {
                continue;
            }
            let gfn = u.gfn + i as u64 * u.level.frames();
            let now = TdpIter::new(&self.alloc, self.format, u.root, Level::L1, gfn, gfn + 1)
                .find(|p| self.format.is_present(p.old) && self.format.is_leaf(p.old, p.level));
            if let Some(leaf) = now {
                leaf.sptep.fetch_or(self.format.dirty, Ordering::AcqRel);
                late += 1;
            }
        }
        late
    }

    fn walk(&self, root: Hpa, min_level: Level, start: Gfn, end: Gfn) -> TdpIter<'_, A> {
        TdpIter::new(&self.alloc, self.format, root, min_level, start, end)
    }

    fn check_range(&self, gfn: Gfn, frames: u64) -> Result<Gfn, MmuError> {
        let end = gfn
            .checked_offset(frames)
            .ok_or(MmuError::OutOfRange { gfn })?;
        if end > self.format.gfn_limit() {
            return Err(MmuError::OutOfRange { gfn });
        }
        Ok(end)
    }

    /// Does the subtree under a table entry hold any present leaf?
    fn subtree_has_leaves(&self, pa: Hpa, level: Level) -> bool {
        let Some(table) = self.alloc.table(pa) else {
            return false;
        };
        table.iter().any(|sptep| {
            let e = sptep.load(Ordering::Acquire);
            self.format.is_present(e)
                && (self.format.is_leaf(e, level)
                    || level
                        .down()
                        .is_some_and(|below| self.subtree_has_leaves(self.format.addr(e), below)))
        })
    }

    /// Maps guest frames `[gfn, gfn + frames)` to host `hpa..` with leaves of `level`.
    ///
    /// Existing leaves of the same size are replaced unless pinned (a pinned leaf may only be
    /// "mapped" again to exactly what it is); a huge leaf above, or smaller leaves below, are in
    /// the way ([`MmuError::Occupied`]); an empty table where a huge leaf goes is replaced by it.
    pub fn map(&mut self, root: RootId, mapping: &Mapping) -> Result<Outcome, MmuError> {
        let Mapping {
            gfn,
            frames,
            hpa,
            level,
            perms,
            attrs,
        } = *mapping;
        if level > self.max_leaf_level {
            return Err(MmuError::BadLevel {
                level,
                max: self.max_leaf_level,
            });
        }
        check_aligned("gfn", gfn.0, level)?;
        check_aligned("length", frames, level)?;
        check_aligned("hpa frame", hpa.pfn(), level)?;
        if hpa.page_offset() != 0 || !self.format.can_address(hpa) {
            return Err(MmuError::Unaligned {
                what: "hpa",
                value: hpa.0,
                level,
            });
        }
        let end = self.check_range(gfn, frames)?;
        let root_pa = self.root(root)?.pa;
        let leaf_at = |g: Gfn| self.format.leaf(mapping.hpa_of(g), level, perms, attrs);
        let ad = self.format.ad_bits();

        // Check the whole request before changing anything.
        for pos in self.walk(root_pa, level, gfn, end) {
            if !self.format.is_present(pos.old) {
                continue;
            }
            let leaf = self.format.is_leaf(pos.old, pos.level);
            if pos.level > level && leaf {
                return Err(MmuError::Occupied {
                    gfn: pos.gfn,
                    level: pos.level,
                });
            }
            if pos.level == level {
                if !leaf {
                    let below = level.down().unwrap_or(level);
                    if self.subtree_has_leaves(self.format.addr(pos.old), below) {
                        return Err(MmuError::Occupied {
                            gfn: pos.gfn,
                            level: pos.level,
                        });
                    }
                } else if self.format.is_pinned(pos.old) && pos.old & !ad != leaf_at(pos.gfn) & !ad
                {
                    // Mapping a pinned leaf to what it is (A/D bits aside: hardware may
                    // have set them) is no re-point.
                    return Err(MmuError::PinnedRepoint { gfn: pos.gfn });
                }
            }
        }

        let mut out = Outcome::default();
        let mut iter = TdpIter::new(&self.alloc, self.format, root_pa, level, gfn, end);
        let mut traces = Vec::new();
        let mut unlinked = Vec::new();
        while let Some(pos) = iter.next() {
            if pos.level > level {
                if self.format.is_present(pos.old) {
                    continue; // a table: the walk steps into it
                }
                let covered =
                    pos.level.down() == Some(level) && pos.gfn >= gfn && pos.end_gfn() <= end;
                let child = if covered {
                    // Covered whole: build it complete (no need to zero a page every entry of
                    // which is written), link it once, skip it. The address field is linear in
                    // the entry, so the leaves are the first one plus multiples of the step.
                    let child = self
                        .alloc
                        .alloc_table_to_fill()
                        .ok_or(MmuError::OutOfMemory)?;
                    let table = self.alloc.table(child).ok_or(MmuError::OutOfMemory)?;
                    let first = leaf_at(pos.gfn);
                    let step = level.size();
                    let mut e = first;
                    for sptep in table.iter() {
                        sptep.store(e, Ordering::Relaxed);
                        e = e.wrapping_add(step);
                    }
                    out.entries += ENTRIES_PER_TABLE as u64;
                    iter.skip_children();
                    child
                } else {
                    self.alloc
                        .alloc_table(self.format.nonpresent)
                        .ok_or(MmuError::OutOfMemory)?
                };
                out.tables_allocated += 1;
                // Release: the child's entries are visible before the link.
                pos.sptep.store(self.format.table(child), Ordering::Release);
                continue;
            }
            let new = leaf_at(pos.gfn);
            if self.format.is_present(pos.old) && !self.format.is_leaf(pos.old, pos.level) {
                // An empty table where the huge leaf goes (checked above): replace it.
                self.set_present(pos, new, &mut out);
                if let Some(below) = pos.level.down() {
                    unlinked.push(Unlinked::table(
                        self.format.addr(pos.old),
                        below,
                        pos.gfn,
                        root_pa,
                    ));
                }
                out.entries += 1;
                continue;
            }
            if pos.old & !ad == new {
                continue;
            }
            if self.format.is_present(pos.old) {
                self.set_present(pos, new, &mut out);
            } else {
                pos.sptep.store(new, Ordering::Release);
            }
            out.entries += 1;
            if self.trace_sptes {
                traces.push((pos.gfn, pos.level, pos.old, new));
            }
        }
        for table in unlinked {
            self.unlink(table, &mut out);
        }
        for (g, l, old, new) in traces {
            self.trace_spte(g, l, old, new);
        }
        Ok(out)
    }

    /// Caches an MMIO SPTE for emulated MMIO at `gfn` (KVM's `make_mmio_spte`, at level 1),
    /// stamped with the memslot `generation`, so the next access exits straight to emulation.
    /// Returns whether one was installed: not where the format caches none (the access takes
    /// the slow path each time), nor where a mapping is in the way.
    pub fn map_mmio(&mut self, root: RootId, gfn: Gfn, generation: u64) -> Result<bool, MmuError> {
        let Some(spte) = self.format.mmio_spte(gfn.gpa(), generation) else {
            return Ok(false);
        };
        let end = self.check_range(gfn, 1)?;
        let root_pa = self.root(root)?.pa;
        for pos in TdpIter::new(&self.alloc, self.format, root_pa, Level::L1, gfn, end) {
            let present = self.format.is_present(pos.old);
            if present && (pos.level == Level::L1 || self.format.is_leaf(pos.old, pos.level)) {
                return Ok(false);
            }
            if pos.level > Level::L1 {
                if !present {
                    let child = self
                        .alloc
                        .alloc_table(self.format.nonpresent)
                        .ok_or(MmuError::OutOfMemory)?;
                    pos.sptep.store(self.format.table(child), Ordering::Release);
                }
                continue;
            }
            pos.sptep.store(spte, Ordering::Release);
            self.trace_spte(pos.gfn, pos.level, pos.old, spte);
            return Ok(true);
        }
        Ok(false)
    }

    /// Takes every MMIO SPTE of `root` away (non-present); returns how many there were. For a
    /// table an IOMMU is about to walk: it would read them as mappings. Lock: write.
    pub fn zap_mmio(&mut self, root: RootId) -> Result<u64, MmuError> {
        let root_pa = self.root(root)?.pa;
        let mut n = 0;
        for pos in self.walk(root_pa, Level::L1, Gfn(0), self.format.gfn_limit()) {
            if self.format.is_mmio(pos.old) {
                pos.sptep.store(self.format.nonpresent, Ordering::Release);
                self.trace_spte(pos.gfn, pos.level, pos.old, self.format.nonpresent);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Replaces present entry `pos` by `new` with compare-and-swap, keeping A/D bits hardware
    /// set meanwhile. Returns the value replaced.
    fn set_present(&self, pos: IterPos<'_>, new: u64, out: &mut Outcome) -> u64 {
        let ad = self.format.ad_bits();
        let mut old = pos.old;
        loop {
            // Carry over A/D set by hardware since we read the entry, when the frame stays.
            let carried = if self.format.addr(old) == self.format.addr(new) {
                new | (old & ad)
            } else {
                new
            };
            match pos
                .sptep
                .compare_exchange(old, carried, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => old = now,
            }
        }
        out.flush_needed = true;
        old
    }

    /// Zaps leaves covering `[gfn, gfn + frames)` (a huge leaf that overlaps goes whole);
    /// with `tables`, page tables entirely inside the range are freed too.
    pub fn zap(
        &mut self,
        root: RootId,
        gfn: Gfn,
        frames: u64,
        tables: bool,
    ) -> Result<Outcome, MmuError> {
        self.zap_range(root, gfn, frames, tables, false)
    }

    /// Like [`TdpMmu::zap`], but pinned leaves go too: only for a pinned range that is itself
    /// going away (its memslot is deleted). The caller flushes the IOTLB before it unpins.
    pub fn zap_released(
        &mut self,
        root: RootId,
        gfn: Gfn,
        frames: u64,
        tables: bool,
    ) -> Result<Outcome, MmuError> {
        self.zap_range(root, gfn, frames, tables, true)
    }

    fn zap_range(
        &mut self,
        root: RootId,
        gfn: Gfn,
        frames: u64,
        tables: bool,
        released: bool,
    ) -> Result<Outcome, MmuError> {
        let end = self.check_range(gfn, frames)?;
        let root_pa = self.root(root)?.pa;
        for pos in self.walk(root_pa, Level::L1, gfn, end) {
            if !released
                && self.format.is_present(pos.old)
                && self.format.is_leaf(pos.old, pos.level)
                && self.format.is_pinned(pos.old)
            {
                return Err(MmuError::PinnedZap {
                    gfn: pos.gfn.max(gfn),
                });
            }
        }
        let mut out = Outcome::default();
        let mut traces = Vec::new();
        let mut unlinked = Vec::new();
        let mut iter = self.walk(root_pa, Level::L1, gfn, end);
        while let Some(pos) = iter.next() {
            if !self.format.is_present(pos.old) {
                continue;
            }
            let leaf = self.format.is_leaf(pos.old, pos.level);
            let inside = pos.gfn >= gfn && pos.end_gfn() <= end;
            if leaf {
                let old = pos.sptep.swap(self.format.nonpresent, Ordering::AcqRel);
                out.entries += 1;
                out.flush_needed = true;
                if self.trace_sptes {
                    traces.push((pos.gfn, pos.level, old));
                }
            } else if tables && inside {
                pos.sptep.store(self.format.nonpresent, Ordering::Release);
                iter.skip_children();
                if let Some(below) = pos.level.down() {
                    unlinked.push(Unlinked::table(
                        self.format.addr(pos.old),
                        below,
                        pos.gfn,
                        root_pa,
                    ));
                }
                out.flush_needed = true;
            }
        }
        for table in unlinked {
            self.unlink(table, &mut out);
        }
        for (g, l, old) in traces {
            self.trace_spte(g, l, old, self.format.nonpresent);
        }
        self.emit(EventKind::Zap {
            range: GpaRange::of_frames(gfn, frames),
            tables,
            entries: out.entries,
        });
        Ok(out)
    }

    /// Gives every leaf covering the range the rights `perms` (a huge leaf that overlaps changes
    /// whole). A pinned leaf may gain rights, present → present, but not lose read or write: DMA
    /// may use it at any time ([`MmuError::PinnedRights`]; nothing changed unless a pinned leaf
    /// appeared during the walk). Lock: read.
    pub fn set_perms(
        &self,
        root: RootId,
        gfn: Gfn,
        frames: u64,
        perms: Perms,
    ) -> Result<Outcome, MmuError> {
        self.change_leaves(root, gfn, frames, true, |f, e| f.with_perms(e, perms))
    }

    /// Write-protects every leaf covering the range for dirty logging (W cleared, MMU-writable
    /// kept). Only where the device takes IO page faults: a pinned leaf is refused
    /// ([`MmuError::PinnedRights`]) — its device would fault. Lock: read (6.12's
    /// `wrprot_gfn_range`).
    pub fn write_protect(&self, root: RootId, gfn: Gfn, frames: u64) -> Result<Outcome, MmuError> {
        self.change_leaves(root, gfn, frames, true, |f, e| f.write_protected(e))
    }

    /// Marks every leaf covering the range pinned or not (present → present): sharing starts
    /// or stops holding DMA pins on it. Lock: write — the pinned set is stable under the read
    /// lock.
    pub fn set_pinned(
        &mut self,
        root: RootId,
        gfn: Gfn,
        frames: u64,
        pinned: bool,
    ) -> Result<Outcome, MmuError> {
        let bit = self.format.pinned;
        self.change_leaves(root, gfn, frames, false, |_, e| {
            if pinned { e | bit } else { e & !bit }
        })
    }

    /// Clears the dirty bit of every leaf covering the range; returns the outcome and the
    /// number of 4 KiB frames the dirty leaves cover. Lock: read (6.12's
    /// `clear_dirty_gfn_range`): each leaf by compare-and-swap, so a leaf another writer
    /// replaced meanwhile is not touched.
    pub fn clear_dirty(
        &self,
        root: RootId,
        gfn: Gfn,
        frames: u64,
    ) -> Result<(Outcome, u64), MmuError> {
        let dirty = self.format.dirty;
        let end = self.check_range(gfn, frames)?;
        let root_pa = self.root(root)?.pa;
        let mut out = Outcome::default();
        let mut dirty_frames = 0;
        for pos in self.walk(root_pa, Level::L1, gfn, end) {
            let mut old = pos.old;
            while self.format.is_present(old)
                && self.format.is_leaf(old, pos.level)
                && old & dirty != 0
            {
                match pos.sptep.compare_exchange(
                    old,
                    old & !dirty,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        out.entries += 1;
                        out.flush_needed = true;
                        dirty_frames += pos.level.frames();
                        break;
                    }
                    Err(now) => old = now,
                }
            }
        }
        Ok((out, dirty_frames))
    }

    /// Rewrites every present leaf covering the range with `change`, present → present. With
    /// `guard_pinned`, a change that takes read or write away from a pinned leaf refuses the
    /// whole request first, and is skipped (and refused) for a pinned leaf that appears during
    /// the walk. Lock: read — each leaf by compare-and-swap, re-evaluated when another writer
    /// or hardware got there first; a leaf zapped, frozen or split meanwhile is left to the
    /// walk (which steps into a split's new table).
    fn change_leaves(
        &self,
        root: RootId,
        gfn: Gfn,
        frames: u64,
        guard_pinned: bool,
        change: impl Fn(&PteFormat, u64) -> u64,
    ) -> Result<Outcome, MmuError> {
        let end = self.check_range(gfn, frames)?;
        let root_pa = self.root(root)?.pa;
        if guard_pinned {
            for pos in self.walk(root_pa, Level::L1, gfn, end) {
                let f = &self.format;
                if f.is_present(pos.old) && f.is_leaf(pos.old, pos.level) && f.is_pinned(pos.old) {
                    let lost = f.perms(pos.old).without(f.perms(change(f, pos.old)));
                    if lost.bits() & Perms::RW.bits() != 0 {
                        return Err(MmuError::PinnedRights {
                            gfn: pos.gfn.max(gfn),
                        });
                    }
                }
            }
        }
        let mut out = Outcome::default();
        let mut traces = Vec::new();
        let mut refused = None;
        let ad = self.format.ad_bits();
        let f = &self.format;
        for pos in self.walk(root_pa, Level::L1, gfn, end) {
            let mut old = pos.old;
            while f.is_present(old) && f.is_leaf(old, pos.level) {
                let want = change(f, old);
                if want & !ad == old & !ad {
                    break;
                }
                let lost = f.perms(old).without(f.perms(want));
                if guard_pinned && f.is_pinned(old) && lost.bits() & Perms::RW.bits() != 0 {
                    refused = refused.or(Some(pos.gfn.max(gfn)));
                    break;
                }
                match pos
                    .sptep
                    .compare_exchange(old, want, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => {
                        out.entries += 1;
                        out.flush_needed = true;
                        if self.trace_sptes {
                            traces.push((pos.gfn, pos.level, old, want));
                        }
                        break;
                    }
                    Err(now) => old = now,
                }
            }
        }
        for (g, l, old, new) in traces {
            self.trace_spte(g, l, old, new);
        }
        match refused {
            Some(gfn) => Err(MmuError::PinnedRights { gfn }),
            None => Ok(out),
        }
    }

    /// The entry at `level` covering `gfn`.
    fn entry_at(&self, root_pa: Hpa, gfn: Gfn, level: Level) -> Option<IterPos<'_>> {
        self.walk(root_pa, level, gfn, gfn + 1)
            .find(|p| p.level == level)
    }

    /// Splits the huge leaf of `level` covering `gfn` into a table of leaves one level down.
    /// The child table is built complete, then installed with one compare-and-swap: a walker
    /// sees either the huge leaf or the full table, never a hole. Lock: read (6.12's eager
    /// split, `tdp_mmu_split_huge_page` with `shared`): when another writer changed the leaf's
    /// rights or hardware its A/D bits, the child is rebuilt from the new value; when the leaf
    /// is gone (split, zapped or frozen by another writer), the unlinked child is freed and the
    /// answer is [`MmuError::NotHuge`].
    pub fn split(&self, root: RootId, gfn: Gfn, level: Level) -> Result<Outcome, MmuError> {
        let small = match level.down() {
            Some(small) if level <= Level::L3 => small,
            _ => return Err(MmuError::NotHuge { gfn, level }),
        };
        self.check_range(gfn, 1)?;
        let root_pa = self.root(root)?.pa;
        let pos = self
            .entry_at(root_pa, gfn, level)
            .filter(|p| self.format.is_present(p.old) && self.format.is_leaf(p.old, level))
            .ok_or(MmuError::NotHuge { gfn, level })?;
        let child = self
            .alloc
            .alloc_table_to_fill()
            .ok_or(MmuError::OutOfMemory)?;
        let table = self.alloc.table(child).ok_or(MmuError::OutOfMemory)?;
        let step = small.size();
        let ad = self.format.ad_bits();
        let mut old = pos.old;
        loop {
            if !self.format.is_present(old) || !self.format.is_leaf(old, level) {
                // Never linked: no walker can hold it.
                self.alloc.free_table(child);
                return Err(MmuError::NotHuge { gfn, level });
            }
            let first = self.format.leaf(
                self.format.addr(old),
                small,
                self.format.perms(old),
                self.format.attrs(old),
            ) | (old & ad);
            let mut e = first;
            for sptep in table.iter() {
                sptep.store(e, Ordering::Relaxed);
                e = e.wrapping_add(step);
            }
            match pos.sptep.compare_exchange(
                old,
                self.format.table(child),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                // Hardware set A/D or another writer changed the leaf: rebuild from it.
                Err(now) => old = now,
            }
        }
        let out = Outcome {
            entries: ENTRIES_PER_TABLE as u64,
            tables_allocated: 1,
            tables_freed: 0,
            flush_needed: true,
        };
        let (split_gfn, table_entry) = (pos.gfn, self.format.table(child));
        self.trace_spte(split_gfn, level, old, table_entry);
        self.emit(EventKind::HugePageSplit {
            gfn: split_gfn,
            level: level.get(),
        });
        Ok(out)
    }

    /// Replaces the table at `level` covering `gfn` by one huge leaf, when its 512 entries are
    /// leaves mapping one naturally aligned, contiguous host range with the same rights and
    /// attributes. The huge leaf is installed with one compare-and-swap; A/D bits hardware set
    /// in the children up to the switch are folded into it.
    pub fn collapse(&mut self, root: RootId, gfn: Gfn, level: Level) -> Result<Outcome, MmuError> {
        let not = |why| MmuError::NotCollapsible { gfn, level, why };
        let small = match level.down() {
            Some(small) if level <= self.max_leaf_level => small,
            _ => {
                return Err(MmuError::BadLevel {
                    level,
                    max: self.max_leaf_level,
                });
            }
        };
        self.check_range(gfn, 1)?;
        let root_pa = self.root(root)?.pa;
        let pos = self
            .entry_at(root_pa, gfn, level)
            .ok_or(not("no table there"))?;
        if !self.format.is_present(pos.old) || self.format.is_leaf(pos.old, level) {
            return Err(not("no table there"));
        }
        let child = self.format.addr(pos.old);
        let table = self.alloc.table(child).ok_or(not("no table there"))?;
        let ad = self.format.ad_bits();
        let first = table[0].load(Ordering::Acquire);
        if !self.format.is_present(first) || !self.format.is_leaf(first, small) {
            return Err(not("an entry is not a present leaf"));
        }
        let base = self.format.addr(first);
        if !base.is_aligned(level.size()) {
            return Err(not("the frames are not aligned to the huge page"));
        }
        let mut folded_ad = 0;
        let mut want = base;
        for sptep in table.iter() {
            let e = sptep.load(Ordering::Acquire);
            if !self.format.is_present(e) || !self.format.is_leaf(e, small) {
                return Err(not("an entry is not a present leaf"));
            }
            if self.format.addr(e) != want {
                return Err(not("the frames are not contiguous"));
            }
            if (e & !ad & !self.format.addr_mask) != (first & !ad & !self.format.addr_mask) {
                return Err(not("the entries differ in rights or attributes"));
            }
            folded_ad |= e & ad;
            want = want + small.size();
        }
        let perms = self.format.perms(first);
        let attrs = self.format.attrs(first);
        let huge = self.format.leaf(base, level, perms, attrs) | folded_ad;
        // Only hardware A/D updates can race (we are the writer): the parent entry itself is a
        // table pointer that hardware does not change except its accessed bit.
        let mut old = pos.old;
        loop {
            match pos.sptep.compare_exchange(
                old,
                huge | (old & self.format.accessed),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => old = now,
            }
        }
        // Children updated between the scan and the switch: fold their A/D in as well.
        let late_ad = table
            .iter()
            .fold(0, |acc, e| acc | (e.load(Ordering::Acquire) & ad));
        if late_ad & !folded_ad != 0 {
            pos.sptep.fetch_or(late_ad, Ordering::AcqRel);
        }
        let mut dirty_at_unlink = [0u64; 8];
        for (i, e) in table.iter().enumerate() {
            if e.load(Ordering::Acquire) & self.format.dirty != 0 {
                dirty_at_unlink[i / 64] |= 1 << (i % 64);
            }
        }
        let huge_gfn = pos.gfn;
        let mut out = Outcome {
            entries: 1,
            tables_allocated: 0,
            tables_freed: 0,
            flush_needed: true,
        };
        // The child's leaves were counted in the huge leaf: only its page is retired.
        let mut counted = Outcome::default();
        self.unlink(
            Unlinked {
                dirty_at_unlink: Some(dirty_at_unlink),
                ..Unlinked::table(child, small, huge_gfn, root_pa)
            },
            &mut counted,
        );
        out.tables_freed = counted.tables_freed;
        self.trace_spte(huge_gfn, level, old, huge);
        self.emit(EventKind::HugePageCollapse {
            gfn: huge_gfn,
            level: level.get(),
        });
        Ok(out)
    }

    fn leaf_of(&self, p: &IterPos<'_>) -> Leaf {
        Leaf {
            gfn: p.gfn,
            level: p.level,
            hpa: self.format.addr(p.old),
            perms: self.format.perms(p.old),
            attrs: self.format.attrs(p.old),
        }
    }

    /// The leaf translating `gfn`, by a software walk.
    pub fn lookup(&self, root: RootId, gfn: Gfn) -> Result<Option<Leaf>, MmuError> {
        self.check_range(gfn, 1)?;
        let root_pa = self.root(root)?.pa;
        Ok(self
            .walk(root_pa, Level::L1, gfn, gfn + 1)
            .find(|p| self.format.is_present(p.old) && self.format.is_leaf(p.old, p.level))
            .map(|p| self.leaf_of(&p)))
    }

    /// Every leaf of a root, in guest address order.
    pub fn leaves(&self, root: RootId) -> Result<Vec<Leaf>, MmuError> {
        let root_pa = self.root(root)?.pa;
        Ok(self
            .walk(root_pa, Level::L1, Gfn(0), self.format.gfn_limit())
            .filter(|p| self.format.is_present(p.old) && self.format.is_leaf(p.old, p.level))
            .map(|p| self.leaf_of(&p))
            .collect())
    }

    /// Walks a whole root and checks its structure: tables are pages of the allocator and
    /// reached once, leaves sit at allowed levels with aligned frames, no unknown bits are set,
    /// non-present entries are zero.
    pub fn check_well_formed(&self, root: RootId) -> Result<Census, Malformed> {
        let root_pa = self
            .root(root)
            .map_err(|_| Malformed {
                gfn: Gfn(0),
                level: self.format.levels,
                entry: 0,
                why: "no such root",
            })?
            .pa;
        let mut census = Census {
            tables: 1,
            ..Census::default()
        };
        let mut seen = alloc::collections::BTreeSet::new();
        seen.insert(root_pa);
        for pos in self.walk(root_pa, Level::L1, Gfn(0), self.format.gfn_limit()) {
            let e = pos.old;
            let bad = |why| Malformed {
                gfn: pos.gfn,
                level: pos.level,
                entry: e,
                why,
            };
            if !self.format.is_present(e) {
                if e != self.format.nonpresent && !self.format.is_mmio(e) {
                    return Err(bad(
                        "non-present entry is neither the non-present value nor an MMIO SPTE",
                    ));
                }
                continue;
            }
            if e & !self.format.known_bits() != 0 {
                return Err(bad("unknown bits set"));
            }
            if self.format.is_leaf(e, pos.level) {
                if !self.format.writable_invariants_hold(e) {
                    return Err(bad(
                        "writable but not MMU-writable, or MMU- but not host-writable",
                    ));
                }
                if pos.level > self.max_leaf_level {
                    return Err(bad("leaf above the allowed level"));
                }
                if !self.format.addr(e).is_aligned(pos.level.size()) {
                    return Err(bad("huge leaf frame not aligned"));
                }
                census.leaves[pos.level.get() as usize - 1] += 1;
            } else {
                let child = self.format.addr(e);
                if self.alloc.table(child).is_none() {
                    return Err(bad("table entry points outside page-table memory"));
                }
                if !seen.insert(child) {
                    return Err(bad("table linked twice"));
                }
                census.tables += 1;
            }
        }
        Ok(census)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::decision::format::MEMTYPE_WB;
    use crate::event::clock::ManualClock;
    use crate::table::page_alloc::Arena;
    use alloc::vec;
    use alloc::vec::Vec;

    const WB: LeafAttrs = LeafAttrs {
        memtype: MEMTYPE_WB,
        ipat: false,
        snoop: false,
        pinned: false,
    };
    const PINNED: LeafAttrs = LeafAttrs { pinned: true, ..WB };
    const G: u64 = 0x40_0000_0000;

    fn mmu(arena: &Arena) -> TdpMmu<&Arena, Vec<Event>, ManualClock> {
        TdpMmu::new(arena, PteFormat::EPT4, Vec::new(), ManualClock::new(0), 1)
    }

    #[test]
    fn map_lookup_and_census() {
        let arena = Arena::new(64).unwrap();
        let mut m = mmu(&arena);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        let out = m
            .map(
                r,
                &Mapping {
                    gfn: Gfn(0),
                    frames: 1024,
                    hpa: Hpa(G),
                    level: Level::L1,
                    perms: Perms::RW,
                    attrs: WB,
                },
            )
            .unwrap();
        assert_eq!(out.entries, 1024);
        assert_eq!(out.tables_allocated, 4); // PDPT, PD, two PTs
        let leaf = m.lookup(r, Gfn(513)).unwrap().unwrap();
        assert_eq!(
            (leaf.gfn, leaf.level, leaf.hpa),
            (Gfn(513), Level::L1, Hpa(G + 513 * 4096))
        );
        let c = m.check_well_formed(r).unwrap();
        assert_eq!(c.tables, 5);
        assert_eq!(c.leaves, [1024, 0, 0]);
        assert_eq!(arena.pages_in_use(), 5);
        assert!(m.lookup(r, Gfn(1024)).unwrap().is_none());
    }

    #[test]
    fn pinned_leaves_are_never_zapped_or_repointed() {
        let arena = Arena::new(64).unwrap();
        let mut m = mmu(&arena);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        m.map(
            r,
            &Mapping {
                gfn: Gfn(512),
                frames: 512,
                hpa: Hpa(G),
                level: Level::L2,
                perms: Perms::RW,
                attrs: PINNED,
            },
        )
        .unwrap();
        m.map(
            r,
            &Mapping {
                gfn: Gfn(0),
                frames: 16,
                hpa: Hpa(G + (4 << 20)),
                level: Level::L1,
                perms: Perms::RW,
                attrs: WB,
            },
        )
        .unwrap();
        let before = m.leaves(r).unwrap();
        assert_eq!(
            m.zap(r, Gfn(0), 1024, true),
            Err(MmuError::PinnedZap { gfn: Gfn(512) })
        );
        assert_eq!(
            m.map(
                r,
                &Mapping {
                    gfn: Gfn(512),
                    frames: 512,
                    hpa: Hpa(G + (2 << 20)),
                    level: Level::L2,
                    perms: Perms::RW,
                    attrs: PINNED
                }
            ),
            Err(MmuError::PinnedRepoint { gfn: Gfn(512) })
        );
        assert_eq!(
            m.leaves(r).unwrap(),
            before,
            "a refused request changes nothing"
        );
        // Mapping it to exactly what it is, and changing rights, are fine.
        m.map(
            r,
            &Mapping {
                gfn: Gfn(512),
                frames: 512,
                hpa: Hpa(G),
                level: Level::L2,
                perms: Perms::RW,
                attrs: PINNED,
            },
        )
        .unwrap();
        m.set_perms(r, Gfn(512), 1, Perms::RWX).unwrap();
        assert_eq!(m.lookup(r, Gfn(700)).unwrap().unwrap().perms, Perms::RWX);
        // The unpinned range goes.
        assert_eq!(m.zap(r, Gfn(0), 512, true).unwrap().entries, 16);
    }

    #[test]
    fn pinned_leaves_keep_the_rights_dma_uses() {
        use crate::decision::addr::Iova;
        use crate::iommu::walker::{Access, DmaWalker};
        let arena = Arena::new(64).unwrap();
        let mut m = mmu(&arena);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        let pinned = Mapping {
            gfn: Gfn(512),
            frames: 512,
            hpa: Hpa(G),
            level: Level::L2,
            perms: Perms::RW,
            attrs: PINNED,
        };
        m.map(r, &pinned).unwrap();
        let before = m.leaves(r).unwrap();
        // Taking read or write away from a pinned leaf would fault its device: refused whole.
        let refused = Err(MmuError::PinnedRights { gfn: Gfn(512) });
        assert_eq!(m.set_perms(r, Gfn(0), 1024, Perms::R), refused);
        assert_eq!(
            m.set_perms(r, Gfn(700), 1, Perms::NONE),
            Err(MmuError::PinnedRights { gfn: Gfn(700) })
        );
        assert_eq!(m.write_protect(r, Gfn(512), 512), refused);
        assert_eq!(
            m.leaves(r).unwrap(),
            before,
            "a refused request changes nothing"
        );
        // Gaining a right is fine, and giving it back.
        m.set_perms(r, Gfn(512), 1, Perms::RWX).unwrap();
        m.set_perms(r, Gfn(512), 1, Perms::RW).unwrap();
        // Hardware sets A/D on use; mapping the leaf again to what it is stays allowed.
        let root_pa = m.root(r).unwrap().pa;
        DmaWalker::native(&PteFormat::EPT4, true)
            .translate(&arena, root_pa, Iova(512 << 12), Access::Write)
            .unwrap();
        m.map(r, &pinned).unwrap();
        m.check_well_formed(r).unwrap();
    }

    #[test]
    fn split_then_collapse_round_trips_and_keeps_pinning() {
        let arena = Arena::new(64).unwrap();
        let mut m = mmu(&arena);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        m.map(
            r,
            &Mapping {
                gfn: Gfn(1 << 18),
                frames: 1 << 18,
                hpa: Hpa(G),
                level: Level::L3,
                perms: Perms::RW,
                attrs: PINNED,
            },
        )
        .unwrap();
        let huge = m.leaves(r).unwrap();
        m.split(r, Gfn((1 << 18) + 5), Level::L3).unwrap();
        assert_eq!(m.check_well_formed(r).unwrap().leaves, [0, 512, 0]);
        m.split(r, Gfn((1 << 18) + 5), Level::L2).unwrap();
        let l = m.lookup(r, Gfn((1 << 18) + 5)).unwrap().unwrap();
        assert_eq!(
            (l.level, l.hpa, l.attrs.pinned),
            (Level::L1, Hpa(G + 5 * 4096), true)
        );
        m.collapse(r, Gfn(1 << 18), Level::L2).unwrap();
        m.collapse(r, Gfn(1 << 18), Level::L3).unwrap();
        assert_eq!(m.leaves(r).unwrap(), huge);
        let kinds: Vec<_> = m.sink().iter().map(|e| e.kind.name()).collect();
        assert_eq!(
            kinds,
            vec![
                "root_alloc",
                "huge_page_split",
                "huge_page_split",
                "huge_page_collapse",
                "huge_page_collapse"
            ]
        );
        // Both child tables went back (retired) to the allocator: PML4 and PDPT remain.
        assert_eq!(arena.pages_in_use(), 2);
    }

    #[test]
    fn collapse_refuses_mixed_tables() {
        let arena = Arena::new(64).unwrap();
        let mut m = mmu(&arena);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        m.map(
            r,
            &Mapping {
                gfn: Gfn(0),
                frames: 512,
                hpa: Hpa(G),
                level: Level::L1,
                perms: Perms::RW,
                attrs: WB,
            },
        )
        .unwrap();
        m.set_perms(r, Gfn(3), 1, Perms::R).unwrap();
        let err = m.collapse(r, Gfn(0), Level::L2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "gfn 0x0: cannot collapse into a level-2 leaf: the entries differ in rights or attributes"
        );
        m.set_perms(r, Gfn(3), 1, Perms::RW).unwrap();
        m.zap(r, Gfn(7), 1, false).unwrap();
        assert!(matches!(
            m.collapse(r, Gfn(0), Level::L2),
            Err(MmuError::NotCollapsible { .. })
        ));
    }

    #[test]
    fn huge_leaf_replaces_an_empty_table_but_not_a_full_one() {
        let arena = Arena::new(64).unwrap();
        let mut m = mmu(&arena);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        m.map(
            r,
            &Mapping {
                gfn: Gfn(0),
                frames: 4,
                hpa: Hpa(G),
                level: Level::L1,
                perms: Perms::RW,
                attrs: WB,
            },
        )
        .unwrap();
        assert_eq!(
            m.map(
                r,
                &Mapping {
                    gfn: Gfn(0),
                    frames: 512,
                    hpa: Hpa(G),
                    level: Level::L2,
                    perms: Perms::RW,
                    attrs: WB
                }
            ),
            Err(MmuError::Occupied {
                gfn: Gfn(0),
                level: Level::L2
            })
        );
        m.zap(r, Gfn(0), 4, false).unwrap();
        m.map(
            r,
            &Mapping {
                gfn: Gfn(0),
                frames: 512,
                hpa: Hpa(G),
                level: Level::L2,
                perms: Perms::RW,
                attrs: WB,
            },
        )
        .unwrap();
        assert_eq!(m.check_well_formed(r).unwrap().leaves, [0, 1, 0]);
        assert_eq!(arena.pages_in_use(), 3, "the empty PT was freed");
    }

    #[test]
    fn bad_requests_are_named() {
        let arena = Arena::new(8).unwrap();
        let mut m = mmu(&arena);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        assert_eq!(
            m.map(
                r,
                &Mapping {
                    gfn: Gfn(1),
                    frames: 512,
                    hpa: Hpa(G),
                    level: Level::L2,
                    perms: Perms::RW,
                    attrs: WB
                }
            )
            .unwrap_err()
            .to_string(),
            "gfn 0x1 is not aligned to the 2048 KiB pages of level 2"
        );
        m.set_max_leaf_level(Level::L2);
        assert_eq!(
            m.map(
                r,
                &Mapping {
                    gfn: Gfn(0),
                    frames: 1 << 18,
                    hpa: Hpa(G),
                    level: Level::L3,
                    perms: Perms::RW,
                    attrs: WB
                }
            ),
            Err(MmuError::BadLevel {
                level: Level::L3,
                max: Level::L2
            })
        );
        assert_eq!(
            m.map(
                r,
                &Mapping {
                    gfn: Gfn(1 << 36),
                    frames: 1,
                    hpa: Hpa(G),
                    level: Level::L1,
                    perms: Perms::RW,
                    attrs: WB
                }
            ),
            Err(MmuError::OutOfRange { gfn: Gfn(1 << 36) })
        );
        assert_eq!(
            m.split(r, Gfn(0), Level::L2),
            Err(MmuError::NotHuge {
                gfn: Gfn(0),
                level: Level::L2
            })
        );
        assert_eq!(
            m.zap(RootId(99), Gfn(0), 1, false),
            Err(MmuError::NoRoot(RootId(99)))
        );
    }

    #[test]
    fn free_root_returns_every_page() {
        let arena = Arena::new(64).unwrap();
        let mut m = mmu(&arena);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        m.map(
            r,
            &Mapping {
                gfn: Gfn(0),
                frames: 2048,
                hpa: Hpa(G),
                level: Level::L1,
                perms: Perms::RW,
                attrs: PINNED,
            },
        )
        .unwrap();
        let out = m.free_root(r, RootCause::Released).unwrap();
        assert_eq!((out.entries, out.tables_freed), (2048, 7));
        assert_eq!(arena.pages_in_use(), 0);
        assert!(m.roots().is_empty());
    }

    #[test]
    fn spte_tracing_reports_each_change() {
        let arena = Arena::new(8).unwrap();
        let mut m = mmu(&arena);
        m.set_trace_sptes(true);
        let r = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
        m.map(
            r,
            &Mapping {
                gfn: Gfn(0),
                frames: 2,
                hpa: Hpa(G),
                level: Level::L1,
                perms: Perms::RW,
                attrs: WB,
            },
        )
        .unwrap();
        m.write_protect(r, Gfn(0), 1).unwrap();
        let sets: Vec<_> = m
            .sink()
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::SpteSet { gfn, old, new, .. } => {
                    Some((gfn.0, old.to_string(), new.to_string()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            sets,
            vec![
                (0, "---------".into(), "prw------".into()),
                (1, "---------".into(), "prw------".into()),
                (0, "prw------".into(), "pr-------".into()),
            ]
        );
    }
}
