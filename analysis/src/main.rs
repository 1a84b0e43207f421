//! `tdpshare-analyze`: offline tools over event streams.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tdpshare::event::{EventKind, Source};
use tdpshare::sim::Scenario;
use tdpshare::{Header, TraceFile, TraceReader};
use tdpshare_analysis::qemu_memslots;

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
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
