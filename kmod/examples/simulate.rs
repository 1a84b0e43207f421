//! Runs a scenario in each sharing mode and prints the figures side by side.
//!
//! ```text
//! cargo run -p tdpshare --features std --example simulate -- kmod/scenarios/boot-8g.toml
//!     [--mode MODE]... [--kernel 6.12|pre-6.4] [--real-memory] [--no-huge-pages]
//!     [--trace OUT.jsonl] [--no-verify]
//! ```
//! SCENARIO is a `.toml` scenario or a recorded trace (`.jsonl`), replayed.

use std::path::PathBuf;
use std::process::ExitCode;

use tdpshare::decision::kvm::KvmKernel;
use tdpshare::event::{EventKind, PrepopCause, ShareMode, Source};
use tdpshare::sim::{ModeRun, RunOptions, Scenario, run_mode};
use tdpshare::{Header, TraceFile};

/// Full pre-populations per boot the seed design reported (KVM Forum 2021, 8 GiB Linux guest).
const SEED_FULL_PREPOPULATIONS: u64 = 132;

struct Args {
    scenario: PathBuf,
    modes: Vec<ShareMode>,
    real_memory: bool,
    verify: bool,
    no_huge_pages: bool,
    kernel: Option<KvmKernel>,
    trace: Option<PathBuf>,
}

const USAGE: &str = "usage: simulate SCENARIO.toml|TRACE.jsonl [--mode MODE]... [--kernel 6.12|pre-6.4] [--real-memory] [--no-huge-pages] [--trace OUT.jsonl] [--no-verify]
modes: pin_prepopulate, exported_iopf, separate_table, optimized
kernels: 6.12 (roots persist until invalidated), pre-6.4 (a root goes with its last vCPU)";

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut scenario = None;
    let mut modes = Vec::new();
    let (mut real_memory, mut verify, mut trace, mut no_huge_pages) = (false, true, None, false);
    let mut kernel = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => {
                let m = args.next().ok_or("--mode needs a value")?;
                let mode = m
                    .parse::<ShareMode>()
                    .map_err(|e| format!("unknown mode {m:?}: {e}"))?;
                modes.push(mode);
            }
            "--kernel" => {
                let k = args.next().ok_or("--kernel needs a value")?;
                kernel = Some(
                    k.parse::<KvmKernel>()
                        .map_err(|e| format!("unknown kernel {k:?}: {e}"))?,
                );
            }
            "--real-memory" => real_memory = true,
            "--no-verify" => verify = false,
            "--no-huge-pages" => no_huge_pages = true,
            "--trace" => trace = Some(PathBuf::from(args.next().ok_or("--trace needs a file")?)),
            "-h" | "--help" => return Err(String::new()),
            _ if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ => scenario = Some(PathBuf::from(a)),
        }
    }
    Ok(Args {
        scenario: scenario.ok_or("no scenario given")?,
        modes,
        real_memory,
        verify,
        no_huge_pages,
        kernel,
        trace,
    })
}

fn ms(ns: u64) -> String {
    format!("{:.3} ms", ns as f64 / 1e6)
}

fn mib(pages: u64) -> String {
    format!("{:.1} MiB", pages as f64 / 256.0)
}

fn count_cause(run: &ModeRun, cause: PrepopCause) -> usize {
    run.events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::PrepopulateEnd { cause: c, .. } if c == cause))
        .count()
}

fn print_table(runs: &[ModeRun]) {
    type Row = (&'static str, fn(&ModeRun) -> String);
    let rows: &[Row] = &[
        ("pre-populations (full: all pinned memory)", |r| {
            r.stats.full_prepopulations.to_string()
        }),
        ("  at sharing start / after a root update", |r| {
            format!(
                "{} / {}",
                count_cause(r, PrepopCause::SharingStart),
                count_cause(r, PrepopCause::NewRoot)
            )
        }),
        ("populations of one range: slot add / split", |r| {
            format!(
                "{} / {}",
                count_cause(r, PrepopCause::MemslotAdd),
                count_cause(r, PrepopCause::HugePageSplit)
            )
        }),
        ("entries written", |r| r.stats.prepop_entries.to_string()),
        ("time in pre-population [measured]", |r| {
            ms(r.totals.prepop_ns)
        }),
        ("  mmu_lock yields / largest batch (entries)", |r| {
            format!("{} / {}", r.totals.prepop_yields, r.totals.prepop_max_batch)
        }),
        ("root updates (IOMMU re-pointed)", |r| {
            r.totals.iommu_root_updates.to_string()
        }),
        ("roots allocated (all)", |r| {
            r.stats.roots_allocated.to_string()
        }),
        ("fast zaps", |r| r.stats.fast_zaps.to_string()),
        ("huge-page splits / collapses", |r| {
            format!("{} / {}", r.stats.splits, r.stats.collapses)
        }),
        ("IOTLB flushes", |r| r.stats.iotlb_flushes.to_string()),
        ("time in IOTLB flushes [modelled]", |r| {
            ms(r.totals.flush_ns)
        }),
        ("pinned pages (peak)", |r| {
            format!("{} ({})", r.pinned_pages_peak, mib(r.pinned_pages_peak))
        }),
        ("pinned pages at the end", |r| {
            r.pinned_pages_end.to_string()
        }),
        ("time pinning", |r| {
            format!("{} [{}]", ms(r.totals.pin_ns), r.pin_cost)
        }),
        ("table pages (peak)", |r| {
            format!("{} ({})", r.table_pages_peak, mib(r.table_pages_peak))
        }),
        ("IOMMU leaves 4K / 2M / 1G", |r| {
            r.iommu_leaves
                .map_or("-".into(), |[a, b, c]| format!("{a} / {b} / {c}"))
        }),
        ("DMA ok / faulted", |r| {
            format!("{} / {}", r.device.dma_ok, r.device.dma_faults)
        }),
        ("IO page faults resolved", |r| {
            r.totals.iopf_resolved.to_string()
        }),
        ("pinned-DMA checks / faults", |r| {
            format!("{} / {}", r.device.verify_checked, r.device.verify_faults)
        }),
        ("vCPU TDP faults", |r| r.totals.cpu_faults.to_string()),
        ("simulated time", |r| ms(r.duration_ns)),
    ];
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|(_, f)| runs.iter().map(f).collect())
        .collect();
    let col: Vec<usize> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            cells
                .iter()
                .map(|c| c[i].len())
                .chain([r.mode.name().len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    print!("{:width$}", "");
    for (r, w) in runs.iter().zip(&col) {
        print!("  {:>w$}", r.mode.name());
    }
    println!();
    for ((name, _), row) in rows.iter().zip(&cells) {
        print!("{name:width$}");
        for (c, w) in row.iter().zip(&col) {
            print!("  {c:>w$}");
        }
        println!();
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let mut scenario = Scenario::load(&args.scenario).map_err(|e| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    })?;
    if args.no_huge_pages {
        scenario.vm.huge_pages = false;
        scenario.name.push_str(" (4 KiB host pages)");
    }
    if let Some(kernel) = args.kernel {
        scenario.vm.kernel = kernel;
    }
    if scenario.vm.kernel != KvmKernel::default() {
        scenario
            .name
            .push_str(&format!(" (KVM {})", scenario.vm.kernel));
    }
    let modes = if args.modes.is_empty() {
        scenario.sharing.modes.clone()
    } else {
        args.modes.clone()
    };
    let opts = RunOptions {
        real_memory: args.real_memory,
        verify_dma: args.verify,
        dirty_tracking: None,
    };
    println!(
        "scenario {} ({} steps): {}",
        scenario.name,
        scenario.timeline.len(),
        scenario.description
    );
    let mut runs = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        let run = run_mode(&scenario, *mode, i as u64 + 1, opts).map_err(|e| {
            let source = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            format!("{e}{source}")
        })?;
        runs.push(run);
    }
    println!();
    print_table(&runs);
    for r in &runs {
        for refusal in &r.refusals {
            println!("{}: {refusal}", r.mode);
        }
    }
    if let Some(seed) = runs.iter().find(|r| r.mode == ShareMode::PinPrepopulate) {
        println!(
            "\nThe 2021 design here, on KVM {}: {} full pre-populations ({} after root updates, \
             {} SMM transitions and {} CR0/CR4 writes in the timeline). The seed measured {} in \
             its own 8 GiB Linux boot on a pre-6.4 host (see docs/performance.md).",
            scenario.vm.kernel,
            seed.stats.full_prepopulations,
            count_cause(seed, PrepopCause::NewRoot),
            seed.stats.smm_transitions,
            seed.stats.cr_writes,
            SEED_FULL_PREPOPULATIONS
        );
    }
    println!(
        "\nHow: table building is the real code on real table memory (measured); pinning is {}; \
         IOTLB flushes use the VT-d cost model (modelled). Timestamps are simulated.",
        if args.real_memory {
            "mlock of a real anonymous mapping (measured)"
        } else {
            "per-page costs from published measurements (modelled)"
        }
    );
    if let Some(path) = &args.trace {
        let mut file = TraceFile::create(path, &Header::new(Source::Simulator, ""))
            .map_err(|e| e.to_string())?;
        let mut all: Vec<_> = runs.iter().flat_map(|r| r.events.iter()).collect();
        all.sort_by_key(|e| e.ts_ns);
        for e in all {
            file.write(e).map_err(|e| e.to_string())?;
        }
        let n = file.finish().map_err(|e| e.to_string())?;
        println!("wrote {n} events to {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("simulate: {e}");
            eprintln!("{USAGE}");
            ExitCode::FAILURE
        }
    }
}
