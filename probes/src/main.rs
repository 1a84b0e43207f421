//! `tdpshare-probe`: the probes without the TUI.
//!
//! - `status`: attach every probe and print what became of each.
//! - `record -o FILE [--pid P] [--duration S]`: record events in the trace format.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tdpshare_probes::loader::{LoadOptions, Session, status_table};

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach every probe and print the status of each.
    Status,
    /// Record events into a trace file (tdpshare trace format).
    Record {
        /// The trace to write (appears when the recording ends; FILE.partial meanwhile).
        #[arg(short, long)]
        output: PathBuf,
        /// Only this VMM process.
        #[arg(long)]
        pid: Option<u32>,
        /// Stop after this many seconds (default: at Ctrl-C).
        #[arg(long)]
        duration: Option<f64>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Status => {
            let session = Session::start(&LoadOptions::default());
            for n in &session.notes {
                eprintln!("note: {n}");
            }
            print!("{}", status_table(&session.statuses));
            println!(
                "{} of {} probes attached",
                session.attached(),
                session.statuses.len()
            );
        }
        Command::Record {
            output,
            pid,
            duration,
        } => record(output, pid, duration)?,
    }
    Ok(())
}

fn record(output: PathBuf, pid: Option<u32>, duration: Option<f64>) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    eprintln!("recording to {} ...", output.display());
    let summary = tdpshare_probes::record::record(
        &output,
        pid,
        duration.map(Duration::from_secs_f64),
        &stop,
        |s| eprint!("{s}"),
    )
    .with_context(|| format!("recording to {}", output.display()))?;
    for line in summary.lines(&output) {
        eprintln!("{line}");
    }
    Ok(())
}
