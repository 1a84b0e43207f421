//! `tdpshare-probe`: the probes without the TUI.
//!
//! - `status`: attach every probe and print what became of each.
//! - `record -o FILE [--pid P] [--duration S]`: record events in the trace format.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tdpshare::event::Source;
use tdpshare::trace::{Header, TraceFile};
use tdpshare_probes::catalog;
use tdpshare_probes::loader::{LoadOptions, Session, kernel_release, status_table};

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
    let mut session = Session::start(&LoadOptions { pid, tracefs: None });
    for n in &session.notes {
        eprintln!("note: {n}");
    }
    eprint!("{}", status_table(&session.statuses));
    if session.attached() == 0 {
        anyhow::bail!("no probe attached: nothing to record (see the table above)");
    }
    let header = Header::new(Source::Live, kernel_release());
    let mut trace = TraceFile::create(&output, &header)
        .with_context(|| format!("creating {}", output.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    let deadline = duration.map(|s| Instant::now() + Duration::from_secs_f64(s));
    eprintln!("recording to {} ...", output.display());
    let mut events = Vec::new();
    loop {
        let done = stop.load(Ordering::SeqCst) || deadline.is_some_and(|d| Instant::now() >= d);
        session.poll(&mut events);
        for e in events.drain(..) {
            trace.write(&e)?;
        }
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let n = trace
        .finish()
        .with_context(|| format!("finishing {}", output.display()))?;
    let counters = session.counters();
    let (undecodable, uneventful) = session.undecodable();
    eprintln!(
        "{n} events from {} records written to {} ({} dropped in the kernel, {undecodable} undecodable, {uneventful} without event)",
        session.records(),
        output.display(),
        counters.drops
    );
    let mut counts: Vec<_> = counters.counts.into_iter().collect();
    counts.sort();
    for ((tgid, probe), n) in counts {
        eprintln!("  pid {tgid:>7}  {:<28} {n}", catalog::id_name(probe));
    }
    Ok(())
}
