//! `tdpshare-probe`: the probes without the TUI.
//!
//! - `status`: attach every probe and print what became of each.
//! - `record -o FILE [--pid P] [--duration S]`: record events in the trace format.

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
        Command::Record(args) => tdpshare_probes::record::run(&args)?,
    }
    Ok(())
}
