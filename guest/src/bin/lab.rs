//! `tdpshare-lab`: the lab VMM, run inside the L1 by `cargo xtask lab test` (docs/lab.md).
//!
//! `tdpshare-lab test --memslots TRACE --out DIR [--recorder tdpshare-probe] [--scalable]`
//! prints one line per check and `TDPSHARE-LAB: PASS|FAIL (...)` last; exit status 0 when every
//! check passed, 1 when one failed, 2 when the run could not be carried out.
//!
//! `tdpshare-lab record --out DIR --watch FILE --marker TEXT -- VMM...` records a real VMM's
//! boot under the probes (`cargo xtask lab record-boot`); exit status 0 once a boot showed the
//! marker, 2 when none did.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tdpshare_guest::lab::boot::{self, RecordOptions};
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
    /// Run a VMM under the probes until a marker shows in a file it writes; retry a boot that
    /// never shows it.
    Record {
        /// The probes recorder.
        #[arg(long, default_value = "/bin/tdpshare-probe")]
        recorder: PathBuf,
        /// Where the trace, the VMM's output and the summary go.
        #[arg(long)]
        out: PathBuf,
        /// The file the VMM writes the marker to (its serial console, a debug port).
        #[arg(long)]
        watch: PathBuf,
        /// The text that shows the boot got where it should.
        #[arg(long)]
        marker: String,
        /// Stop the VMM at the marker (firmware that never powers off).
        #[arg(long)]
        stop_at_marker: bool,
        /// Boots tried before giving up (nested boots under TCG die now and then).
        #[arg(long, default_value_t = 3)]
        attempts: u32,
        /// Seconds one boot may take.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The VMM's command line.
        #[arg(last = true, required = true)]
        command: Vec<String>,
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
        Command::Record {
            recorder,
            out,
            watch,
            marker,
            stop_at_marker,
            attempts,
            timeout,
            command,
        } => {
            let opts = RecordOptions {
                recorder,
                out,
                watch,
                marker,
                stop_at_marker,
                attempts,
                timeout: std::time::Duration::from_secs(timeout),
                command,
            };
            match boot::record(&opts) {
                Ok(summary) => {
                    print!("{summary}");
                    println!("TDPSHARE-RECORD: OK");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("TDPSHARE-RECORD: ERROR {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
