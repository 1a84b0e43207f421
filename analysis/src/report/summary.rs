//! Summary: per input and VM, the counts every other report starts from; and the diff of two
//! inputs' totals (two runs, or two modes' simulator traces) side by side.

use polars::prelude::*;

use super::{Cell, Section, Table, pct, strs, u64s};
use crate::dataset::Collect as _;
use crate::dataset::Dataset;

/// The figures, in display order: (name, how it is counted).
pub const METRICS: [(&str, &str); 14] = [
    ("events", "all"),
    ("memslot changes", "memslot_*"),
    ("memslot deletions", "memslot_delete"),
    ("fast zaps", "fast_zap"),
    ("new roots", "root_alloc"),
    ("SMM transitions", "smm_transition"),
    ("pre-populations", "prepopulate_end"),
    (
        "full pre-populations",
        "prepopulate_end, cause sharing_start or new_root",
    ),
    ("entries written", "prepopulate_end entries"),
    ("pre-population ms", "prepopulate_end ns"),
    ("IOTLB flushes", "iotlb_flush"),
    ("huge-page splits", "huge_page_split"),
    ("IO page faults", "io_page_fault"),
    ("DMA maps", "iommu_map"),
];

fn is(t: &str) -> Expr {
    col("type").eq(lit(t))
}

fn count(e: Expr) -> Expr {
    e.cast(DataType::UInt64).sum()
}

/// One VM's figures: trace, VM, its name (empty when the trace has none), source, the metrics
/// in [`METRICS`] order.
pub type VmMetrics = (String, u64, String, String, Vec<f64>);

/// Per (trace, vm): the metrics, in [`METRICS`] order.
pub fn metrics(ds: &Dataset) -> PolarsResult<Vec<VmMetrics>> {
    let full = is("prepopulate_end").and(
        col("cause")
            .eq(lit("sharing_start"))
            .or(col("cause").eq(lit("new_root"))),
    );
    let df = ds
        .lazy()?
        .group_by([col("trace"), col("vm")])
        .agg([
            col("source").first().alias("source"),
            col("name").drop_nulls().first().alias("name"),
            // The VM's name is who it is, not an event it had.
            count(col("type").neq(lit("vm_name"))).alias("m0"),
            count(col("path").eq(lit("memslot"))).alias("m1"),
            count(is("memslot_delete")).alias("m2"),
            count(is("fast_zap")).alias("m3"),
            count(is("root_alloc")).alias("m4"),
            count(is("smm_transition")).alias("m5"),
            count(is("prepopulate_end")).alias("m6"),
            count(full).alias("m7"),
            col("entries")
                .filter(is("prepopulate_end"))
                .sum()
                .alias("m8"),
            col("ns").filter(is("prepopulate_end")).sum().alias("m9"),
            count(is("iotlb_flush")).alias("m10"),
            count(is("huge_page_split")).alias("m11"),
            count(is("io_page_fault")).alias("m12"),
            count(is("iommu_map")).alias("m13"),
        ])
        .sort(["trace", "vm"], Default::default())
        .collect_streaming()?;
    let (t, v, s) = (strs(&df, "trace")?, u64s(&df, "vm")?, strs(&df, "source")?);
    let names = strs(&df, "name")?;
    let cols: Vec<Vec<Option<u64>>> = (0..METRICS.len())
        .map(|i| u64s(&df, &format!("m{i}")))
        .collect::<PolarsResult<_>>()?;
    Ok((0..df.height())
        .map(|r| {
            let vals = cols
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let x = c[r].unwrap_or(0) as f64;
                    if i == 9 { x / 1e6 } else { x }
                })
                .collect();
            (
                t[r].clone().unwrap_or_default(),
                v[r].unwrap_or(0),
                names[r].clone().unwrap_or_default(),
                s[r].clone().unwrap_or_default(),
                vals,
            )
        })
        .collect())
}

fn cell(i: usize, x: f64) -> Cell {
    if i == 9 {
        Cell::f(x, 3)
    } else {
        Cell::Int(x as u64)
    }
}

/// The summary report.
pub fn section(ds: &Dataset) -> PolarsResult<Section> {
    let rows = metrics(ds)?;
    let mut cols = vec!["trace", "vm", "name", "source"];
    cols.extend(METRICS.iter().map(|m| m.0));
    let mut t = Table::new("Per VM", &cols);
    for (trace, vm, name, source, vals) in &rows {
        let mut r = vec![
            Cell::text(trace),
            Cell::Int(*vm),
            Cell::text(name),
            Cell::text(source),
        ];
        r.extend(vals.iter().enumerate().map(|(i, &x)| cell(i, x)));
        t.row(r);
    }
    let events: f64 = rows.iter().map(|r| r.4[0]).sum();
    let zaps: f64 = rows.iter().map(|r| r.4[3]).sum();
    let roots: f64 = rows.iter().map(|r| r.4[4]).sum();
    let full: f64 = rows.iter().map(|r| r.4[7]).sum();
    let finding = format!(
        "{} VM(s) in {} input(s), {events} events: {zaps} fast zaps, {roots} new roots, {full} \
         full pre-populations.",
        rows.len(),
        ds.inputs.len()
    );
    Ok(Section {
        id: "summary".into(),
        title: "Summary".into(),
        finding,
        tables: vec![t],
    })
}

/// Totals of one input over its VMs.
pub fn totals(ds: &Dataset) -> PolarsResult<Vec<f64>> {
    let mut sum = vec![0.0; METRICS.len()];
    for (_, _, _, _, vals) in metrics(ds)? {
        for (s, v) in sum.iter_mut().zip(vals) {
            *s += v;
        }
    }
    Ok(sum)
}

/// The two inputs' totals side by side.
pub fn diff(a_name: &str, a: &Dataset, b_name: &str, b: &Dataset) -> PolarsResult<Section> {
    let (ta, tb) = (totals(a)?, totals(b)?);
    let mut t = Table::new("A against B", &["metric", "A", "B", "B - A", "change %"]);
    let mut notable = Vec::new();
    for (i, (name, _)) in METRICS.iter().enumerate() {
        let (x, y) = (ta[i], tb[i]);
        let d = y - x;
        let change = if x == 0.0 { f64::NAN } else { pct(d, x) };
        if i > 0 && d != 0.0 && i != 9 {
            notable.push(if change.is_finite() {
                format!("{name} {x} → {y} ({change:+.0}%)")
            } else {
                format!("{name} {x} → {y}")
            });
        }
        t.row(vec![
            Cell::text(*name),
            cell(i, x),
            cell(i, y),
            if i == 9 {
                Cell::f(d, 3)
            } else {
                Cell::Signed(d as i64)
            },
            Cell::f(change, 1),
        ]);
    }
    let finding = format!(
        "A = {a_name}, B = {b_name}. {}",
        if notable.is_empty() {
            "The counts are the same.".to_owned()
        } else {
            format!("Differences: {}.", notable.join("; "))
        }
    );
    Ok(Section {
        id: "diff".into(),
        title: "Diff".into(),
        finding,
        tables: vec![t],
    })
}
