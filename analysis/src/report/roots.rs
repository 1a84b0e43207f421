//! Root updates: every fast zap and every new root, attributed to the event just before it that
//! can cause it; and, for the 2021 design, the pre-populations each cause produced.
//!
//! Attribution is an as-of join (backward, per input and VM) of the updates onto their possible
//! triggers:
//! - a **fast zap** (`kvm_mmu_zap_all_fast`) onto the memslot deletion, move or flags change
//!   before it — KVM zaps all roots for exactly those;
//! - a **new root** onto the fast zap, SMM transition, CR0/CR4 write, memslot change or start of
//!   sharing before it; a new root after a fast zap inherits the zap's trigger (`via fast zap`);
//! - a **full pre-population** after a new root (the 2021 design) onto that root, and so onto
//!   the root's trigger.
//!
//! A trigger further back than the window (`--window-ms`, default 1000) is not taken; the first
//! root of a VM's address space without a trigger is `initial`; the rest is `unattributed`.

use std::collections::{BTreeMap, HashMap};

use polars::prelude::*;

use super::{Cell, Section, Table, bytes, pct, strs, u64s};
use crate::dataset::Collect as _;
use crate::dataset::{Dataset, type_in};

/// Event types a fast zap is attributed to.
pub const ZAP_TRIGGERS: [&str; 3] = ["memslot_delete", "memslot_move", "memslot_flags"];
/// Event types a new root is attributed to.
pub const ROOT_TRIGGERS: [&str; 7] = [
    "fast_zap",
    "memslot_delete",
    "memslot_move",
    "memslot_flags",
    "smm_transition",
    "cr_write",
    "sharing_started",
];

/// A trigger as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    pub kind: String,
    pub ts_ns: u64,
    /// Human-readable detail (slot and range, SMM direction, register).
    pub detail: String,
}

/// One attributed update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributed {
    pub trace: String,
    pub vm: u64,
    pub ts_ns: u64,
    /// `fast_zap`, `root_alloc` or `prepopulate_end`.
    pub update: String,
    /// The root's (or pre-population's) cause as its source reported it.
    pub reported_cause: Option<String>,
    /// The trigger class: a trigger event type, `initial` or `unattributed`.
    pub class: String,
    /// The event found, and for a new root after a fast zap, that zap's own trigger.
    pub trigger: Option<Trigger>,
    pub via_fast_zap: bool,
    pub entries: u64,
    pub ns: u64,
}

impl Attributed {
    pub fn gap_ns(&self) -> Option<u64> {
        self.trigger
            .as_ref()
            .map(|t| self.ts_ns.saturating_sub(t.ts_ns))
    }
}

const T_COLS: [&str; 9] = [
    "t_ts", "t_type", "t_slot", "t_as", "t_gpa", "t_size", "t_enter", "t_cr", "t_flags",
];

fn triggers(lf: &LazyFrame, types: &[&str]) -> LazyFrame {
    lf.clone()
        .filter(type_in(types))
        .select([
            col("trace"),
            col("vm"),
            col("ts_ns").alias("t_ts"),
            col("type").alias("t_type"),
            col("slot").alias("t_slot"),
            col("as_id").alias("t_as"),
            col("start").alias("t_gpa"),
            col("size").alias("t_size"),
            col("enter").alias("t_enter"),
            col("cr").alias("t_cr"),
            col("flags").alias("t_flags"),
        ])
        .sort(
            ["t_ts"],
            SortMultipleOptions::default().with_maintain_order(true),
        )
}

fn asof(left: LazyFrame, right: LazyFrame) -> LazyFrame {
    let by: Vec<PlSmallStr> = vec!["trace".into(), "vm".into()];
    let opts = AsOfOptions {
        left_by: Some(by.clone()),
        right_by: Some(by),
        allow_eq: true,
        check_sortedness: false,
        ..Default::default()
    };
    left.sort(
        ["ts_ns"],
        SortMultipleOptions::default().with_maintain_order(true),
    )
    .join(
        right,
        [col("ts_ns")],
        [col("t_ts")],
        JoinArgs::new(JoinType::AsOf(Box::new(opts))),
    )
}

struct Rows {
    trace: Vec<Option<String>>,
    vm: Vec<Option<u64>>,
    ts: Vec<Option<u64>>,
    t: HashMap<&'static str, Vec<Option<u64>>>,
    t_type: Vec<Option<String>>,
    t_enter: Vec<Option<bool>>,
}

impl Rows {
    fn of(df: &DataFrame) -> PolarsResult<Self> {
        let mut t = HashMap::new();
        for name in T_COLS {
            if name != "t_type" && name != "t_enter" {
                t.insert(name, u64s(df, name)?);
            }
        }
        Ok(Self {
            trace: strs(df, "trace")?,
            vm: u64s(df, "vm")?,
            ts: u64s(df, "ts_ns")?,
            t,
            t_type: strs(df, "t_type")?,
            t_enter: df.column("t_enter")?.bool()?.iter().collect(),
        })
    }

    fn t(&self, name: &'static str, i: usize) -> Option<u64> {
        self.t.get(name).and_then(|v| v[i])
    }

    fn trigger(&self, i: usize, window_ns: u64) -> Option<Trigger> {
        let kind = self.t_type[i].clone()?;
        let ts_ns = self.t("t_ts", i)?;
        if self.ts[i].unwrap_or(0).saturating_sub(ts_ns) > window_ns {
            return None;
        }
        let detail = match kind.as_str() {
            "memslot_delete" | "memslot_move" | "memslot_flags" => format!(
                "slot {} as {} at {:#x}+{}{}",
                self.t("t_slot", i).unwrap_or(0),
                self.t("t_as", i).unwrap_or(0),
                self.t("t_gpa", i).unwrap_or(0),
                bytes(self.t("t_size", i).unwrap_or(0)),
                if kind == "memslot_flags" {
                    format!(" flags {:#x}", self.t("t_flags", i).unwrap_or(0))
                } else {
                    String::new()
                }
            ),
            "smm_transition" => {
                if self.t_enter[i].unwrap_or(false) {
                    "enter".into()
                } else {
                    "leave".into()
                }
            }
            "cr_write" => format!("cr{}", self.t("t_cr", i).unwrap_or(0)),
            _ => String::new(),
        };
        Some(Trigger {
            kind,
            ts_ns,
            detail,
        })
    }
}

/// Attributes every fast zap, new root and full pre-population of `ds`.
pub fn attribute(ds: &Dataset, window_ns: u64) -> PolarsResult<Vec<Attributed>> {
    let lf = ds.lazy()?;
    let key = |r: &Rows, i: usize| {
        (
            r.trace[i].clone().unwrap_or_default(),
            r.vm[i].unwrap_or(0),
            r.ts[i].unwrap_or(0),
        )
    };
    // Fast zaps onto memslot changes.
    let zaps = asof(
        lf.clone().filter(col("type").eq(lit("fast_zap"))).select([
            col("trace"),
            col("vm"),
            col("ts_ns"),
        ]),
        triggers(&lf, &ZAP_TRIGGERS),
    )
    .collect_streaming()?;
    let zr = Rows::of(&zaps)?;
    let mut out = Vec::new();
    let mut zap_trigger: HashMap<(String, u64, u64), Option<Trigger>> = HashMap::new();
    for i in 0..zaps.height() {
        let trigger = zr.trigger(i, window_ns);
        let (trace, vm, ts_ns) = key(&zr, i);
        zap_trigger.insert((trace.clone(), vm, ts_ns), trigger.clone());
        out.push(Attributed {
            trace,
            vm,
            ts_ns,
            update: "fast_zap".into(),
            reported_cause: None,
            class: trigger
                .as_ref()
                .map_or_else(|| "unattributed".into(), |t| t.kind.clone()),
            trigger,
            via_fast_zap: false,
            entries: 0,
            ns: 0,
        });
    }
    // New roots onto their triggers; after a fast zap, the zap's trigger.
    let allocs = asof(
        lf.clone()
            .filter(col("type").eq(lit("root_alloc")))
            .select([
                col("trace"),
                col("vm"),
                col("ts_ns"),
                col("smm"),
                col("cause"),
            ]),
        triggers(&lf, &ROOT_TRIGGERS),
    )
    .collect_streaming()?;
    let ar = Rows::of(&allocs)?;
    let smm: Vec<Option<bool>> = allocs.column("smm")?.bool()?.iter().collect();
    let causes = strs(&allocs, "cause")?;
    let mut seen_space: std::collections::HashSet<(String, u64, bool)> = Default::default();
    // (trace, vm, ts) of each new root → its class, trigger, and whether via a fast zap.
    type Class = (String, Option<Trigger>, bool);
    let mut root_class: BTreeMap<(String, u64, u64), Class> = BTreeMap::new();
    for i in 0..allocs.height() {
        let (trace, vm, ts_ns) = key(&ar, i);
        let first = seen_space.insert((trace.clone(), vm, smm[i].unwrap_or(false)));
        let found = ar.trigger(i, window_ns);
        let (class, trigger, via) = match found {
            // A VM's first root (per address space) is its initial one, whatever came before.
            _ if first => ("initial".to_owned(), None, false),
            Some(t) if t.kind == "fast_zap" => {
                match zap_trigger
                    .get(&(trace.clone(), vm, t.ts_ns))
                    .cloned()
                    .flatten()
                {
                    Some(zt) => (zt.kind.clone(), Some(zt), true),
                    None => ("fast_zap".to_owned(), Some(t), false),
                }
            }
            Some(t) => (t.kind.clone(), Some(t), false),
            None => ("unattributed".to_owned(), None, false),
        };
        root_class.insert(
            (trace.clone(), vm, ts_ns),
            (class.clone(), trigger.clone(), via),
        );
        out.push(Attributed {
            trace,
            vm,
            ts_ns,
            update: "root_alloc".into(),
            reported_cause: causes[i].clone(),
            class,
            trigger,
            via_fast_zap: via,
            entries: 0,
            ns: 0,
        });
    }
    // Full pre-populations after a new root onto that root.
    let prepops = lf
        .clone()
        .filter(
            col("type")
                .eq(lit("prepopulate_end"))
                .and(col("cause").eq(lit("new_root"))),
        )
        .select([
            col("trace"),
            col("vm"),
            col("ts_ns"),
            col("entries"),
            col("ns"),
        ])
        .sort(
            ["ts_ns"],
            SortMultipleOptions::default().with_maintain_order(true),
        );
    let roots = lf
        .filter(col("type").eq(lit("root_alloc")))
        .select([col("trace"), col("vm"), col("ts_ns").alias("t_ts")])
        .sort(
            ["t_ts"],
            SortMultipleOptions::default().with_maintain_order(true),
        );
    let by: Vec<PlSmallStr> = vec!["trace".into(), "vm".into()];
    let pp = prepops
        .join(
            roots,
            [col("ts_ns")],
            [col("t_ts")],
            JoinArgs::new(JoinType::AsOf(Box::new(AsOfOptions {
                left_by: Some(by.clone()),
                right_by: Some(by),
                allow_eq: true,
                check_sortedness: false,
                ..Default::default()
            }))),
        )
        .collect_streaming()?;
    let (ptrace, pvm, pts) = (strs(&pp, "trace")?, u64s(&pp, "vm")?, u64s(&pp, "ts_ns")?);
    let (pent, pns, pt) = (u64s(&pp, "entries")?, u64s(&pp, "ns")?, u64s(&pp, "t_ts")?);
    for i in 0..pp.height() {
        let trace = ptrace[i].clone().unwrap_or_default();
        let vm = pvm[i].unwrap_or(0);
        let root = pt[i].and_then(|t| root_class.get(&(trace.clone(), vm, t)).cloned());
        let (class, trigger, via) =
            root.unwrap_or_else(|| ("unattributed".to_owned(), None, false));
        out.push(Attributed {
            trace,
            vm,
            ts_ns: pts[i].unwrap_or(0),
            update: "prepopulate_end".into(),
            reported_cause: Some("new_root".into()),
            class,
            trigger,
            via_fast_zap: via,
            entries: pent[i].unwrap_or(0),
            ns: pns[i].unwrap_or(0),
        });
    }
    out.sort_by(|a, b| (&a.trace, a.vm, a.ts_ns).cmp(&(&b.trace, b.vm, b.ts_ns)));
    Ok(out)
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[v.len() / 2])
}

/// Pre-populations by cause per VM: (count, entries, ns), and the largest full one.
struct Prepops {
    by_cause: BTreeMap<(String, u64, String), (u64, u64, u64)>,
    largest_full: BTreeMap<(String, u64), u64>,
}

fn prepops(ds: &Dataset) -> PolarsResult<Prepops> {
    let df = ds
        .lazy()?
        .filter(col("type").eq(lit("prepopulate_end")))
        .group_by([col("trace"), col("vm"), col("cause")])
        .agg([
            len().alias("count"),
            col("entries").sum().alias("entries"),
            col("ns").sum().alias("ns"),
            col("entries")
                .filter(
                    col("cause")
                        .eq(lit("sharing_start"))
                        .or(col("cause").eq(lit("new_root"))),
                )
                .max()
                .alias("largest_full"),
        ])
        .sort(["trace", "vm", "cause"], Default::default())
        .collect_streaming()?;
    let (t, v, c) = (strs(&df, "trace")?, u64s(&df, "vm")?, strs(&df, "cause")?);
    let (n, e, ns, lf) = (
        u64s(&df, "count")?,
        u64s(&df, "entries")?,
        u64s(&df, "ns")?,
        u64s(&df, "largest_full")?,
    );
    let mut out = Prepops {
        by_cause: BTreeMap::new(),
        largest_full: BTreeMap::new(),
    };
    for i in 0..df.height() {
        let k = (t[i].clone().unwrap_or_default(), v[i].unwrap_or(0));
        out.by_cause.insert(
            (k.0.clone(), k.1, c[i].clone().unwrap_or_default()),
            (n[i].unwrap_or(0), e[i].unwrap_or(0), ns[i].unwrap_or(0)),
        );
        if let Some(l) = lf[i] {
            let m = out.largest_full.entry(k).or_default();
            *m = (*m).max(l);
        }
    }
    Ok(out)
}

/// The root-update report.
pub fn section(ds: &Dataset, window_ns: u64) -> PolarsResult<Section> {
    let all = attribute(ds, window_ns)?;
    let pre = prepops(ds)?;
    let mut by_trigger = Table::new(
        "Root updates by trigger",
        &[
            "trace",
            "vm",
            "trigger",
            "fast zaps",
            "new roots",
            "of them via fast zap",
            "full prepops",
            "prepop entries",
            "prepop ms",
            "median gap us",
            "max gap us",
        ],
    );
    let mut agg: BTreeMap<(String, u64, String), [u64; 6]> = BTreeMap::new();
    let mut gaps: BTreeMap<(String, u64, String), Vec<u64>> = BTreeMap::new();
    for a in &all {
        let k = (a.trace.clone(), a.vm, a.class.clone());
        let e = agg.entry(k.clone()).or_default();
        match a.update.as_str() {
            "fast_zap" => e[0] += 1,
            "root_alloc" => {
                e[1] += 1;
                if a.via_fast_zap {
                    e[2] += 1;
                }
            }
            _ => {
                e[3] += 1;
                e[4] += a.entries;
                e[5] += a.ns;
            }
        }
        if a.update != "prepopulate_end"
            && let Some(g) = a.gap_ns()
        {
            gaps.entry(k).or_default().push(g);
        }
    }
    for (k, e) in &agg {
        let g = gaps.get(k).cloned().unwrap_or_default();
        let max = g.iter().copied().max();
        by_trigger.row(vec![
            Cell::text(&k.0),
            Cell::Int(k.1),
            Cell::text(&k.2),
            Cell::Int(e[0]),
            Cell::Int(e[1]),
            Cell::Int(e[2]),
            Cell::Int(e[3]),
            Cell::Int(e[4]),
            Cell::ms(e[5]),
            median(g).map_or(Cell::Null, |m| Cell::f(m as f64 / 1e3, 1)),
            max.map_or(Cell::Null, |m| Cell::f(m as f64 / 1e3, 1)),
        ]);
    }
    let mut every = Table::new(
        "Every fast zap and new root, with its trigger",
        &[
            "trace",
            "vm",
            "t ms",
            "update",
            "reported cause",
            "trigger",
            "detail",
            "gap us",
        ],
    );
    for a in all.iter().filter(|a| a.update != "prepopulate_end") {
        let detail = a.trigger.as_ref().map_or(String::new(), |t| {
            if a.via_fast_zap {
                format!("via fast zap: {}", t.detail)
            } else {
                t.detail.clone()
            }
        });
        every.row(vec![
            Cell::text(&a.trace),
            Cell::Int(a.vm),
            Cell::f(a.ts_ns as f64 / 1e6, 3),
            Cell::text(&a.update),
            a.reported_cause.as_ref().map_or(Cell::Null, Cell::text),
            Cell::text(&a.class),
            Cell::text(detail),
            a.gap_ns()
                .map_or(Cell::Null, |g| Cell::f(g as f64 / 1e3, 1)),
        ]);
    }
    let mut causes = Table::new(
        "Pre-populations by cause",
        &["trace", "vm", "cause", "count", "entries", "ms"],
    );
    for ((t, v, c), (n, e, ns)) in &pre.by_cause {
        causes.row(vec![
            Cell::text(t),
            Cell::Int(*v),
            Cell::text(c),
            Cell::Int(*n),
            Cell::Int(*e),
            Cell::ms(*ns),
        ]);
    }
    let mut amp = Table::new(
        "Amplification: entries written / entries one full pre-population needs",
        &[
            "trace",
            "vm",
            "full prepop entries",
            "all prepop entries",
            "largest full prepop",
            "full amplification",
            "all-causes amplification",
        ],
    );
    let mut written: BTreeMap<(String, u64), (u64, u64)> = BTreeMap::new();
    for ((t, v, c), (_, e, _)) in &pre.by_cause {
        let w = written.entry((t.clone(), *v)).or_default();
        if c == "sharing_start" || c == "new_root" {
            w.0 += e;
        }
        w.1 += e;
    }
    let mut amp_text = Vec::new();
    for (k, (full, all)) in &written {
        let need = pre.largest_full.get(k).copied().unwrap_or(0);
        let ratio = |w: u64| {
            if need == 0 {
                f64::NAN
            } else {
                w as f64 / need as f64
            }
        };
        if need > 0 {
            amp_text.push(format!(
                "{:.1}x for the full pre-populations, {:.1}x counting every cause",
                ratio(*full),
                ratio(*all)
            ));
        }
        amp.row(vec![
            Cell::text(&k.0),
            Cell::Int(k.1),
            Cell::Int(*full),
            Cell::Int(*all),
            Cell::Int(need),
            Cell::f(ratio(*full), 2),
            Cell::f(ratio(*all), 2),
        ]);
    }
    let finding = finding(&all, &pre, &amp_text);
    let mut tables = vec![by_trigger, every];
    if !pre.by_cause.is_empty() {
        tables.push(causes);
        tables.push(amp);
    }
    Ok(Section {
        id: "roots".into(),
        title: "Root updates and their triggers".into(),
        finding,
        tables,
    })
}

fn finding(all: &[Attributed], pre: &Prepops, amp: &[String]) -> String {
    let count = |update: &str, pred: &dyn Fn(&Attributed) -> bool| {
        all.iter().filter(|a| a.update == update && pred(a)).count()
    };
    let zaps = count("fast_zap", &|_| true);
    let zaps_mem = count("fast_zap", &|a| a.class.starts_with("memslot_"));
    let zaps_del = count("fast_zap", &|a| a.class == "memslot_delete");
    let zap_gaps: Vec<u64> = all
        .iter()
        .filter(|a| a.update == "fast_zap")
        .filter_map(Attributed::gap_ns)
        .collect();
    let roots = count("root_alloc", &|_| true);
    let mut classes: BTreeMap<&str, usize> = BTreeMap::new();
    for a in all.iter().filter(|a| a.update == "root_alloc") {
        *classes.entry(a.class.as_str()).or_default() += 1;
    }
    let via = count("root_alloc", &|a| a.via_fast_zap);
    let vms: std::collections::BTreeSet<(&str, u64)> =
        all.iter().map(|a| (a.trace.as_str(), a.vm)).collect();
    let mut s = format!(
        "{zaps} fast zaps in {} VM(s): {zaps_mem} attributed to a memslot change just before \
         ({zaps_del} deletions){}",
        vms.len(),
        median(zap_gaps).map_or(String::new(), |m| format!(
            ", a median {:.1} us after it",
            m as f64 / 1e3
        ))
    );
    if zaps > zaps_mem {
        s += &format!(", {} without one in the window", zaps - zaps_mem);
    }
    s += &format!(". {roots} new roots: ");
    let parts: Vec<String> = classes
        .iter()
        .map(|(c, n)| {
            if *c == "memslot_delete" && via > 0 {
                format!("{n} after a memslot deletion ({via} through its fast zap)")
            } else {
                format!("{n} {c}")
            }
        })
        .collect();
    s += &if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    };
    s += ".";
    let full: u64 = pre
        .by_cause
        .iter()
        .filter(|((_, _, c), _)| c == "new_root" || c == "sharing_start")
        .map(|(_, (n, _, _))| n)
        .sum();
    if full > 0 {
        let pp: Vec<&Attributed> = all
            .iter()
            .filter(|a| a.update == "prepopulate_end")
            .collect();
        let mut by: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for a in &pp {
            let e = by.entry(a.class.as_str()).or_default();
            e.0 += 1;
            e.1 += a.entries;
        }
        let total_entries: u64 = pp.iter().map(|a| a.entries).sum();
        let parts: Vec<String> = by
            .iter()
            .map(|(c, (n, e))| {
                format!(
                    "{n} by {c} ({:.0}% of their entries)",
                    pct(*e as f64, total_entries as f64)
                )
            })
            .collect();
        s += &format!(
            " The 2021 design pre-populated all pinned memory {full} times; the {} after new \
             roots were caused: {}. Amplification (entries written / entries one full \
             pre-population needs): {}.",
            pp.len(),
            if parts.is_empty() {
                "-".to_owned()
            } else {
                parts.join(", ")
            },
            if amp.is_empty() {
                "-".to_owned()
            } else {
                amp.join(", ")
            }
        );
    }
    s
}
