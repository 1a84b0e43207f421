//! The recorder: live events into a trace file, until a deadline or a stop flag.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tdpshare::event::Source;
use tdpshare::{Header, TraceError, TraceFile};

use crate::catalog;
use crate::loader::{KernelCounters, LoadOptions, Session, kernel_release, status_table};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("no probe attached: nothing to record\n{table}")]
    NothingAttached { table: String },
    #[error("cannot write the trace")]
    Trace(#[from] TraceError),
}

/// What a recording did.
#[derive(Debug, Clone)]
pub struct RecordSummary {
    pub events: u64,
    pub records: u64,
    pub undecodable: u64,
    pub uneventful: u64,
    pub counters: KernelCounters,
}

impl RecordSummary {
    /// The summary as lines for the user.
    pub fn lines(&self, output: &Path) -> Vec<String> {
        let mut out = vec![format!(
            "{} events from {} records written to {} ({} dropped in the kernel, {} undecodable, {} without event)",
            self.events,
            self.records,
            output.display(),
            self.counters.drops,
            self.undecodable,
            self.uneventful
        )];
        let mut counts: Vec<_> = self.counters.counts.iter().collect();
        counts.sort();
        for ((tgid, probe), n) in counts {
            out.push(format!(
                "  pid {tgid:>7}  {:<28} {n}",
                catalog::id_name(*probe)
            ));
        }
        out
    }
}

/// The command-line arguments of `record` (shared by `tdpshare-probe` and `sharetop`).
#[derive(Debug, Clone, clap::Args)]
pub struct RecordArgs {
    /// The trace to write (appears when the recording ends; FILE.partial meanwhile).
    #[arg(short, long)]
    pub output: std::path::PathBuf,
    /// Only this VMM process (it must be running).
    #[arg(long, value_parser = crate::args::pid)]
    pub pid: Option<u32>,
    /// Stop after this many seconds (default: at Ctrl-C).
    #[arg(long, value_parser = crate::args::duration)]
    pub duration: Option<f64>,
    /// The kernel-side event buffer in MiB (a power of two): raise it when the summary reports
    /// records dropped in the kernel (a slow machine, bursts of pre-population).
    #[arg(long, default_value_t = 4, value_parser = parse_ring_mib)]
    pub ring_mib: u32,
}

/// `--ring-mib`: a power of two from 1 to 1024.
fn parse_ring_mib(text: &str) -> Result<u32, String> {
    let n: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number of MiB"))?;
    if !(1..=1024).contains(&n) || !n.is_power_of_two() {
        return Err(format!(
            "{n} MiB: the ring buffer takes a power of two from 1 to 1024 MiB"
        ));
    }
    Ok(n)
}

/// The `record` command: records until the duration passes or Ctrl-C, reporting on stderr.
pub fn run(args: &RecordArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    eprintln!("recording to {} ...", args.output.display());
    let summary = record(
        &args.output,
        &LoadOptions {
            pid: args.pid,
            ring_bytes: Some(args.ring_mib << 20),
            ..LoadOptions::default()
        },
        args.duration.map(Duration::from_secs_f64),
        &stop,
        |s| eprint!("{s}"),
    )
    .with_context(|| format!("recording to {}", args.output.display()))?;
    for line in summary.lines(&args.output) {
        eprintln!("{line}");
    }
    Ok(())
}

/// Records live events (of `opts.pid`, or all processes) into `output` until `duration`
/// passes or `stop` is set; `status` receives the probe status table and notes first. The
/// trace appears under its name only when complete (`TraceFile`).
pub fn record(
    output: &Path,
    opts: &LoadOptions,
    duration: Option<Duration>,
    stop: &AtomicBool,
    mut status: impl FnMut(&str),
) -> Result<RecordSummary, RecordError> {
    let mut session = Session::start(opts);
    for n in &session.notes {
        status(&format!("note: {n}\n"));
    }
    let table = status_table(&session.statuses);
    if session.attached() == 0 {
        return Err(RecordError::NothingAttached { table });
    }
    status(&table);
    status(&format!(
        "recording with {} of {} probes attached\n",
        session.attached(),
        session.statuses.len()
    ));
    let header = Header::new(Source::Live, kernel_release());
    let mut trace = TraceFile::create(output, &header)?;
    let deadline = duration.map(|d| Instant::now() + d);
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
    let events = trace.finish()?;
    let (undecodable, uneventful) = session.undecodable();
    Ok(RecordSummary {
        events,
        records: session.records(),
        undecodable,
        uneventful,
        counters: session.counters(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_mib_takes_powers_of_two_within_bounds() {
        assert_eq!(parse_ring_mib("64"), Ok(64));
        assert_eq!(parse_ring_mib("1"), Ok(1));
        for bad in ["0", "3", "2048", "-4", "x", "1.5"] {
            assert!(parse_ring_mib(bad).is_err(), "{bad}");
        }
    }
}
