//! `tdpshare-analyze`: offline tools over event streams.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tdpshare::ShareMode;
use tdpshare::event::{EventKind, Source};
use tdpshare::sim::Scenario;
use tdpshare::{Header, TraceFile, TraceReader};
use tdpshare_analysis::dataset::{self, Dataset, LoadOptions};
use tdpshare_analysis::qemu_memslots;
use tdpshare_analysis::report::{self, Format, Report, Section, render::render};

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Inputs and how to read them (report, summary).
#[derive(Debug, clap::Args)]
struct Inputs {
    /// Traces (`.jsonl`), Parquet files, or dataset directories written by `export --parquet`.
    #[arg(required = true, value_name = "TRACE")]
    inputs: Vec<PathBuf>,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Skip events of types this build does not know instead of failing.
    #[arg(long)]
    skip_unknown: bool,
    /// Host name for traces whose header names none (default `unknown`).
    #[arg(long)]
    host: Option<String>,
}

impl LoadArgs {
    fn options(&self) -> LoadOptions {
        LoadOptions {
            skip_unknown: self.skip_unknown,
            host: self.host.clone(),
            ..LoadOptions::default()
        }
    }
}

#[derive(Debug, clap::Args)]
struct Output {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Write here (atomically) instead of standard output.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

/// The report sections, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Summary,
    Roots,
    Whatif,
    Huge,
    Iotlb,
    Dma,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every report: summary, root updates and their triggers, what-if in every mode, huge
    /// pages, IOTLB flushes, DMA mapping cost.
    Report {
        #[command(flatten)]
        inputs: Inputs,
        #[command(flatten)]
        out: Output,
        /// Only these sections (repeat; default all).
        #[arg(long = "only", value_enum, value_name = "SECTION")]
        only: Vec<Part>,
        /// How far back a trigger may lie before the root update it caused.
        #[arg(long, default_value_t = 1000, value_name = "MS")]
        window_ms: u64,
        /// Range flushes this close to the previous one of their domain count as batchable.
        #[arg(long, default_value_t = 10, value_name = "US")]
        batch_window_us: u64,
        /// What-if: the device can take IO page faults (so the 2023 design can run).
        #[arg(long)]
        device_iopf: bool,
        /// What-if: guest memory on 4 KiB host pages only.
        #[arg(long)]
        no_huge_pages: bool,
    },
    /// Per-VM counts of the inputs.
    Summary {
        #[command(flatten)]
        inputs: Inputs,
        #[command(flatten)]
        out: Output,
    },
    /// Two runs (or two modes' traces) side by side: A's totals against B's.
    Diff {
        /// The first input (trace, Parquet file or dataset).
        a: PathBuf,
        /// The second.
        b: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        out: Output,
    },
    /// Write traces as a Hive-partitioned Parquet dataset (`DIR/host=…/date=…/TRACE.parquet`)
    /// that polars, DuckDB, Spark, Trino or DataFusion read as one table.
    Export {
        /// The traces (tdpshare format).
        #[arg(required = true)]
        traces: Vec<PathBuf>,
        /// The dataset directory (created; a trace exported again replaces its files).
        #[arg(long, value_name = "DIR")]
        parquet: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Run a simulator scenario (TOML) in one mode and write its events as a trace.
    Simulate {
        /// The scenario (e.g. kmod/scenarios/boot-8g.toml).
        scenario: PathBuf,
        /// The sharing mode.
        #[arg(long, value_enum)]
        mode: ShareMode,
        /// The trace to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Turn a QEMU `-trace 'kvm_set_user_memory*'` log into a tdpshare trace of memslot events.
    ImportQemu {
        /// The QEMU trace output.
        input: PathBuf,
        /// The trace to write.
        #[arg(short, long)]
        output: PathBuf,
        /// VM id to give the events (the QEMU pid, if known).
        #[arg(long, default_value_t = 1)]
        vm: u64,
        /// Spacing of events when QEMU printed no timestamps.
        #[arg(long, default_value_t = 1_000_000)]
        spacing_ns: u64,
        /// Header `start_unix_ns` (default: now); fix it for reproducible output.
        #[arg(long)]
        start_unix_ns: Option<u64>,
    },
    /// Print a simulator scenario (TOML) that replays a recorded trace.
    Scenario {
        /// The trace (tdpshare format).
        trace: PathBuf,
        /// The scenario's name.
        #[arg(long, default_value = "replay")]
        name: String,
        /// Replay this VM (default: the first VM in the trace).
        #[arg(long)]
        vm: Option<u64>,
    },
    /// Copy the events of the named types (and VM) into a new trace, header kept: e.g. a
    /// boot's memslot and root history without its hundred thousand SPTE changes.
    Filter {
        /// The trace to read (tdpshare format).
        input: PathBuf,
        /// The trace to write.
        #[arg(short, long)]
        output: PathBuf,
        /// An event type to keep (its name in trace files, e.g. `memslot_add`); repeat it.
        #[arg(long = "type", required = true, value_name = "TYPE")]
        types: Vec<String>,
        /// Keep only this VM's events.
        #[arg(long)]
        vm: Option<u64>,
    },
}

/// Writes `text` to `path` atomically (a temporary file renamed into place), or to stdout.
fn emit(out: &Output, text: &str) -> anyhow::Result<()> {
    match &out.output {
        None => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                // The reader went away (`| head`): not an error of ours.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                r => r.context("writing to standard output")?,
            }
        }
        Some(path) => {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

fn open(inputs: &[PathBuf], load: &LoadArgs) -> anyhow::Result<Dataset> {
    Dataset::open(inputs, &load.options()).context("loading the inputs")
}

fn names(inputs: &[PathBuf]) -> Vec<String> {
    inputs.iter().map(|p| p.display().to_string()).collect()
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Report {
            inputs,
            out,
            only,
            window_ms,
            batch_window_us,
            device_iopf,
            no_huge_pages,
        } => {
            let ds = open(&inputs.inputs, &inputs.load)?;
            let want = |p: Part| only.is_empty() || only.contains(&p);
            let window_ns = window_ms.saturating_mul(1_000_000);
            let mut sections: Vec<Section> = Vec::new();
            if want(Part::Summary) {
                sections.push(report::summary::section(&ds).context("summary")?);
            }
            if want(Part::Roots) {
                sections.push(report::roots::section(&ds, window_ns).context("root updates")?);
            }
            if want(Part::Whatif) {
                let opts = report::whatif::WhatIfOptions {
                    device_iopf,
                    no_huge_pages,
                };
                sections.push(report::whatif::section(&ds, opts).context("what-if")?);
            }
            if want(Part::Huge) {
                sections.push(report::huge::section(&ds, window_ns).context("huge pages")?);
            }
            if want(Part::Iotlb) {
                sections.push(
                    report::iotlb::section(&ds, batch_window_us.saturating_mul(1000))
                        .context("IOTLB flushes")?,
                );
            }
            if want(Part::Dma) {
                sections.push(report::dma::section(&ds).context("DMA mapping cost")?);
            }
            let r = Report {
                inputs: names(&inputs.inputs),
                sections,
            };
            emit(&out, &render(&r, out.format))?;
        }
        Command::Summary { inputs, out } => {
            let ds = open(&inputs.inputs, &inputs.load)?;
            let r = Report {
                inputs: names(&inputs.inputs),
                sections: vec![report::summary::section(&ds).context("summary")?],
            };
            emit(&out, &render(&r, out.format))?;
        }
        Command::Diff { a, b, load, out } => {
            let da = open(std::slice::from_ref(&a), &load)?;
            let db = open(std::slice::from_ref(&b), &load)?;
            let section =
                report::summary::diff(&a.display().to_string(), &da, &b.display().to_string(), &db)
                    .context("diff")?;
            let r = Report {
                inputs: names(&[a, b]),
                sections: vec![section],
            };
            emit(&out, &render(&r, out.format))?;
        }
        Command::Export {
            traces,
            parquet,
            load,
        } => {
            let s = dataset::export(&traces, &parquet, &load.options())
                .with_context(|| format!("exporting to {}", parquet.display()))?;
            println!(
                "{} events from {} trace(s) -> {} file(s) under {}",
                s.events,
                traces.len(),
                s.files.len(),
                parquet.display()
            );
        }
        Command::Simulate {
            scenario,
            mode,
            output,
        } => {
            let sc = Scenario::load(&scenario)
                .with_context(|| format!("loading {}", scenario.display()))?;
            let run = tdpshare::sim::run_mode(&sc, mode, 1, tdpshare::sim::RunOptions::default())
                .with_context(|| format!("{} in {mode}", sc.name))?;
            let mut header = Header::new(Source::Simulator, "");
            header.start_unix_ns = 0;
            let mut trace = TraceFile::create(&output, &header)?;
            for event in &run.events {
                trace.write(event)?;
            }
            let n = trace
                .finish()
                .with_context(|| format!("writing {}", output.display()))?;
            println!(
                "{n} events ({} full pre-populations) -> {}",
                run.stats.full_prepopulations,
                output.display()
            );
        }
        Command::ImportQemu {
            input,
            output,
            vm,
            spacing_ns,
            start_unix_ns,
        } => {
            let file =
                File::open(&input).with_context(|| format!("opening {}", input.display()))?;
            let (events, summary) = qemu_memslots::import(BufReader::new(file), vm, spacing_ns)
                .with_context(|| format!("importing {}", input.display()))?;
            let mut header = Header::new(Source::Replay, "");
            if let Some(start) = start_unix_ns {
                header.start_unix_ns = start;
            }
            let mut trace = TraceFile::create(&output, &header)?;
            for event in &events {
                trace.write(event)?;
            }
            let n = trace
                .finish()
                .with_context(|| format!("writing {}", output.display()))?;
            println!(
                "{n} memslot events ({} add, {} delete, {} move, {} flags; {} failed calls skipped) -> {}",
                summary.adds,
                summary.deletes,
                summary.moves,
                summary.flag_changes,
                summary.failed_calls,
                output.display()
            );
        }
        Command::Scenario { trace, name, vm } => {
            let events = TraceReader::open(&trace)?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("reading {}", trace.display()))?;
            if let Some(v) = vm
                && !events.iter().any(|e| e.vm == v)
            {
                let mut vms: Vec<u64> = events.iter().map(|e| e.vm).collect();
                vms.sort_unstable();
                vms.dedup();
                let list: Vec<String> = vms.iter().map(u64::to_string).collect();
                bail!(
                    "no event of VM {v} in {} (its VMs: {})",
                    trace.display(),
                    if list.is_empty() {
                        "none".to_owned()
                    } else {
                        list.join(", ")
                    }
                );
            }
            print!("{}", Scenario::from_events(&name, vm, &events).to_toml());
        }
        Command::Filter {
            input,
            output,
            types,
            vm,
        } => {
            for t in &types {
                if !EventKind::NAMES.contains(&t.as_str()) {
                    bail!(
                        "unknown event type `{t}` (known: {})",
                        EventKind::NAMES.join(", ")
                    );
                }
            }
            let reader = TraceReader::open(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let mut trace = TraceFile::create(&output, reader.header())
                .with_context(|| format!("creating {}", output.display()))?;
            let mut read = 0u64;
            for event in reader {
                let event = event.with_context(|| format!("reading {}", input.display()))?;
                read += 1;
                if types.iter().any(|t| t == event.kind.name()) && vm.is_none_or(|v| v == event.vm)
                {
                    trace.write(&event)?;
                }
            }
            let kept = trace
                .finish()
                .with_context(|| format!("writing {}", output.display()))?;
            println!("{kept} of {read} events kept -> {}", output.display());
        }
    }
    Ok(())
}
