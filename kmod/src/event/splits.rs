//! Why a huge page was split. The tracepoint carries no reason, so it is inferred from what
//! came before the split in the same VM, in this order: the slot has dirty logging on
//! (`dirty_logging`); an instruction fetch faulted inside the huge page within the window
//! (`nx_hugepage`, KVM's iTLB-multihit mitigation); the huge leaf lost rights within the window
//! or its slot is read-only (`permission_change`); the huge page's range is not wholly inside
//! one memslot (`memslot_boundary`); otherwise `other` — MTRR-forced small pages, among others,
//! leave no event to tell them by.
//!
//! One model for the analysis's huge-page report and the exporter's
//! `tdpshare_huge_page_splits_total{reason}`. Memory is bounded by the VM's memslots and the
//! faults and right losses of the last window ([`SplitCauses::prune`]).

use alloc::collections::BTreeMap;

use crate::event::{Event, EventKind, Memslot, SpteFlags};

/// x86 page-fault error code: instruction fetch.
pub const PFERR_FETCH: u64 = 1 << 4;

/// Why a huge page was split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SplitReason {
    DirtyLogging,
    NxHugepage,
    PermissionChange,
    MemslotBoundary,
    Other,
}

impl SplitReason {
    /// Every reason, in the order they are tried.
    pub const ALL: [SplitReason; 5] = [
        SplitReason::DirtyLogging,
        SplitReason::NxHugepage,
        SplitReason::PermissionChange,
        SplitReason::MemslotBoundary,
        SplitReason::Other,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            SplitReason::DirtyLogging => "dirty_logging",
            SplitReason::NxHugepage => "nx_hugepage",
            SplitReason::PermissionChange => "permission_change",
            SplitReason::MemslotBoundary => "memslot_boundary",
            SplitReason::Other => "other",
        }
    }

    /// A table the IOMMU walks alone could keep the page huge: the IOMMU never executes, and
    /// with its own dirty tracking (VT-d SLADE, AMD HD) it needs no split to log writes.
    pub const fn iommu_exempt(self) -> bool {
        matches!(self, SplitReason::NxHugepage | SplitReason::DirtyLogging)
    }

    /// Position in [`SplitReason::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// What one VM's events say about its coming splits.
#[derive(Debug, Clone, Default)]
pub struct SplitCauses {
    slots: BTreeMap<(u8, u16), Memslot>,
    /// (huge page number, level) → the time of the last fetch fault inside it.
    fetch_faults: BTreeMap<(u64, u8), u64>,
    /// Huge leaves that lost rights: (gfn, level) → when.
    perm_loss: BTreeMap<(u64, u8), u64>,
    /// How far back a fault or a loss of rights explains a split.
    pub window_ns: u64,
}

impl SplitCauses {
    pub fn new(window_ns: u64) -> Self {
        Self {
            window_ns,
            ..Self::default()
        }
    }

    /// Takes in one event of the VM (in time order).
    pub fn observe(&mut self, e: &Event) {
        match &e.kind {
            EventKind::MemslotAdd(s) => {
                self.slots.insert((s.as_id, s.slot), *s);
            }
            EventKind::MemslotDelete(s) => {
                self.slots.remove(&(s.as_id, s.slot));
            }
            EventKind::MemslotMove { slot, .. } | EventKind::MemslotFlags { slot, .. } => {
                self.slots.insert((slot.as_id, slot.slot), *slot);
            }
            EventKind::PageFault { gfn, error_code } if error_code & PFERR_FETCH != 0 => {
                for level in 2..=3u8 {
                    let frames = 1u64 << (9 * u32::from(level - 1));
                    self.fetch_faults.insert((gfn.0 / frames, level), e.ts_ns);
                }
            }
            EventKind::SpteSet {
                gfn,
                level,
                old,
                new,
            } if *level > 1 => {
                let rights = [SpteFlags::READ, SpteFlags::WRITE, SpteFlags::EXEC];
                let lost = new.contains(SpteFlags::PRESENT)
                    && rights.iter().any(|&r| old.contains(r) && !new.contains(r));
                if lost {
                    self.perm_loss.insert((gfn.0, *level), e.ts_ns);
                }
            }
            _ => {}
        }
    }

    /// The slot (address space 0) holding `gfn`.
    fn slot_of(&self, gfn: u64) -> Option<&Memslot> {
        let gpa = gfn << 12;
        self.slots
            .values()
            .find(|s| s.as_id == 0 && gpa >= s.gpa.0 && gpa < s.gpa.0 + s.size)
    }

    /// Why the huge page at `gfn` of `level` was split at `ts_ns`.
    pub fn reason(&self, ts_ns: u64, gfn: u64, level: u8) -> SplitReason {
        let shift = 9 * u32::from(level.clamp(1, 3) - 1);
        let size = 4096u64 << shift;
        let start = gfn << 12;
        let slot = self.slot_of(gfn);
        if slot.is_some_and(|s| s.flags & Memslot::FLAG_LOG_DIRTY != 0) {
            return SplitReason::DirtyLogging;
        }
        if self
            .fetch_faults
            .get(&(gfn >> shift, level))
            .is_some_and(|&t| ts_ns.saturating_sub(t) <= self.window_ns)
        {
            return SplitReason::NxHugepage;
        }
        let lost_rights = self
            .perm_loss
            .get(&(gfn, level))
            .is_some_and(|&t| ts_ns.saturating_sub(t) <= self.window_ns);
        if lost_rights || slot.is_some_and(|s| s.flags & Memslot::FLAG_READONLY != 0) {
            return SplitReason::PermissionChange;
        }
        match slot {
            Some(s) if start >= s.gpa.0 && start.saturating_add(size) <= s.gpa.0 + s.size => {
                SplitReason::Other
            }
            _ => SplitReason::MemslotBoundary,
        }
    }

    /// Forgets faults and right losses older than the window before `now_ns`: they can no
    /// longer explain a split. A long-running consumer calls it now and then.
    pub fn prune(&mut self, now_ns: u64) {
        let keep = |t: &u64| now_ns.saturating_sub(*t) <= self.window_ns;
        self.fetch_faults.retain(|_, t| keep(t));
        self.perm_loss.retain(|_, t| keep(t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Gfn, Gpa, Source};

    fn ev(ts: u64, kind: EventKind) -> Event {
        Event::new(ts, 1, Source::Live, kind)
    }

    fn slot(flags: u32) -> Memslot {
        Memslot {
            slot: 0,
            as_id: 0,
            gpa: Gpa(0),
            size: 1 << 30,
            flags,
            ua: 0,
        }
    }

    #[test]
    fn each_reason_from_what_came_before() {
        let mut c = SplitCauses::new(1_000);
        c.observe(&ev(0, EventKind::MemslotAdd(slot(0))));
        assert_eq!(c.reason(10, 512, 2), SplitReason::Other);
        // Past the slot's end.
        assert_eq!(c.reason(10, (1 << 18) - 1, 2), SplitReason::MemslotBoundary);
        c.observe(&ev(
            20,
            EventKind::PageFault {
                gfn: Gfn(512 + 7),
                error_code: PFERR_FETCH,
            },
        ));
        assert_eq!(c.reason(30, 512, 2), SplitReason::NxHugepage);
        assert_eq!(
            c.reason(2_000, 512, 2),
            SplitReason::Other,
            "outside the window"
        );
        c.observe(&ev(
            40,
            EventKind::MemslotFlags {
                old_flags: 0,
                slot: slot(Memslot::FLAG_LOG_DIRTY),
            },
        ));
        assert_eq!(c.reason(50, 512, 2), SplitReason::DirtyLogging);
        assert_eq!(
            SplitReason::ALL[SplitReason::PermissionChange.index()].name(),
            "permission_change"
        );
    }

    #[test]
    fn pruning_forgets_only_what_the_window_no_longer_reaches() {
        let mut c = SplitCauses::new(1_000);
        for t in [0, 500, 1_800] {
            c.observe(&ev(
                t,
                EventKind::PageFault {
                    gfn: Gfn(t << 9),
                    error_code: PFERR_FETCH,
                },
            ));
        }
        c.prune(2_000);
        assert_eq!(
            c.fetch_faults.len(),
            2,
            "only the fault at 1800, at both levels"
        );
    }
}
