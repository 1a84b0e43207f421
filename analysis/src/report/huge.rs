//! Huge pages: how much of the pinned, DMA-mapped memory the IOMMU's table maps with 4 KiB,
//! 2 MiB and 1 GiB leaves over time, and every huge-page split with its reason.
//!
//! Coverage follows what pre-population built, from the `leaves` each `prepopulate_end`
//! reports: a full pre-population (sharing start, new root) replaces it, a slot's pre-population
//! adds to it (and that slot's deletion takes it away again), a split re-populated for the IOMMU
//! (`huge_page_split` cause) turns one huge leaf into small ones, the end of sharing empties it.
//! Sources that do not count leaves by size (the kernel tracepoint) leave coverage unknown.
//!
//! A split's reason is inferred from what came before it in the same VM (the tracepoint carries
//! none) by `tdpshare::event::splits` — the model the exporter's split counts use too.

use std::collections::{BTreeMap, HashMap};

use polars::prelude::*;
use tdpshare::event::PrepopCause;
use tdpshare::{Event, EventKind, PageSize};

use super::{Cell, Section, Table, bytes, pct};
use crate::dataset::Collect as _;
use crate::dataset::{Dataset, by_time, type_in};
use crate::frame;

const TYPES: [&str; 9] = [
    "prepopulate_end",
    "huge_page_split",
    "sharing_started",
    "sharing_stopped",
    "memslot_add",
    "memslot_delete",
    "memslot_move",
    "memslot_flags",
    "page_fault",
];

const SIZES: [u64; 3] = [4 << 10, 2 << 20, 1 << 30];

use tdpshare::event::splits::SplitCauses;
pub use tdpshare::event::splits::SplitReason;

/// One split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub trace: String,
    pub vm: u64,
    pub ts_ns: u64,
    pub gfn: u64,
    pub level: u8,
    pub reason: SplitReason,
}

impl Split {
    pub fn bytes(&self) -> u64 {
        4096u64 << (9 * u32::from(self.level.saturating_sub(1)))
    }
}

/// Coverage of one VM at one time: bytes under 4K, 2M, 1G leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Coverage {
    pub ts_ns: u64,
    pub bytes: [u64; 3],
}

impl Coverage {
    pub fn total(&self) -> u64 {
        self.bytes.iter().sum()
    }
    pub fn huge(&self) -> u64 {
        self.bytes[1] + self.bytes[2]
    }
}

/// The walk's result for one VM.
#[derive(Debug, Default)]
pub struct VmHuge {
    pub trace: String,
    pub vm: u64,
    /// Coverage after every change (empty when no source counted leaves).
    pub timeline: Vec<Coverage>,
    /// Pre-populations without per-size counts (coverage unknown from there on).
    pub uncounted: u64,
    /// Slot deletions while sharing whose range no slot pre-population covered alone and
    /// that no full pre-population rebuilt the table after.
    pub uncovered_deletions: u64,
    pending_uncovered: u64,
    pub splits: Vec<Split>,
}

struct Walk {
    vm: VmHuge,
    /// What explains the VM's splits (its slots, recent fetch faults and right losses).
    causes: SplitCauses,
    /// Leaf counts of the table the IOMMU walks (`None`: not sharing, or unknown).
    leaves: Option<[i64; 3]>,
    /// Slot pre-populations by range start: their leaves, to take back on deletion.
    slot_prepops: HashMap<(u64, u64), [u64; 3]>,
}

impl Walk {
    fn record(&mut self, ts_ns: u64) {
        if let Some(l) = self.leaves {
            let mut c = Coverage {
                ts_ns,
                bytes: [0; 3],
            };
            for i in 0..3 {
                c.bytes[i] = (l[i].max(0) as u64).saturating_mul(SIZES[i]);
            }
            self.vm.timeline.push(c);
        }
    }

    fn add(&mut self, leaves: [u64; 3], sign: i64) {
        if let Some(l) = &mut self.leaves {
            for i in 0..3 {
                l[i] += sign * leaves[i] as i64;
            }
        }
    }

    fn step(&mut self, e: &Event) {
        self.causes.observe(e);
        match &e.kind {
            // The engine reports the start after the first pre-population.
            EventKind::SharingStarted { .. } if self.leaves.is_none() => {
                self.leaves = Some([0; 3]);
                self.record(e.ts_ns);
            }
            EventKind::SharingStopped { .. } => {
                self.vm.uncovered_deletions += std::mem::take(&mut self.vm.pending_uncovered);
                if self.leaves.is_some() {
                    self.leaves = Some([0; 3]);
                    self.record(e.ts_ns);
                }
                self.leaves = None;
            }
            EventKind::PrepopulateEnd {
                range,
                cause,
                leaves,
                ..
            } => {
                let Some(counted) = leaves else {
                    self.vm.uncounted += 1;
                    self.leaves = None;
                    return;
                };
                if self.leaves.is_none() && cause.is_full() {
                    self.leaves = Some([0; 3]);
                }
                match cause {
                    c if c.is_full() => {
                        self.vm.pending_uncovered = 0;
                        self.leaves = Some(counted.map(|n| n as i64));
                        self.slot_prepops.clear();
                    }
                    PrepopCause::HugePageSplit => {
                        // One huge leaf of the range's size became `counted`.
                        let mut gone = [0u64; 3];
                        if let Some(i) = SIZES.iter().position(|&s| s == range.size) {
                            gone[i] = 1;
                        }
                        self.add(gone, -1);
                        self.add(*counted, 1);
                    }
                    _ => {
                        self.slot_prepops
                            .insert((range.start.0, range.size), *counted);
                        self.add(*counted, 1);
                    }
                }
                self.record(e.ts_ns);
            }
            EventKind::HugePageSplit { gfn, level } => {
                let reason = self.causes.reason(e.ts_ns, gfn.0, *level);
                self.vm.splits.push(Split {
                    trace: self.vm.trace.clone(),
                    vm: self.vm.vm,
                    ts_ns: e.ts_ns,
                    gfn: gfn.0,
                    level: *level,
                    reason,
                });
            }
            EventKind::MemslotDelete(s) if self.leaves.is_some() && s.as_id == 0 => {
                match self.slot_prepops.remove(&(s.gpa.0, s.size)) {
                    Some(l) => {
                        self.add(l, -1);
                        self.record(e.ts_ns);
                    }
                    None => self.vm.pending_uncovered += 1,
                }
            }
            _ => {}
        }
    }
}

/// Walks every VM of `ds`.
pub fn walk(ds: &Dataset, window_ns: u64) -> Result<Vec<VmHuge>, super::whatif::WhatIfError> {
    // Huge leaves' entry changes only: the 4 KiB ones (the bulk of a trace) never matter here.
    let huge_spte = col("type")
        .eq(lit("spte_set"))
        .and(col("level").gt(lit(1u8)));
    let df = by_time(ds.lazy()?.filter(type_in(&TYPES).or(huge_spte))).collect_streaming()?;
    let events = frame::events(&df)?;
    let traces = super::strs(&df, "trace")?;
    let mut out: Vec<VmHuge> = Vec::new();
    let mut walk: Option<Walk> = None;
    for (e, t) in events.iter().zip(traces) {
        let t = t.unwrap_or_default();
        if walk
            .as_ref()
            .is_none_or(|w| w.vm.trace != t || w.vm.vm != e.vm)
        {
            if let Some(w) = walk.take() {
                out.push(w.vm);
            }
            walk = Some(Walk {
                vm: VmHuge {
                    trace: t.clone(),
                    vm: e.vm,
                    ..Default::default()
                },
                causes: SplitCauses::new(window_ns),
                leaves: None,
                slot_prepops: HashMap::new(),
            });
        }
        if let Some(w) = walk.as_mut() {
            w.step(e);
        }
    }
    if let Some(w) = walk.take() {
        out.push(w.vm);
    }
    for v in &mut out {
        v.uncovered_deletions += std::mem::take(&mut v.pending_uncovered);
    }
    Ok(out)
}

/// Up to `n` evenly spaced samples of `timeline` (the state at each sample time), plus the
/// peak and the last.
fn samples(timeline: &[Coverage], n: usize) -> Vec<(String, Coverage)> {
    let (Some(first), Some(last)) = (timeline.first(), timeline.last()) else {
        return Vec::new();
    };
    let span = last.ts_ns.saturating_sub(first.ts_ns).max(1);
    let mut out = Vec::new();
    let mut j = 0;
    for k in 0..n {
        let at = first.ts_ns + span * k as u64 / (n.max(2) - 1) as u64;
        while j + 1 < timeline.len() && timeline[j + 1].ts_ns <= at {
            j += 1;
        }
        let mut c = timeline[j];
        c.ts_ns = at;
        if out
            .last()
            .is_none_or(|(_, p): &(String, Coverage)| p.ts_ns != at)
        {
            out.push((String::new(), c));
        }
    }
    if let Some(peak) = timeline.iter().max_by_key(|c| c.total()) {
        out.push(("peak".into(), *peak));
    }
    out.push(("end".into(), *last));
    out
}

/// The huge-page report.
pub fn section(ds: &Dataset, window_ns: u64) -> Result<Section, super::whatif::WhatIfError> {
    let vms = walk(ds, window_ns)?;
    let mib = |b: u64| Cell::f(b as f64 / (1u64 << 20) as f64, 1);
    let mut cov = Table::new(
        "Coverage of pinned, DMA-mapped memory by leaf size",
        &[
            "trace", "vm", "t ms", "at", "4K MiB", "2M MiB", "1G MiB", "huge %",
        ],
    );
    let mut reasons = Table::new(
        "Huge-page splits by reason",
        &[
            "trace",
            "vm",
            "reason",
            "splits",
            "memory",
            "stays huge if IOMMU exempt",
        ],
    );
    let mut texts = Vec::new();
    for v in &vms {
        for (label, c) in samples(&v.timeline, 10) {
            cov.row(vec![
                Cell::text(&v.trace),
                Cell::Int(v.vm),
                Cell::f(c.ts_ns as f64 / 1e6, 3),
                Cell::text(label),
                mib(c.bytes[0]),
                mib(c.bytes[1]),
                mib(c.bytes[2]),
                Cell::f(pct(c.huge() as f64, c.total() as f64), 1),
            ]);
        }
        let mut by: BTreeMap<SplitReason, (u64, u64)> = BTreeMap::new();
        for s in &v.splits {
            let e = by.entry(s.reason).or_default();
            e.0 += 1;
            e.1 += s.bytes();
        }
        let mut exempt = 0;
        for (r, (n, b)) in &by {
            if r.iommu_exempt() {
                exempt += b;
            }
            reasons.row(vec![
                Cell::text(&v.trace),
                Cell::Int(v.vm),
                Cell::text(r.name()),
                Cell::Int(*n),
                Cell::text(bytes(*b)),
                Cell::text(if r.iommu_exempt() { "yes" } else { "no" }),
            ]);
        }
        let split_bytes: u64 = v.splits.iter().map(Split::bytes).sum();
        let mut s = format!("{} VM {}: ", v.trace, v.vm);
        let mapped: Vec<&Coverage> = v.timeline.iter().filter(|c| c.total() > 0).collect();
        let share = |c: &Coverage| pct(c.huge() as f64, c.total() as f64);
        match (mapped.first(), mapped.last()) {
            (Some(first), Some(last)) => {
                let low = mapped
                    .iter()
                    .min_by(|a, b| share(a).total_cmp(&share(b)))
                    .copied()
                    .unwrap_or(first);
                s += &format!(
                    "when sharing began the IOMMU's table mapped {} of pinned memory, {:.1}% of \
                     it with huge leaves ({} under 2M, {} under 1G); the huge share was lowest \
                     at {:.1}% ({:.3} ms) and {:.1}% when last shared",
                    bytes(first.total()),
                    share(first),
                    bytes(first.bytes[1]),
                    bytes(first.bytes[2]),
                    share(low),
                    low.ts_ns as f64 / 1e6,
                    share(last),
                )
            }
            _ if v.uncounted > 0 => {
                s += &format!(
                    "coverage unknown: its {} pre-populations carry no per-size leaf counts \
                     (the kernel tracepoint's)",
                    v.uncounted
                )
            }
            _ => s += "no pre-population (not sharing): no coverage to report",
        }
        if v.uncovered_deletions > 0 {
            s += &format!(
                " (an upper bound after {} slot deletions the trace gives no leaf sizes for)",
                v.uncovered_deletions
            );
        }
        s += &format!(
            "; {} huge-page splits over {}",
            v.splits.len(),
            bytes(split_bytes)
        );
        if !by.is_empty() {
            let parts: Vec<String> = by
                .iter()
                .map(|(r, (n, b))| format!("{n} {} ({})", r.name(), bytes(*b)))
                .collect();
            s += &format!(
                " ({}); {} would stay huge if the IOMMU side were exempt (NX-hugepage splits, \
                 and dirty-logging splits given IOMMU dirty tracking)",
                parts.join(", "),
                bytes(exempt)
            );
        }
        texts.push(s);
    }
    if texts.is_empty() {
        texts.push("No VM in the input.".into());
    }
    let mut every = Table::new(
        "Every split",
        &["trace", "vm", "t ms", "gfn", "level", "size", "reason"],
    );
    for s in vms.iter().flat_map(|v| &v.splits) {
        every.row(vec![
            Cell::text(&s.trace),
            Cell::Int(s.vm),
            Cell::f(s.ts_ns as f64 / 1e6, 3),
            Cell::text(format!("{:#x}", s.gfn)),
            Cell::Int(u64::from(s.level)),
            Cell::text(
                PageSize::from_level(tdpshare::Level::new(s.level).unwrap_or(tdpshare::Level::L1))
                    .map_or("?".to_owned(), |p| p.to_string()),
            ),
            Cell::text(s.reason.name()),
        ]);
    }
    Ok(Section {
        id: "huge_pages".into(),
        title: "Huge pages: coverage and splits".into(),
        finding: texts.join(". ") + ".",
        tables: vec![cov, reasons, every],
    })
}
