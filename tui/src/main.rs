//! `sharetop`: the view of IOMMU/TDP page-table sharing.
//!
//! This build prints the overview of a recorded trace (`--replay FILE --once`); the live and
//! simulated sources and the interactive view come with the sharetop issue.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use sharetop::overview::{self, Overview};
use tdpshare::trace::TraceReader;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Read events from a trace file in the tdpshare format.
    #[arg(long, value_name = "FILE")]
    replay: PathBuf,
    /// Print the overview once and exit.
    #[arg(long)]
    once: bool,
    /// Output format for --once.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Sort rows by this column (descending).
    #[arg(long, short)]
    sort: Option<String>,
    /// Skip events of types this build does not know instead of stopping.
    #[arg(long)]
    skip_unknown: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !cli.once {
        bail!("this build has no interactive view yet: pass --once to print the overview");
    }
    let sort = match &cli.sort {
        Some(name) => Some(overview::column(name).with_context(|| {
            let names: Vec<_> = overview::COLUMNS.iter().map(|c| c.name).collect();
            format!("no column {name:?}; columns are {}", names.join(", "))
        })?),
        None => None,
    };
    let mut reader = TraceReader::open(&cli.replay)?.skip_unknown(cli.skip_unknown);
    let mut view = Overview::default();
    for event in reader.by_ref() {
        let event = event.with_context(|| format!("reading {}", cli.replay.display()))?;
        view.record(&event);
    }
    match cli.format {
        Format::Table => print!("{}", view.table(sort)),
        Format::Csv => print!("{}", view.csv(sort)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&view.json(sort))?),
    }
    if reader.skipped_unknown() > 0 {
        eprintln!(
            "skipped {} events of unknown type",
            reader.skipped_unknown()
        );
    }
    Ok(())
}
