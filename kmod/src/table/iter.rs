//! A pre-order walk over the entries of one root that cover a range of guest frames, modelled on
//! Linux's `arch/x86/kvm/mmu/tdp_iter.c`.
//!
//! Locking rule: the caller holds a read-side section of the allocator (or is the writer); the
//! iterator itself only loads entries. It re-reads an entry before stepping down into it, so a
//! caller that installs a child table at the current position is walked into it, and one that
//! clears the entry is not.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::decision::addr::{Gfn, Hpa, Level};
use crate::decision::format::PteFormat;
use crate::table::page_alloc::PageAllocator;

/// Where the walk stands: the entry covering `gfn` at `level`.
#[derive(Debug, Clone, Copy)]
pub struct IterPos<'a> {
    /// First guest frame the entry covers.
    pub gfn: Gfn,
    pub level: Level,
    pub sptep: &'a AtomicU64,
    /// The entry's value when the walk reached it.
    pub old: u64,
}

impl IterPos<'_> {
    /// One past the last guest frame the entry covers.
    pub fn end_gfn(&self) -> Gfn {
        self.gfn + self.level.frames()
    }
}

/// The walk. Yields every entry at `min_level` or above whose span intersects `[start, end)`,
/// parents before children.
#[derive(Debug)]
pub struct TdpIter<'a, A: PageAllocator> {
    alloc: &'a A,
    format: PteFormat,
    min_level: Level,
    start: Gfn,
    end: Gfn,
    /// The table being walked at each level (index = level).
    tables: [Hpa; 6],
    gfn: Gfn,
    level: Level,
    current: Option<&'a AtomicU64>,
    skip_children: bool,
    started: bool,
    done: bool,
}

impl<'a, A: PageAllocator> TdpIter<'a, A> {
    pub fn new(
        alloc: &'a A,
        format: PteFormat,
        root: Hpa,
        min_level: Level,
        start: Gfn,
        end: Gfn,
    ) -> Self {
        let level = format.levels;
        let mut tables = [Hpa(0); 6];
        tables[level.get() as usize] = root;
        let end = end.min(format.gfn_limit());
        Self {
            alloc,
            format,
            min_level,
            start,
            end,
            tables,
            gfn: start.align_down(level),
            level,
            current: None,
            skip_children: false,
            started: false,
            done: start >= end,
        }
    }

    /// Do not descend below the entry just yielded (its subtree was handled by the caller).
    pub fn skip_children(&mut self) {
        self.skip_children = true;
    }

    fn sptep(&self) -> Option<&'a AtomicU64> {
        let table = self.alloc.table(self.tables[self.level.get() as usize])?;
        Some(&table[self.level.index(self.gfn)])
    }

    fn try_step_down(&mut self) -> bool {
        if self.level <= self.min_level || core::mem::take(&mut self.skip_children) {
            return false;
        }
        let Some(sptep) = self.current else {
            return false;
        };
        let e = sptep.load(Ordering::Acquire);
        if !self.format.is_present(e) || self.format.is_leaf(e, self.level) {
            return false;
        }
        let child = self.format.addr(e);
        let Some(below) = self.level.down() else {
            return false;
        };
        if self.alloc.table(child).is_none() {
            return false;
        }
        self.level = below;
        self.tables[below.get() as usize] = child;
        self.gfn = self.gfn.max(self.start).align_down(below);
        true
    }

    fn try_step_side(&mut self) -> bool {
        if self.level.index(self.gfn) == 511 {
            return false;
        }
        self.gfn = self.gfn + self.level.frames();
        true
    }

    fn try_step_up(&mut self) -> bool {
        if self.level == self.format.levels {
            return false;
        }
        let Some(above) = self.level.up() else {
            return false;
        };
        self.level = above;
        self.gfn = self.gfn.align_down(above);
        true
    }

    fn advance(&mut self) -> bool {
        if self.try_step_down() {
            return true;
        }
        self.skip_children = false;
        loop {
            if self.try_step_side() {
                return true;
            }
            if !self.try_step_up() {
                return false;
            }
        }
    }
}

impl<'a, A: PageAllocator> Iterator for TdpIter<'a, A> {
    type Item = IterPos<'a>;

    fn next(&mut self) -> Option<IterPos<'a>> {
        if self.done {
            return None;
        }
        if self.started && !self.advance() {
            self.done = true;
            return None;
        }
        self.started = true;
        if self.gfn >= self.end {
            self.done = true;
            return None;
        }
        let Some(sptep) = self.sptep() else {
            self.done = true;
            return None;
        };
        self.current = Some(sptep);
        Some(IterPos {
            gfn: self.gfn,
            level: self.level,
            sptep,
            old: sptep.load(Ordering::Acquire),
        })
    }
}
