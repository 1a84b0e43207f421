//! `tdpshare-analyze`: offline tools over event streams.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tdpshare::event::Source;
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
    }
    Ok(())
}
