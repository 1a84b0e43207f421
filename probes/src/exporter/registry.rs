//! The exporter's state: every series, kept up to date from the event stream, read by scrapes.
//!
//! One lock rule: the registry sits behind one mutex ([`super::Shared`]); the source thread
//! holds it while it applies a batch of events, a scrape while it renders. Nothing here blocks
//! or does I/O except through [`Host`].

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use tdpshare::event::splits::{SplitCauses, SplitReason};
use tdpshare::event::{Event, EventKind, FlushScope, PrepopCause, RootCause, VmId};

/// How far back a fetch fault or a loss of rights explains a split (as the analysis's default).
pub const SPLIT_WINDOW_NS: u64 = 1_000_000_000;

/// What the registry asks of the machine about a VMM process. Live: `/proc` ([`ProcHost`]);
/// tests and the load benchmark: fixed answers.
pub trait Host: Send + Sync {
    /// The process's name (`/proc/PID/comm`: `qemu-system-x86`, `cloud-hyperviso`).
    fn process_name(&self, pid: u32) -> Option<String>;
    /// Still running (a zombie is not).
    fn running(&self, pid: u32) -> bool;
}

/// The live machine's `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcHost;

impl Host for ProcHost {
    fn process_name(&self, pid: u32) -> Option<String> {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        Some(comm.trim_end().to_owned())
    }

    fn running(&self, pid: u32) -> bool {
        crate::vmm::running(pid)
    }
}

/// Limits on what the registry keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// VMs tracked one by one; events of further VMs go to `vm="other"`.
    pub max_vms: usize,
    /// How long an exited VM's series stay (so the last scrape after its exit still sees its
    /// final counts), then they are removed.
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_vms: 128,
            grace: Duration::from_secs(300),
        }
    }
}

/// Latency histogram buckets, seconds: powers of four from 1 µs to about 4 s.
pub const BUCKETS: [f64; 12] = [
    0.000_001, 0.000_004, 0.000_016, 0.000_064, 0.000_256, 0.001_024, 0.004_096, 0.016_384,
    0.065_536, 0.262_144, 1.048_576, 4.194_304,
];

/// A latency histogram in [`BUCKETS`] (non-cumulative counts; the renderer accumulates).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations in each bucket; the last slot is above the largest bound (`+Inf`).
    pub counts: [u64; BUCKETS.len() + 1],
    pub count: u64,
    pub sum_ns: u64,
}

impl Histogram {
    pub fn observe_ns(&mut self, ns: u64) {
        let secs = ns as f64 / 1e9;
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }
}

/// Pre-population causes, in label order.
pub const PREPOP_CAUSES: [PrepopCause; 5] = [
    PrepopCause::SharingStart,
    PrepopCause::NewRoot,
    PrepopCause::MemslotAdd,
    PrepopCause::HugePageSplit,
    PrepopCause::PreFault,
];

/// Root causes, in label order.
pub const ROOT_CAUSES: [RootCause; 6] = [
    RootCause::Initial,
    RootCause::MemslotChange,
    RootCause::Smm,
    RootCause::ContextReset,
    RootCause::Released,
    RootCause::Unknown,
];

/// IOTLB flush scopes, in label order.
pub const FLUSH_SCOPES: [FlushScope; 4] = [
    FlushScope::All,
    FlushScope::Domain,
    FlushScope::Range,
    FlushScope::RangeLeaves,
];

/// Memslot operations, in label order.
pub const MEMSLOT_OPS: [&str; 4] = ["add", "delete", "move", "flags"];

/// The event classes (`path` label), as [`tdpshare::event::Path::name`] spells them.
pub const PATHS: [tdpshare::event::Path; 5] = [
    tdpshare::event::Path::Prepopulation,
    tdpshare::event::Path::RootUpdate,
    tdpshare::event::Path::Iommu,
    tdpshare::event::Path::Memslot,
    tdpshare::event::Path::Sharing,
];

fn index<T: PartialEq>(all: &[T], v: &T) -> usize {
    all.iter().position(|x| x == v).unwrap_or(0)
}

/// One VM's series.
#[derive(Debug, Clone)]
pub struct VmMetrics {
    /// The VMM's process name (`vmm` label), fixed when the VM is first seen.
    pub vmm: String,
    /// The VM's name from its `vm_name` event (`tdpshare_vm_info`).
    pub name: String,
    pub events: [u64; PATHS.len()],
    pub prepopulations: [u64; PREPOP_CAUSES.len()],
    /// Entries written by pre-population, by leaf level 1 (4 KiB), 2 (2 MiB), 3 (1 GiB).
    pub prepop_entries: [u64; 3],
    pub prepop_seconds: Histogram,
    pub roots_allocated: [u64; ROOT_CAUSES.len()],
    pub roots_freed: [u64; ROOT_CAUSES.len()],
    pub root_switches: [u64; ROOT_CAUSES.len()],
    pub fast_zaps: u64,
    pub zaps: u64,
    pub zapped_entries: u64,
    /// Huge pages split, by the level of the huge page (2: 2 MiB, 3: 1 GiB) and the reason
    /// ([`SplitReason::ALL`] order).
    pub splits: [[u64; SplitReason::ALL.len()]; 2],
    /// What explains the VM's splits (its slots, recent fetch faults and right losses).
    pub causes: SplitCauses,
    /// The VM's latest event time (the clock the split causes are pruned on).
    pub last_ts_ns: u64,
    /// Leaves collapsed back into huge pages, by level.
    pub collapses: [u64; 2],
    pub page_faults: u64,
    pub iotlb_flushes: [u64; FLUSH_SCOPES.len()],
    pub iotlb_flush_seconds: Histogram,
    pub memslot_ops: [u64; MEMSLOT_OPS.len()],
    pub dma_maps: u64,
    pub dma_unmaps: u64,
    pub dma_map_bytes: u64,
    pub dma_unmap_bytes: u64,
    pub dma_map_seconds: Histogram,
    pub dma_unmap_seconds: Histogram,
    /// IO page faults the TDP fault path resolved (0) or not (1).
    pub io_page_faults: [u64; 2],
    pub pinned_bytes: u64,
    pub smm_transitions: u64,
    /// Control register writes: CR0, CR4.
    pub cr_writes: [u64; 2],
    /// Sharing as the events tell it: (mode, state) with state `requested`, `granted`,
    /// `refused` or `stopped`.
    pub sharing: Option<(String, &'static str)>,
    pub sharing_refusals: u64,
    /// When its VMM was found gone (series are kept for the grace period).
    pub exited_at: Option<Instant>,
}

impl Default for VmMetrics {
    fn default() -> Self {
        Self {
            vmm: String::new(),
            name: String::new(),
            events: [0; PATHS.len()],
            prepopulations: [0; PREPOP_CAUSES.len()],
            prepop_entries: [0; 3],
            prepop_seconds: Histogram::default(),
            roots_allocated: [0; ROOT_CAUSES.len()],
            roots_freed: [0; ROOT_CAUSES.len()],
            root_switches: [0; ROOT_CAUSES.len()],
            fast_zaps: 0,
            zaps: 0,
            zapped_entries: 0,
            splits: [[0; SplitReason::ALL.len()]; 2],
            causes: SplitCauses::new(SPLIT_WINDOW_NS),
            last_ts_ns: 0,
            collapses: [0; 2],
            page_faults: 0,
            iotlb_flushes: [0; FLUSH_SCOPES.len()],
            iotlb_flush_seconds: Histogram::default(),
            memslot_ops: [0; MEMSLOT_OPS.len()],
            dma_maps: 0,
            dma_unmaps: 0,
            dma_map_bytes: 0,
            dma_unmap_bytes: 0,
            dma_map_seconds: Histogram::default(),
            dma_unmap_seconds: Histogram::default(),
            io_page_faults: [0; 2],
            pinned_bytes: 0,
            smm_transitions: 0,
            cr_writes: [0; 2],
            sharing: None,
            sharing_refusals: 0,
            exited_at: None,
        }
    }
}

fn slot(level: u8) -> Option<usize> {
    match level {
        2 => Some(0),
        3 => Some(1),
        _ => None,
    }
}

impl VmMetrics {
    fn apply(&mut self, e: &Event) {
        if let EventKind::VmName { name } = &e.kind {
            self.name.clone_from(name);
            return;
        }
        self.events[index(&PATHS, &e.kind.path())] += 1;
        self.causes.observe(e);
        self.last_ts_ns = self.last_ts_ns.max(e.ts_ns);
        match &e.kind {
            EventKind::PrepopulateStart { .. } => {}
            EventKind::PrepopulateEnd {
                page_size,
                cause,
                entries,
                leaves,
                ns,
                ..
            } => {
                self.prepopulations[index(&PREPOP_CAUSES, cause)] += 1;
                match leaves {
                    Some(l) => {
                        for (acc, n) in self.prepop_entries.iter_mut().zip(l) {
                            *acc = acc.saturating_add(*n);
                        }
                    }
                    None => {
                        let acc = &mut self.prepop_entries[page_size.index()];
                        *acc = acc.saturating_add(*entries);
                    }
                }
                self.prepop_seconds.observe_ns(*ns);
            }
            EventKind::RootAlloc(r) => self.roots_allocated[index(&ROOT_CAUSES, &r.cause)] += 1,
            EventKind::RootFree(r) => self.roots_freed[index(&ROOT_CAUSES, &r.cause)] += 1,
            EventKind::RootSwitch(r) => self.root_switches[index(&ROOT_CAUSES, &r.cause)] += 1,
            EventKind::FastZap { .. } => self.fast_zaps += 1,
            EventKind::Zap { entries, .. } => {
                self.zaps += 1;
                self.zapped_entries = self.zapped_entries.saturating_add(*entries);
            }
            EventKind::HugePageSplit { gfn, level } => {
                if let Some(i) = slot(*level) {
                    let why = self.causes.reason(e.ts_ns, gfn.0, *level);
                    self.splits[i][why.index()] += 1;
                }
            }
            EventKind::HugePageCollapse { level, .. } => {
                if let Some(i) = slot(*level) {
                    self.collapses[i] += 1;
                }
            }
            EventKind::SpteSet { .. } => {}
            EventKind::PageFault { .. } => self.page_faults += 1,
            EventKind::IommuMap { size, ns, .. } => {
                self.dma_maps += 1;
                self.dma_map_bytes = self.dma_map_bytes.saturating_add(*size);
                if *ns > 0 {
                    self.dma_map_seconds.observe_ns(*ns);
                }
            }
            EventKind::IommuUnmap { size, ns, .. } => {
                self.dma_unmaps += 1;
                self.dma_unmap_bytes = self.dma_unmap_bytes.saturating_add(*size);
                if *ns > 0 {
                    self.dma_unmap_seconds.observe_ns(*ns);
                }
            }
            EventKind::IotlbFlush { scope, ns, .. } => {
                self.iotlb_flushes[index(&FLUSH_SCOPES, scope)] += 1;
                if *ns > 0 {
                    self.iotlb_flush_seconds.observe_ns(*ns);
                }
            }
            EventKind::Pin { range, .. } => {
                self.pinned_bytes = self.pinned_bytes.saturating_add(range.size);
            }
            EventKind::Unpin { range, .. } => {
                self.pinned_bytes = self.pinned_bytes.saturating_sub(range.size);
            }
            EventKind::MemslotAdd(_) => self.memslot_ops[0] += 1,
            EventKind::MemslotDelete(_) => self.memslot_ops[1] += 1,
            EventKind::MemslotMove { .. } => self.memslot_ops[2] += 1,
            EventKind::MemslotFlags { .. } => self.memslot_ops[3] += 1,
            EventKind::SharingRequested { mode } => {
                self.sharing = Some((mode.name().to_owned(), "requested"));
            }
            EventKind::SharingStarted { mode, .. } => {
                self.sharing = Some((mode.name().to_owned(), "granted"));
            }
            EventKind::SharingStopped { mode, .. } => {
                self.sharing = Some((mode.name().to_owned(), "stopped"));
            }
            EventKind::SharingRefused { mode, .. } => {
                self.sharing = Some((mode.name().to_owned(), "refused"));
                self.sharing_refusals += 1;
            }
            EventKind::IoPageFault { resolved, .. } => {
                self.io_page_faults[usize::from(!*resolved)] += 1;
            }
            EventKind::SmmTransition { .. } => self.smm_transitions += 1,
            EventKind::CrWrite { cr, .. } => self.cr_writes[usize::from(*cr == 4)] += 1,
            EventKind::VmName { .. } => {}
        }
    }
}

/// One probe's state, as the loader left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeState {
    /// `system:event` it attaches to (two programs may share one: a tracepoint and its CO-RE
    /// twin).
    pub probe: String,
    /// The eBPF program: unique, so each series is.
    pub program: String,
    /// `attached`, `absent`, `denied`, `failed` or `not_built`.
    pub state: &'static str,
}

/// Everything a scrape shows.
#[derive(Debug)]
pub struct Registry {
    pub limits: Limits,
    vms: BTreeMap<VmId, VmMetrics>,
    /// Events of VMs past [`Limits::max_vms`].
    other: Option<VmMetrics>,
    /// VMs folded into `other` whose VMM still runs (each counted once).
    folded: HashSet<VmId>,
    pub folded_total: u64,
    pub expired_total: u64,
    pub events_total: u64,
    pub probes: Vec<ProbeState>,
    pub drops: u64,
    /// The source is attached and running (`/healthz`).
    pub ready: bool,
    /// Why the source is not (or no longer) running, for `/healthz`.
    pub not_ready: String,
    pub kernel: String,
}

impl Registry {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            vms: BTreeMap::new(),
            other: None,
            folded: HashSet::new(),
            folded_total: 0,
            expired_total: 0,
            events_total: 0,
            probes: Vec::new(),
            drops: 0,
            ready: false,
            not_ready: "starting: attaching the probes".into(),
            kernel: String::new(),
        }
    }

    /// Applies one event: a VM seen for the first time is named by `host` (or folded into
    /// `vm="other"` once [`Limits::max_vms`] are tracked).
    pub fn apply(&mut self, e: &Event, host: &dyn Host) {
        if !matches!(e.kind, EventKind::VmName { .. }) {
            self.events_total += 1;
        }
        if let Some(vm) = self.vms.get_mut(&e.vm) {
            vm.apply(e);
            return;
        }
        // A VM folded once stays folded while it runs, even when a slot frees up: its pins,
        // name and counts are in `other`, and moving it would split them.
        if self.folded.contains(&e.vm) || self.vms.len() >= self.limits.max_vms {
            if self.folded.insert(e.vm) {
                self.folded_total += 1;
            }
            let other = self.other.get_or_insert_with(|| VmMetrics {
                vmm: "other".into(),
                ..VmMetrics::default()
            });
            if !matches!(e.kind, EventKind::VmName { .. }) {
                other.apply(e);
            }
            return;
        }
        let vmm = u32::try_from(e.vm)
            .ok()
            .and_then(|pid| host.process_name(pid))
            .unwrap_or_default();
        let vm = self.vms.entry(e.vm).or_insert_with(|| VmMetrics {
            vmm,
            ..VmMetrics::default()
        });
        vm.apply(e);
    }

    /// Marks VMs whose VMM has exited and removes those past the grace period (returned, so
    /// that the caller forgets them too); forgets folded VMs that are gone (so that set stays as
    /// small as the running VMMs). Called about once a second by the source thread.
    pub fn sweep(&mut self, now: Instant, host: &dyn Host) -> Vec<VmId> {
        for (&id, vm) in &mut self.vms {
            if vm.exited_at.is_none() && !u32::try_from(id).is_ok_and(|pid| host.running(pid)) {
                vm.exited_at = Some(now);
            }
            vm.causes.prune(vm.last_ts_ns);
        }
        if let Some(other) = &mut self.other {
            other.causes.prune(other.last_ts_ns);
        }
        let grace = self.limits.grace;
        let expired: Vec<VmId> = self
            .vms
            .iter()
            .filter(|(_, vm)| {
                vm.exited_at
                    .is_some_and(|at| now.duration_since(at) >= grace)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in &expired {
            self.vms.remove(id);
        }
        self.expired_total += expired.len() as u64;
        let mut gone = Vec::new();
        self.folded.retain(|&id| {
            let runs = u32::try_from(id).is_ok_and(|pid| host.running(pid));
            if !runs {
                gone.push(id);
            }
            runs
        });
        gone.extend(expired);
        gone
    }

    /// The tracked VMs (id, series), then `other` if any VM was folded.
    pub fn vms(&self) -> impl Iterator<Item = (Option<VmId>, &VmMetrics)> {
        self.vms
            .iter()
            .map(|(&id, m)| (Some(id), m))
            .chain(self.other.iter().map(|m| (None, m)))
    }

    pub fn tracked(&self) -> usize {
        self.vms.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdpshare::event::{GpaRange, Memslot, PageSize, Root, Source};
    use tdpshare::{Gpa, Iova};

    /// Pids 1..=99 run, named `vmm-PID`.
    struct Fake;
    impl Host for Fake {
        fn process_name(&self, pid: u32) -> Option<String> {
            Some(format!("vmm-{pid}"))
        }
        fn running(&self, pid: u32) -> bool {
            pid < 100
        }
    }

    fn ev(vm: VmId, kind: EventKind) -> Event {
        Event::new(1, vm, Source::Live, kind)
    }

    #[test]
    fn events_become_the_vm_s_counts() {
        let mut r = Registry::new(Limits::default());
        let slot = Memslot {
            slot: 0,
            as_id: 0,
            gpa: Gpa(0),
            size: 1 << 30,
            flags: 0,
            ua: 0,
        };
        for kind in [
            EventKind::VmName {
                name: "web1".into(),
            },
            EventKind::MemslotAdd(slot),
            EventKind::MemslotDelete(slot),
            EventKind::FastZap {
                generation: 1,
                pages: 9,
            },
            EventKind::RootAlloc(Root {
                root: 1,
                level: 4,
                smm: false,
                cause: RootCause::MemslotChange,
            }),
            EventKind::PrepopulateEnd {
                range: GpaRange::new(Gpa(0), 1 << 30),
                page_size: PageSize::Size2M,
                cause: PrepopCause::NewRoot,
                entries: 512,
                leaves: None,
                ns: 3_000_000,
            },
            EventKind::IommuMap {
                iova: Iova(0),
                size: 4096,
                ns: 2_000,
            },
            EventKind::Pin {
                range: GpaRange::new(Gpa(0), 1 << 30),
                pages: 1 << 18,
            },
        ] {
            r.apply(&ev(7, kind), &Fake);
        }
        assert_eq!(r.events_total, 7, "the name is not an event");
        let (_, vm) = r.vms().next().unwrap();
        assert_eq!((vm.vmm.as_str(), vm.name.as_str()), ("vmm-7", "web1"));
        assert_eq!(vm.memslot_ops, [1, 1, 0, 0]);
        assert_eq!(vm.fast_zaps, 1);
        assert_eq!(vm.roots_allocated[1], 1);
        assert_eq!(vm.prepopulations[1], 1);
        assert_eq!(vm.prepop_entries, [0, 512, 0]);
        // 3 ms lands in the 4.096 ms bucket.
        assert_eq!(vm.prepop_seconds.counts[6], 1);
        assert_eq!(vm.dma_map_bytes, 4096);
        assert_eq!(vm.pinned_bytes, 1 << 30);
    }

    #[test]
    fn splits_are_counted_by_level_and_reason() {
        let mut r = Registry::new(Limits::default());
        let dirty = Memslot {
            slot: 0,
            as_id: 0,
            gpa: Gpa(0),
            size: 1 << 30,
            flags: Memslot::FLAG_LOG_DIRTY,
            ua: 0,
        };
        r.apply(&ev(3, EventKind::MemslotAdd(dirty)), &Fake);
        let split = |gfn| EventKind::HugePageSplit {
            gfn: tdpshare::Gfn(gfn),
            level: 2,
        };
        r.apply(&ev(3, split(512)), &Fake);
        // Past the slot: a memslot boundary.
        r.apply(&ev(3, split(1 << 18)), &Fake);
        let (_, vm) = r.vms().next().unwrap();
        assert_eq!(vm.splits[0][SplitReason::DirtyLogging.index()], 1);
        assert_eq!(vm.splits[0][SplitReason::MemslotBoundary.index()], 1);
        assert_eq!(vm.splits[1], [0; 5]);
    }

    #[test]
    fn vms_past_the_cap_fold_into_other_once_each() {
        let mut r = Registry::new(Limits {
            max_vms: 2,
            grace: Duration::from_secs(60),
        });
        for vm in [1, 2, 3, 3, 4, 1] {
            r.apply(&ev(vm, EventKind::SmmTransition { enter: true }), &Fake);
        }
        assert_eq!(r.tracked(), 2);
        assert_eq!(r.folded_total, 2, "VMs 3 and 4, each once");
        let other = r.vms().find(|(id, _)| id.is_none()).unwrap().1;
        assert_eq!(other.smm_transitions, 3);
        assert_eq!(other.vmm, "other");
        // VM 1 exits (Fake: pids below 100 run; make it look gone by sweeping with a host
        // where only 2, 3 and 4 run): its slot frees, yet VM 3 stays in `other`.
        struct Only234;
        impl Host for Only234 {
            fn process_name(&self, _: u32) -> Option<String> {
                None
            }
            fn running(&self, pid: u32) -> bool {
                (2..=4).contains(&pid)
            }
        }
        let t0 = Instant::now();
        r.sweep(t0, &Only234);
        let gone = r.sweep(t0 + Duration::from_secs(61), &Only234);
        assert_eq!(gone, [1]);
        assert_eq!(r.tracked(), 1);
        r.apply(&ev(3, EventKind::SmmTransition { enter: true }), &Fake);
        assert_eq!(r.tracked(), 1, "a folded VM does not take the freed slot");
        let other = r.vms().find(|(id, _)| id.is_none()).unwrap().1;
        assert_eq!(other.smm_transitions, 4);
    }

    #[test]
    fn exited_vms_stay_for_the_grace_period_then_go() {
        let mut r = Registry::new(Limits {
            max_vms: 10,
            grace: Duration::from_secs(60),
        });
        // 500 is not running (Fake: pids below 100 are).
        for vm in [5, 500] {
            r.apply(&ev(vm, EventKind::SmmTransition { enter: true }), &Fake);
        }
        let t0 = Instant::now();
        r.sweep(t0, &Fake);
        assert_eq!(r.tracked(), 2, "kept through the grace period");
        r.sweep(t0 + Duration::from_secs(59), &Fake);
        assert_eq!(r.tracked(), 2);
        r.sweep(t0 + Duration::from_secs(61), &Fake);
        assert_eq!(r.tracked(), 1);
        assert_eq!(r.expired_total, 1);
        assert!(r.vms().all(|(id, _)| id == Some(5)));
    }

    #[test]
    fn thousands_of_short_lived_vms_stay_bounded() {
        let mut r = Registry::new(Limits {
            max_vms: 16,
            grace: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        for round in 0..100u64 {
            for i in 0..100u64 {
                // Pids from 1000 up: never running by the time of the sweep.
                let vm = 1000 + round * 100 + i;
                r.apply(&ev(vm, EventKind::SmmTransition { enter: true }), &Fake);
            }
            r.sweep(t0 + Duration::from_secs(round * 2), &Fake);
        }
        assert!(r.tracked() <= 16);
        assert!(r.folded.is_empty(), "gone VMMs are forgotten");
        assert_eq!(r.events_total, 10_000);
    }

    #[test]
    fn histogram_buckets_hold_their_bounds() {
        let mut h = Histogram::default();
        h.observe_ns(1_000); // exactly 1 µs: the first bucket (le is inclusive)
        h.observe_ns(1_001);
        h.observe_ns(10_000_000_000); // 10 s: +Inf
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[BUCKETS.len()], 1);
        assert_eq!(h.count, 3);
    }
}
