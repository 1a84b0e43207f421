//! `tdpshare-probe`: the probes without the TUI.
//!
//! - `status`: attach every probe and print what became of each.
//! - `record -o FILE [--pid P] [--duration S]`: record events in the trace format.
//! - `serve [--listen ADDR:PORT]`: a Prometheus / OpenMetrics exporter (docs/exporter.md).
//! - `bench-decode [--records N]`: the decoder's rate on this kernel's record layout.

use clap::{Parser, Subcommand};
use tdpshare_probes::loader::{LoadOptions, Session, status_table};
use tdpshare_probes::record::RecordArgs;

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
    Record(RecordArgs),
    /// Serve the probes' counts as a Prometheus / OpenMetrics endpoint (/metrics, /healthz)
    /// until SIGTERM.
    Serve(tdpshare_probes::exporter::ServeArgs),
    /// Time the decoder on N synthetic SPTE-change records laid out by this kernel's format
    /// (no probe is attached); prints `decoded N records into M events in S s: R records/s`.
    BenchDecode {
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
    },
}

use anyhow::bail;

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
            if session.attached() == 0 {
                // Nothing can be recorded: a status check must fail (scripts, systemd).
                bail!("no probe attached (see the states above; the probes need root)");
            }
        }
        Command::Record(args) => tdpshare_probes::record::run(&args)?,
        Command::Serve(args) => tdpshare_probes::exporter::run(&args)?,
        Command::BenchDecode { records } => {
            let r = tdpshare_probes::rate::decode_rate(records)?;
            println!(
                "decoded {} records into {} events in {:.3} s: {:.0} records/s",
                r.records,
                r.events,
                r.secs,
                r.records as f64 / r.secs
            );
        }
    }
    Ok(())
}
