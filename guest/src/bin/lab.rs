//! `tdpshare-lab`: the lab VMM, run inside the L1 by `cargo xtask lab test` (docs/lab.md).
//!
//! `tdpshare-lab test --memslots TRACE --out DIR [--recorder tdpshare-probe] [--scalable]`
//! prints one line per check and `TDPSHARE-LAB: PASS|FAIL (...)` last; exit status 0 when every
//! check passed, 1 when one failed, 2 when the run could not be carried out.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tdpshare_guest::lab::{self, Options};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The lab VMM: an L2 whose TDP table an IOMMU walks for edu's DMA"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay a memslot sequence, share (or copy) the table, drive edu's DMA, check.
    Test {
        /// The memslot sequence (a tdpshare trace, e.g. fixtures/traces/seabios-q35-64m.jsonl).
        #[arg(long)]
        memslots: PathBuf,
        /// Memslot calls before the device is realized and sharing starts.
        #[arg(long, default_value_t = 2)]
        share_after: usize,
        /// Where the trace, the scenario and the summary go.
        #[arg(long)]
        out: PathBuf,
        /// The probes recorder to run meanwhile (`tdpshare-probe`).
        #[arg(long)]
        recorder: Option<PathBuf>,
        /// The VT-d runs in scalable mode.
        #[arg(long)]
        scalable: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Test {
            memslots,
            share_after,
            out,
            recorder,
            scalable,
        } => {
            let opts = Options {
                memslots,
                share_after,
                out,
                recorder,
                scalable,
            };
            match lab::test(&opts) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    println!("TDPSHARE-LAB: ERROR {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
