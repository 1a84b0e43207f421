//! IOTLB flushes: how many, of what scope, how long; flushes per root update; and how many
//! range flushes could have been batched — a range flush of the same VM and domain within the
//! batch window (`--batch-window-us`, default 10) of the previous one could have been one flush
//! at the end of the batch, as KVM batches TLB flushes of one MMU operation.

use polars::prelude::*;
use tdpshare::Log2Histogram;

use super::{Cell, Section, Table, pct, strs, u64s};
use crate::dataset::Collect as _;
use crate::dataset::{Dataset, by_time};

/// The IOTLB report.
pub fn section(ds: &Dataset, batch_window_ns: u64) -> PolarsResult<Section> {
    let lf = ds.lazy()?;
    let flushes = by_time(lf.clone().filter(col("type").eq(lit("iotlb_flush"))));
    let range_scope = col("scope")
        .eq(lit("range"))
        .or(col("scope").eq(lit("range_leaves")));
    let by_scope = flushes
        .clone()
        .with_column(
            (col("ts_ns")
                - col("ts_ns").shift(lit(1)).over([
                    col("trace"),
                    col("vm"),
                    col("domain"),
                    col("scope"),
                ])?)
            .alias("gap"),
        )
        .with_column(
            range_scope
                .clone()
                .and(col("gap").lt_eq(lit(batch_window_ns)))
                .fill_null(lit(false))
                .alias("batchable"),
        )
        .group_by([col("trace"), col("vm"), col("scope")])
        .agg([
            len().alias("n"),
            col("ns").sum().alias("ns"),
            col("batchable").sum().alias("batchable"),
            col("size").sum().alias("bytes"),
        ])
        .sort(["trace", "vm", "scope"], Default::default())
        .collect_streaming()?;
    let roots = lf
        .clone()
        .filter(col("type").eq(lit("root_alloc")))
        .group_by([col("trace"), col("vm")])
        .agg([len().alias("roots")])
        .collect_streaming()?;
    let ns_all = flushes.select([col("ns")]).collect_streaming()?;
    let mut hist = Log2Histogram::default();
    for v in u64s(&ns_all, "ns")?.into_iter().flatten() {
        hist.record(v);
    }
    let (t, v, s) = (
        strs(&by_scope, "trace")?,
        u64s(&by_scope, "vm")?,
        strs(&by_scope, "scope")?,
    );
    let (n, ns, b, bytes) = (
        u64s(&by_scope, "n")?,
        u64s(&by_scope, "ns")?,
        u64s(&by_scope, "batchable")?,
        u64s(&by_scope, "bytes")?,
    );
    let (rt, rv, rn) = (
        strs(&roots, "trace")?,
        u64s(&roots, "vm")?,
        u64s(&roots, "roots")?,
    );
    let roots_of = |trace: &Option<String>, vm: Option<u64>| {
        (0..roots.height())
            .find(|&i| &rt[i] == trace && rv[i] == vm)
            .and_then(|i| rn[i])
            .unwrap_or(0)
    };
    let mut table = Table::new(
        "IOTLB flushes by scope",
        &[
            "trace",
            "vm",
            "scope",
            "flushes",
            "ms",
            "mean us",
            "range MiB",
            "batchable",
            "per root update",
        ],
    );
    let (mut total, mut batchable, mut range_total) = (0u64, 0u64, 0u64);
    let mut total_roots = 0u64;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..by_scope.height() {
        let (cnt, sum) = (n[i].unwrap_or(0), ns[i].unwrap_or(0));
        let r = roots_of(&t[i], v[i]);
        if seen.insert((t[i].clone(), v[i])) {
            total_roots += r;
        }
        total += cnt;
        let is_range = matches!(s[i].as_deref(), Some("range" | "range_leaves"));
        if is_range {
            range_total += cnt;
            batchable += b[i].unwrap_or(0);
        }
        table.row(vec![
            Cell::text(t[i].clone().unwrap_or_default()),
            Cell::opt(v[i]),
            Cell::text(s[i].clone().unwrap_or_default()),
            Cell::Int(cnt),
            Cell::ms(sum),
            Cell::f(
                if cnt == 0 {
                    0.0
                } else {
                    sum as f64 / cnt as f64 / 1e3
                },
                2,
            ),
            if is_range {
                Cell::f(bytes[i].unwrap_or(0) as f64 / (1u64 << 20) as f64, 1)
            } else {
                Cell::Null
            },
            if is_range {
                Cell::Int(b[i].unwrap_or(0))
            } else {
                Cell::Null
            },
            if r == 0 {
                Cell::Null
            } else {
                Cell::f(cnt as f64 / r as f64, 1)
            },
        ]);
    }
    let mut h = Table::new(
        "Flush latency (log2 buckets)",
        &["from ns", "below ns", "flushes", "%"],
    );
    for (i, &c) in hist.buckets.iter().enumerate() {
        if c > 0 {
            let lo = if i == 0 { 0 } else { 1u64 << i };
            h.row(vec![
                Cell::Int(lo),
                Cell::Int(1u64.checked_shl(i as u32 + 1).unwrap_or(u64::MAX)),
                Cell::Int(c),
                Cell::f(pct(c as f64, hist.count as f64), 1),
            ]);
        }
    }
    let finding = if total == 0 {
        "No IOTLB flush in the input (live stock kernels flush inside the IOMMU driver, which the \
         probes see only with the kernel series' tracepoint)."
            .to_owned()
    } else {
        format!(
            "{total} IOTLB flushes ({:.2} ms in all; p50 below {} ns, p99 below {} ns), {} per new \
             root; {range_total} range flushes, of which {batchable} ({:.0}%) followed another of \
             the same domain within {} us and could have been batched.",
            hist.sum as f64 / 1e6,
            hist.quantile(0.5).unwrap_or(0),
            hist.quantile(0.99).unwrap_or(0),
            if total_roots == 0 {
                "no root updates, so none".to_owned()
            } else {
                format!("{:.1}", total as f64 / total_roots as f64)
            },
            pct(batchable as f64, range_total as f64),
            batch_window_ns / 1000,
        )
    };
    Ok(Section {
        id: "iotlb".into(),
        title: "IOTLB flushes".into(),
        finding,
        tables: vec![table, h],
    })
}
