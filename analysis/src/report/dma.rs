//! DMA mapping cost: the latency of timed map calls (VFIO `VFIO_IOMMU_MAP_DMA` / iommufd
//! `IOMMU_IOAS_MAP` ioctls on stock kernels, which include pinning) against the mapping's size
//! and the largest page size its IOVA and length allow (4K, 2M, 1G).

use polars::prelude::*;
use tdpshare::Log2Histogram;

use super::{Cell, Section, Table, bytes, strs, u64s};
use crate::dataset::Collect as _;
use crate::dataset::Dataset;

/// The largest page size `iova` and `size` are both aligned to.
pub fn page_size(iova: u64, size: u64) -> &'static str {
    let aligned = |a: u64| iova.is_multiple_of(a) && size.is_multiple_of(a) && size >= a;
    if aligned(1 << 30) {
        "1G"
    } else if aligned(2 << 20) {
        "2M"
    } else {
        "4K"
    }
}

/// The DMA-mapping report.
pub fn section(ds: &Dataset) -> PolarsResult<Section> {
    let df = ds
        .lazy()?
        .filter(col("type").eq(lit("iommu_map")))
        .select([col("trace"), col("start"), col("size"), col("ns")])
        .collect_streaming()?;
    let (start, size, ns) = (u64s(&df, "start")?, u64s(&df, "size")?, u64s(&df, "ns")?);
    let _ = strs(&df, "trace")?;
    let untimed = ns.iter().filter(|n| n.unwrap_or(0) == 0).count();
    // (log2 size bucket, page size) → latencies.
    let mut groups: std::collections::BTreeMap<(u32, &'static str), Log2Histogram> =
        Default::default();
    let mut sums: std::collections::BTreeMap<(u32, &'static str), (u64, u64)> = Default::default();
    for i in 0..df.height() {
        let (Some(s), Some(n)) = (size[i], ns[i]) else {
            continue;
        };
        if n == 0 || s == 0 {
            continue;
        }
        let k = (63 - s.leading_zeros(), page_size(start[i].unwrap_or(0), s));
        groups.entry(k).or_default().record(n);
        let e = sums.entry(k).or_default();
        e.0 += s;
        e.1 += n;
    }
    let mut t = Table::new(
        "Timed DMA maps by size and page size",
        &[
            "size from",
            "page size",
            "maps",
            "mean us",
            "p50 us <",
            "p99 us <",
            "ns per 4K page",
        ],
    );
    let mut timed = 0;
    for (k, h) in &groups {
        let (b, n) = sums[k];
        timed += h.count;
        t.row(vec![
            Cell::text(bytes(1u64 << k.0)),
            Cell::text(k.1),
            Cell::Int(h.count),
            Cell::f(h.sum as f64 / h.count as f64 / 1e3, 2),
            Cell::f(h.quantile(0.5).unwrap_or(0) as f64 / 1e3, 1),
            Cell::f(h.quantile(0.99).unwrap_or(0) as f64 / 1e3, 1),
            Cell::f(n as f64 / (b as f64 / 4096.0), 1),
        ]);
    }
    let finding = if timed == 0 {
        format!(
            "No timed DMA map in the input ({} untimed IOMMU-driver maps). Record a VMM with a \
             VFIO or iommufd device on a stock kernel (`tdpshare-probe record`) to measure the \
             map ioctls.",
            untimed
        )
    } else {
        let (b, n): (u64, u64) = sums.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
        format!(
            "{timed} timed DMA maps of {} took {:.2} ms: {:.1} ns per 4 KiB page on average \
             (pinning included); {untimed} more were not timed.",
            bytes(b),
            n as f64 / 1e6,
            n as f64 / (b as f64 / 4096.0)
        )
    };
    Ok(Section {
        id: "dma".into(),
        title: "DMA mapping cost".into(),
        finding,
        tables: vec![t],
    })
}
