//! What-if: the same trace replayed through the kmod simulator — the real page-table code on
//! real table memory — in every sharing mode, to show what the optimized mode (and the others)
//! would have saved on this recording.
//!
//! The replay takes the trace's memslot changes, SMM transitions, CR0/CR4 writes, vCPU and IO
//! page faults, DMA mappings and sharing requests (`Scenario::from_events`); entries and counts
//! are exact for that timeline, pre-population time is measured on this machine, pinning and
//! IOTLB costs are the simulator's models.

use polars::prelude::*;
use tdpshare::ShareMode;
use tdpshare::sim::{ModeRun, RunOptions, Scenario, run_mode};

use super::{Cell, Section, Table, pct, strs, u64s};
use crate::dataset::Collect as _;
use crate::dataset::{Dataset, by_time, type_in};
use crate::frame;

/// The event types a replay uses.
pub const REPLAYED: [&str; 11] = [
    "memslot_add",
    "memslot_delete",
    "memslot_move",
    "memslot_flags",
    "page_fault",
    "iommu_map",
    "io_page_fault",
    "sharing_requested",
    "sharing_stopped",
    "smm_transition",
    "cr_write",
];

/// Why a what-if could not run.
#[derive(Debug, thiserror::Error)]
pub enum WhatIfError {
    #[error(transparent)]
    Polars(#[from] PolarsError),
    #[error(transparent)]
    Row(#[from] frame::RowError),
}

/// One mode's replay of one VM.
#[derive(Debug)]
pub struct Replay {
    pub trace: String,
    pub vm: u64,
    pub mode: ShareMode,
    /// `Err`: the mode refused or failed on this timeline (its message).
    pub run: Result<ModeRun, String>,
}

/// The (trace, VM) pairs of `ds` that have memslot events (what a replay needs).
fn vms(ds: &Dataset) -> PolarsResult<Vec<(String, u64)>> {
    let df = ds
        .lazy()?
        .filter(col("path").eq(lit("memslot")))
        .group_by([col("trace"), col("vm")])
        .agg([len().alias("n")])
        .sort(["trace", "vm"], Default::default())
        .collect_streaming()?;
    let (t, v) = (strs(&df, "trace")?, u64s(&df, "vm")?);
    Ok((0..df.height())
        .map(|i| (t[i].clone().unwrap_or_default(), v[i].unwrap_or(0)))
        .collect())
}

/// What the replayed VM is given that a trace cannot tell.
#[derive(Debug, Clone, Copy, Default)]
pub struct WhatIfOptions {
    /// The passed-through device can take IO page faults (PRI/ATS), as the 2023 design needs;
    /// without it that mode is refused, as on most devices.
    pub device_iopf: bool,
    /// Back guest memory with 4 KiB host pages only (no THP/hugetlbfs).
    pub no_huge_pages: bool,
}

/// Replays every VM of `ds` in `modes`.
pub fn replay(
    ds: &Dataset,
    modes: &[ShareMode],
    opts: WhatIfOptions,
) -> Result<Vec<Replay>, WhatIfError> {
    let mut out = Vec::new();
    for (trace, vm) in vms(ds)? {
        let df = by_time(
            ds.lazy()?.filter(
                col("trace")
                    .eq(lit(trace.clone()))
                    .and(col("vm").eq(lit(vm)))
                    .and(type_in(&REPLAYED)),
            ),
        )
        .collect_streaming()?;
        let events = frame::events(&df)?;
        let mut scenario = Scenario::from_events(&trace, Some(vm), &events);
        scenario.vm.device_iopf = opts.device_iopf;
        scenario.vm.huge_pages = !opts.no_huge_pages;
        for &mode in modes {
            let opts = RunOptions {
                verify_dma: false,
                ..RunOptions::default()
            };
            let run = run_mode(&scenario, mode, vm, opts).map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg += &format!(": {s}");
                    src = s.source();
                }
                msg
            });
            out.push(Replay {
                trace: trace.clone(),
                vm,
                mode,
                run,
            });
        }
    }
    Ok(out)
}

/// The what-if report.
pub fn section(ds: &Dataset, opts: WhatIfOptions) -> Result<Section, WhatIfError> {
    let runs = replay(ds, &ShareMode::ALL, opts)?;
    let mut t = Table::new(
        "Replayed in every mode (simulator)",
        &[
            "trace",
            "vm",
            "mode",
            "full prepops",
            "prepops",
            "entries written",
            "prepop ms",
            "IOMMU root updates",
            "IOTLB flushes",
            "flush ms",
            "pinned peak MiB",
            "table pages peak",
            "outcome",
        ],
    );
    for r in &runs {
        let head = vec![
            Cell::text(&r.trace),
            Cell::Int(r.vm),
            Cell::text(r.mode.name()),
        ];
        let row = match &r.run {
            Ok(m) => {
                let outcome = if m.refusals.is_empty() {
                    "ok".to_owned()
                } else {
                    format!("refused: {}", m.refusals.join("; "))
                };
                vec![
                    Cell::Int(m.stats.full_prepopulations),
                    Cell::Int(m.stats.prepopulations),
                    Cell::Int(m.stats.prepop_entries),
                    Cell::ms(m.stats.prepop_total_ns()),
                    Cell::Int(m.totals.iommu_root_updates),
                    Cell::Int(m.stats.iotlb_flushes),
                    Cell::ms(m.totals.flush_ns),
                    Cell::f(m.pinned_pages_peak as f64 * 4096.0 / (1 << 20) as f64, 1),
                    Cell::Int(m.table_pages_peak),
                    Cell::text(outcome),
                ]
            }
            Err(e) => {
                let mut v = vec![Cell::Null; 9];
                v.push(Cell::text(format!("failed: {e}")));
                v
            }
        };
        t.row(head.into_iter().chain(row).collect());
    }
    Ok(Section {
        id: "whatif".into(),
        title: "What-if: the same trace in every sharing mode".into(),
        finding: finding(&runs),
        tables: vec![t],
    })
}

fn finding(runs: &[Replay]) -> String {
    let get = |trace: &str, vm: u64, mode: ShareMode| {
        runs.iter()
            .find(|r| r.trace == trace && r.vm == vm && r.mode == mode)
            .and_then(|r| r.run.as_ref().ok())
            .filter(|m| m.refusals.is_empty())
    };
    let mut pairs: Vec<(&str, u64)> = runs.iter().map(|r| (r.trace.as_str(), r.vm)).collect();
    pairs.dedup();
    if pairs.is_empty() {
        return "No VM with memslot events to replay.".into();
    }
    let mut parts = Vec::new();
    for (trace, vm) in pairs {
        let (Some(seed), Some(opt)) = (
            get(trace, vm, ShareMode::PinPrepopulate),
            get(trace, vm, ShareMode::Optimized),
        ) else {
            parts.push(format!(
                "{trace} VM {vm}: the 2021 or the optimized mode did not run to the end (see the table)"
            ));
            continue;
        };
        let (sf, of) = (
            seed.stats.full_prepopulations,
            opt.stats.full_prepopulations,
        );
        let (se, oe) = (seed.stats.prepop_entries, opt.stats.prepop_entries);
        let (st, ot) = (seed.stats.prepop_total_ns(), opt.stats.prepop_total_ns());
        parts.push(format!(
            "{trace} VM {vm}: the 2021 design pre-populates all pinned memory {sf} times and \
             writes {se} entries ({:.1} ms); the optimized mode {of} times and {oe} entries \
             ({:.1} ms) — {} full pre-populations ({:.0}%), {} entries ({:.0}%) and {:.1} ms \
             saved; IOMMU root updates {} → {}",
            st as f64 / 1e6,
            ot as f64 / 1e6,
            sf.saturating_sub(of),
            pct(sf.saturating_sub(of) as f64, sf as f64),
            se.saturating_sub(oe),
            pct(se.saturating_sub(oe) as f64, se as f64),
            st.saturating_sub(ot) as f64 / 1e6,
            seed.totals.iommu_root_updates,
            opt.totals.iommu_root_updates,
        ));
    }
    format!(
        "Replayed through the simulator (the real page-table code; pre-population time measured \
         here, pinning and IOTLB costs modelled). {}.",
        parts.join(". ")
    )
}
