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
    /// Only this VMM process (it must be running); the recording ends when it exits.
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
pub(crate) fn parse_ring_mib(text: &str) -> Result<u32, String> {
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

/// The `record` command: records until the duration passes, Ctrl-C or SIGTERM (the trace is
/// finished either way); SIGHUP closes the current file and goes on in a new one (log
/// rotation). Reports on stderr.
pub fn run(args: &RecordArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let rotate = std::sync::Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .context("installing the SIGINT/SIGTERM handlers")?;
    }
    signal_hook::flag::register(SIGHUP, rotate.clone()).context("installing the SIGHUP handler")?;
    eprintln!("recording to {} ...", args.output.display());
    let summary = record_with(
        &args.output,
        &LoadOptions {
            pid: args.pid,
            ring_bytes: Some(args.ring_mib << 20),
            ..LoadOptions::default()
        },
        args.duration.map(Duration::from_secs_f64),
        &Signals {
            stop: &stop,
            rotate: Some(&rotate),
        },
        |s| eprint!("{s}"),
    )
    .with_context(|| format!("recording to {}", args.output.display()))?;
    for line in summary.lines(&args.output) {
        eprintln!("{line}");
    }
    Ok(())
}

/// What ends or rotates a recording.
#[derive(Debug)]
pub struct Signals<'a> {
    /// Set: finish the trace and return.
    pub stop: &'a AtomicBool,
    /// Set: finish the current file and go on in the next segment (cleared when done).
    pub rotate: Option<&'a AtomicBool>,
}

/// How often the recorder pushes buffered lines to the `.partial` file: a recorder killed
/// without warning (SIGKILL, a crash) loses at most this much.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// How far back an event may arrive behind a later one and still be written in order: events
/// are held until the newest seen is this much younger (a memslot change is stamped at its
/// ioctl's entry but seen at its exit, after the fast zap it caused).
pub const REORDER_NS: u64 = 2_000_000_000;

/// The name of segment `n` of a rotated recording: `out.jsonl`, then `out-1.jsonl`, … — never
/// a name that exists.
pub fn segment_path(output: &Path, n: u32) -> std::path::PathBuf {
    if n == 0 {
        return output.to_path_buf();
    }
    let stem = output
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let name = match output.extension() {
        Some(ext) => format!("{stem}-{n}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{n}"),
    };
    output.with_file_name(name)
}

/// Events held back to be written in time order (see [`REORDER_NS`]).
#[derive(Debug, Default)]
pub struct Reorder {
    held: std::collections::BinaryHeap<std::cmp::Reverse<(u64, u64)>>,
    events: std::collections::HashMap<u64, tdpshare::Event>,
    seq: u64,
    newest: u64,
}

impl Reorder {
    pub fn push(&mut self, e: tdpshare::Event) {
        self.newest = self.newest.max(e.ts_ns);
        self.held.push(std::cmp::Reverse((e.ts_ns, self.seq)));
        self.events.insert(self.seq, e);
        self.seq += 1;
    }

    /// The events old enough to be written (all of them with `all`), oldest first; equal
    /// timestamps keep their arrival order.
    pub fn ready(&mut self, all: bool) -> Vec<tdpshare::Event> {
        let until = if all {
            u64::MAX
        } else {
            self.newest.saturating_sub(REORDER_NS)
        };
        let mut out = Vec::new();
        while let Some(std::cmp::Reverse((ts, seq))) = self.held.peek().copied() {
            if ts > until {
                break;
            }
            self.held.pop();
            if let Some(e) = self.events.remove(&seq) {
                out.push(e);
            }
        }
        out
    }
}

/// Records live events (of `opts.pid`, or all processes) into `output` until `duration`
/// passes or `stop` is set; `status` receives the probe status table and notes first. The
/// trace appears under its name only when complete (`TraceFile`).
pub fn record(
    output: &Path,
    opts: &LoadOptions,
    duration: Option<Duration>,
    stop: &AtomicBool,
    status: impl FnMut(&str),
) -> Result<RecordSummary, RecordError> {
    record_with(
        output,
        opts,
        duration,
        &Signals { stop, rotate: None },
        status,
    )
}

/// Records live events (of `opts.pid`, or all processes) into `output` until `duration`
/// passes or `stop` is set; `status` receives the probe status table and notes first. The
/// trace appears under its name only when complete (`TraceFile`).
/// [`record`], with rotation: events in time order (within [`REORDER_NS`]), flushed to the
/// `.partial` file every [`FLUSH_EVERY`]; each `rotate` finishes the current segment and
/// starts the next ([`segment_path`]).
pub fn record_with(
    output: &Path,
    opts: &LoadOptions,
    duration: Option<Duration>,
    signals: &Signals<'_>,
    mut status: impl FnMut(&str),
) -> Result<RecordSummary, RecordError> {
    let stop = signals.stop;
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
    let mut segment = 0;
    let mut trace = TraceFile::create(segment_path(output, segment), &header)?;
    let deadline = duration.map(|d| Instant::now() + d);
    let mut events = Vec::new();
    let mut order = Reorder::default();
    let mut flushed = Instant::now();
    let mut written = 0;
    // Event times count from the first segment's start; later segments' from their own.
    let base_unix = header.start_unix_ns;
    let mut offset = 0u64;
    let mut namer = crate::vmm::Namer::default();
    loop {
        let mut done = stop.load(Ordering::SeqCst) || deadline.is_some_and(|d| Instant::now() >= d);
        // The one VMM watched has exited: nothing more can come (its last events are read
        // below).
        if let Some(pid) = opts.pid
            && !done
            && !crate::vmm::running(pid)
        {
            status(&format!(
                "the VMM (pid {pid}) exited: finishing the trace\n"
            ));
            done = true;
        }
        session.poll(&mut events);
        for e in events.drain(..) {
            if let Some(named) = namer.first(&e, crate::vmm::name) {
                order.push(named);
            }
            order.push(e);
        }
        for mut e in order.ready(done) {
            e.ts_ns = e.ts_ns.saturating_sub(offset);
            trace.write(&e)?;
        }
        if done {
            break;
        }
        if signals
            .rotate
            .is_some_and(|r| r.swap(false, Ordering::SeqCst))
        {
            // Everything seen so far goes into the closing segment.
            for mut e in order.ready(true) {
                e.ts_ns = e.ts_ns.saturating_sub(offset);
                trace.write(&e)?;
            }
            let path = trace.path().to_path_buf();
            written += trace.finish()?;
            status(&format!("segment {} finished (SIGHUP)\n", path.display()));
            segment += 1;
            while segment_path(output, segment).exists() {
                segment += 1;
            }
            // Time restarts with the segment: its header says when.
            let header = Header::new(Source::Live, kernel_release());
            offset = header.start_unix_ns.saturating_sub(base_unix);
            trace = TraceFile::create(segment_path(output, segment), &header)?;
            for e in namer.all(0) {
                trace.write(&e)?;
            }
            flushed = Instant::now();
        }
        if flushed.elapsed() >= FLUSH_EVERY {
            trace.flush()?;
            flushed = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let events = written + trace.finish()?;
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

    use tdpshare::event::{EventKind, Source};

    #[test]
    fn events_are_written_in_time_order_within_the_window() {
        let ev = |ts: u64, generation: u64| {
            tdpshare::Event::new(
                ts,
                1,
                Source::Live,
                EventKind::FastZap {
                    generation,
                    pages: 0,
                },
            )
        };
        let mut r = Reorder::default();
        // A memslot change stamped at its ioctl's entry arrives after what it caused.
        r.push(ev(1_000, 1));
        r.push(ev(900, 2));
        r.push(ev(1_000, 3));
        assert!(r.ready(false).is_empty(), "held within the window");
        r.push(ev(1_000 + REORDER_NS + 1, 4));
        let out: Vec<u64> = r.ready(false).iter().map(|e| e.ts_ns).collect();
        assert_eq!(out, [900, 1_000, 1_000]);
        let rest = r.ready(true);
        assert_eq!(rest.len(), 1);
        assert!(r.ready(true).is_empty());
    }

    #[test]
    fn segments_never_reuse_a_name() {
        let p = Path::new("/tmp/x/boot.jsonl");
        assert_eq!(segment_path(p, 0), Path::new("/tmp/x/boot.jsonl"));
        assert_eq!(segment_path(p, 2), Path::new("/tmp/x/boot-2.jsonl"));
        assert_eq!(segment_path(Path::new("t"), 1), Path::new("t-1"));
    }

    #[test]
    fn ring_mib_takes_powers_of_two_within_bounds() {
        assert_eq!(parse_ring_mib("64"), Ok(64));
        assert_eq!(parse_ring_mib("1"), Ok(1));
        for bad in ["0", "3", "2048", "-4", "x", "1.5"] {
            assert!(parse_ring_mib(bad).is_err(), "{bad}");
        }
    }
}
