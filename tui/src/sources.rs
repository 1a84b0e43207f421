//! Where sharetop's events come from: the live probes, a trace file, or the simulator — each on
//! a thread of its own, sending [`Action`]s into one channel. Sources never read the app.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tdpshare::TraceReader;
use tdpshare::event::{Event, ShareMode};
use tdpshare::sim::{RunOptions, Scenario, run_mode};
use tdpshare_probes::loader::{LoadOptions, Session};

use crate::app::{Action, ProbeRow};

/// How a replayed stream is paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// As fast as possible (headless `--once`).
    Unpaced,
    /// Event time runs `speed` times faster than wall time.
    Speed(f64),
    /// One event per step signal (`n` in the TUI).
    Step,
}

/// The running sources: their threads, and what stops them.
#[derive(Debug)]
pub struct Sources {
    pub stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    children: Vec<Child>,
    /// Sends one step to a `Pace::Step` source.
    pub step: Option<Sender<()>>,
}

/// Thread-name prefix of source workers: their panics are contained ([`install_panic_hook`]).
const WORKER: &str = "sharetop-source";

thread_local! {
    /// The last panic message of this worker thread, for its failure report.
    static PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Wraps the current panic hook (ratatui's, which restores the terminal, then prints) so that a
/// panic on a source worker prints nothing — not over the running UI — and is reported as that
/// source's failure instead ([`Action::Failed`]). Other threads' panics go to the old hook.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let worker = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with(WORKER));
        if worker {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_owned());
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            PANIC.with(|p| *p.borrow_mut() = Some(format!("{msg}{at}")));
        } else {
            previous(info);
        }
    }));
}

impl Sources {
    /// Runs `body` on a source worker named `name`; a panic in it becomes an
    /// [`Action::Failed`] on `tx` instead of reaching the terminal.
    fn spawn(&mut self, name: &str, tx: Sender<Action>, body: impl FnOnce() + Send + 'static) {
        let label = name.to_owned();
        let report = tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{WORKER}-{name}"))
            .spawn(move || {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
                    let msg = PANIC
                        .with(|p| p.borrow_mut().take())
                        .unwrap_or_else(|| "panic".to_owned());
                    let _ = tx.send(Action::Failed(format!("the {label} source crashed: {msg}")));
                }
            });
        match thread {
            Ok(t) => self.threads.push(t),
            Err(e) => {
                let _ = report.send(Action::Failed(format!(
                    "cannot start the {name} source: {e}"
                )));
            }
        }
    }

    pub fn new() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            children: Vec::new(),
            step: None,
        }
    }

    /// Have all sources finished?
    pub fn finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    /// Stops every source and the guest the demo started.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // A stepped replay waits for its next step: hang up so that it returns.
        self.step = None;
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Default for Sources {
    fn default() -> Self {
        Self::new()
    }
}

/// How long to sleep towards `due` at `elapsed`: at most 50 ms, and nothing once the deadline
/// has passed — it may pass between the caller's check and here.
fn nap(due: Duration, elapsed: Duration) -> Duration {
    due.saturating_sub(elapsed).min(Duration::from_millis(50))
}

/// Sends events paced by their timestamps; ticks every second of event time, each with how
/// far the stream has played (`progress`, given the events sent so far).
fn pace_and_send(
    events: impl Iterator<Item = Event>,
    pace: Pace,
    tx: &Sender<Action>,
    stop: &AtomicBool,
    step: Option<&Receiver<()>>,
    progress: &dyn Fn(u64) -> f64,
) {
    let start = Instant::now();
    let mut next_tick = 0u64;
    let mut sent = 0u64;
    // Ticks run on the clock of the events they pace.
    let mut clock = None;
    let report = |clock: Option<tdpshare::Source>, sent: u64| {
        if let Some(c) = clock {
            let _ = tx.send(Action::Progress(c, progress(sent)));
        }
    };
    for e in events {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let clock = *clock.insert(e.source);
        match pace {
            Pace::Unpaced => {}
            Pace::Speed(speed) => {
                let due = Duration::from_nanos((e.ts_ns as f64 / speed) as u64);
                while start.elapsed() < due {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let event_now = (start.elapsed().as_nanos() as f64 * speed) as u64;
                    if event_now >= next_tick {
                        let _ = tx.send(Action::Tick(clock, event_now));
                        report(Some(clock), sent);
                        next_tick = event_now + 1_000_000_000;
                    }
                    std::thread::sleep(nap(due, start.elapsed()));
                }
            }
            Pace::Step => {
                if step.is_some_and(|s| s.recv().is_err()) {
                    return;
                }
            }
        }
        let mut ticked = false;
        while e.ts_ns >= next_tick {
            let _ = tx.send(Action::Tick(clock, next_tick));
            next_tick += 1_000_000_000;
            ticked = true;
        }
        if tx.send(Action::Event(e)).is_err() {
            return;
        }
        sent += 1;
        if ticked || pace == Pace::Step {
            report(Some(clock), sent);
        }
    }
    report(clock, sent);
}

/// A reader that counts the bytes read through it (a replay's progress through its file).
#[derive(Debug)]
struct Counted<R> {
    inner: R,
    read: Arc<std::sync::atomic::AtomicU64>,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Replays a trace file.
pub fn replay(
    sources: &mut Sources,
    path: PathBuf,
    pace: Pace,
    skip_unknown: bool,
    tx: Sender<Action>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let file = std::fs::File::open(&path).map_err(|source| tdpshare::TraceError::Open {
        path: path.clone(),
        source,
    })?;
    let size = file.metadata().map_or(0, |m| m.len());
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = Counted {
        inner: file,
        read: read.clone(),
    };
    let reader = TraceReader::new(std::io::BufReader::new(counted))
        .with_context(|| format!("opening {}", path.display()))?
        .skip_unknown(skip_unknown);
    // Bytes read ahead by the buffer count as played: at most its 8 KiB early.
    let progress = move |_sent: u64| {
        if size == 0 {
            1.0
        } else {
            read.load(Ordering::Relaxed) as f64 / size as f64
        }
    };
    let stop = sources.stop.clone();
    let (step_tx, step_rx) = std::sync::mpsc::channel();
    if pace == Pace::Step {
        sources.step = Some(step_tx);
    }
    let failed = tx.clone();
    sources.spawn("replay", failed, move || {
        let mut reader = reader;
        let mut error = None;
        let events = std::iter::from_fn(|| match reader.next()? {
            Ok(e) => Some(e),
            Err(e) => {
                error = Some(e.to_string());
                None
            }
        });
        pace_and_send(events, pace, &tx, &stop, Some(&step_rx), &progress);
        let skipped = reader.skipped_unknown();
        if skipped > 0 {
            let _ = tx.send(Action::Note(format!(
                "{skipped} events of types this build does not know were skipped"
            )));
        }
        let _ = tx.send(match error {
            Some(e) => Action::Failed(format!(
                "replay of {} stopped at {e}{}",
                path.display(),
                if e.contains("unknown event type") {
                    " (--skip-unknown skips such events)"
                } else {
                    ""
                }
            )),
            None => Action::Note(format!("replay of {} finished", path.display())),
        });
    });
    Ok(())
}

/// Runs `scenario` in each mode and streams the events of all runs, merged by time, so that
/// the whole run takes about `seconds` of wall time (or unpaced).
pub fn simulate(
    sources: &mut Sources,
    scenario: Scenario,
    modes: Vec<ShareMode>,
    pace: Pace,
    seconds: f64,
    tx: Sender<Action>,
) {
    let stop = sources.stop.clone();
    let failed = tx.clone();
    sources.spawn("simulator", failed, move || {
        let mut all = Vec::new();
        for (i, mode) in modes.iter().enumerate() {
            let vm = 1000 + i as u64;
            match run_mode(&scenario, *mode, vm, RunOptions::default()) {
                Ok(run) => {
                    let _ = tx.send(Action::VmName(vm, format!("sim {}", mode.name())));
                    all.extend(run.events);
                }
                Err(e) => {
                    // The whole chain: the step alone does not say why.
                    let mut why = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        why += &format!(": {s}");
                        src = s.source();
                    }
                    let _ = tx.send(Action::Failed(format!("simulation in {mode}: {why}")));
                }
            }
        }
        all.sort_by_key(|e| e.ts_ns);
        let span = all.last().map_or(1, |e| e.ts_ns.max(1));
        // Watched live, a simulated boot of a fraction of a second is stretched over the
        // playback so that rates and sparklines show its course; headless keeps its own time.
        let pace = match pace {
            Pace::Speed(_) => {
                let scale = seconds.max(0.1) * 1e9 / span as f64;
                for e in &mut all {
                    e.ts_ns = (e.ts_ns as f64 * scale) as u64;
                }
                let _ = tx.send(Action::Note(format!(
                    "simulated time is stretched {scale:.0}x to play over {seconds} s"
                )));
                Pace::Speed(1.0)
            }
            other => other,
        };
        let total = all.len().max(1) as f64;
        pace_and_send(all.into_iter(), pace, &tx, &stop, None, &|sent| {
            sent as f64 / total
        });
        let _ = tx.send(Action::Note(format!(
            "simulation of {} finished",
            scenario.name
        )));
    });
}

/// Is this process root (the probes need CAP_BPF and CAP_PERFMON)?
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Watches the live kernel through the probes; `gate` (a guest waiting to start) is opened once
/// the probes are attached.
pub fn live(
    sources: &mut Sources,
    pid: Option<u32>,
    gate: Option<std::process::ChildStdin>,
    tx: Sender<Action>,
) {
    if !is_root() {
        let _ = tx.send(Action::Note(
            "not root: the live probes need CAP_BPF and CAP_PERFMON; run as root, or use \
             --replay FILE or --simulate SCENARIO"
                .into(),
        ));
    }
    let stop = sources.stop.clone();
    let failed = tx.clone();
    sources.spawn("live", failed, move || {
        let mut session = Session::start(&LoadOptions {
            pid,
            ..LoadOptions::default()
        });
        let rows: Vec<ProbeRow> = session
            .statuses
            .iter()
            .map(|s| ProbeRow {
                tracepoint: format!("{}:{}", s.probe.system, s.probe.event),
                path: tdpshare_probes::catalog::seed_path(s.probe.watches)
                    .name()
                    .to_owned(),
                state: s.state.to_string(),
            })
            .collect();
        let _ = tx.send(Action::Probes(rows));
        if pid.is_some() && gate.is_none() {
            let _ = tx.send(Action::Note(
                "memslots the VM added before the probes attached are not known (the memslot \
                 list shows later changes only)"
                    .into(),
            ));
        }
        if let Some(mut gate) = gate {
            use std::io::Write;
            let _ = gate.write_all(b"go\n");
        }
        for n in &session.notes {
            let _ = tx.send(Action::Note(n.clone()));
        }
        if session.attached() == 0 {
            let _ = tx.send(Action::Failed(
                "no probe attached: nothing live to show (the Probes view says why)".into(),
            ));
            return;
        }
        let start = tdpshare_probes::loader::monotonic_ns();
        let mut namer = tdpshare_probes::vmm::Namer::default();
        let mut events = Vec::new();
        let mut last_tick = Instant::now();
        let mut watching = true;
        while watching && !stop.load(Ordering::Relaxed) {
            // The one VMM watched has exited: read what it left, then stop.
            if let Some(p) = pid
                && !tdpshare_probes::vmm::running(p)
            {
                let _ = tx.send(Action::Note(format!(
                    "the VMM (pid {p}) exited: nothing more to watch live"
                )));
                watching = false;
            }
            session.poll(&mut events);
            for e in events.drain(..) {
                // Named as the recorder names it, so a replay shows what the live view did.
                if let Some(named) = namer.first(&e, tdpshare_probes::vmm::name) {
                    let _ = tx.send(Action::Event(named));
                }
                if tx.send(Action::Event(e)).is_err() {
                    return;
                }
            }
            if last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                let now = tdpshare_probes::loader::monotonic_ns().saturating_sub(start);
                let _ = tx.send(Action::Tick(tdpshare::Source::Live, now));
                let _ = tx.send(Action::Drops(session.counters().drops));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// Starts a SeaBIOS guest under QEMU/KVM (ended with sharetop), gated so that the probes can
/// be filtered to its pid before its first ioctl; returns its pid and the gate to open.
pub fn start_guest(sources: &mut Sources) -> Option<(u32, std::process::ChildStdin)> {
    let mut child = Command::new("sh")
        .args([
            "-c",
            "read go; exec qemu-system-x86_64 -name guest=sharetop-demo -enable-kvm -m 1G \
             -nographic -nodefaults -display none",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let gate = child.stdin.take()?;
    let pid = child.id();
    sources.children.push(child);
    Some((pid, gate))
}

/// Why the demo cannot run a live guest here, if it cannot.
pub fn live_guest_unavailable() -> Option<String> {
    if !is_root() {
        return Some("not root".into());
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        return Some("no /dev/kvm".into());
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Some("qemu-system-x86_64 is not installed".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passed_deadline_means_no_sleep() {
        // The pacing loop checked `elapsed < due`, then time moved on past `due`.
        assert_eq!(
            nap(Duration::from_millis(10), Duration::from_millis(11)),
            Duration::ZERO
        );
        assert_eq!(
            nap(Duration::from_secs(5), Duration::from_secs(1)),
            Duration::from_millis(50)
        );
        assert_eq!(
            nap(Duration::from_millis(30), Duration::from_millis(10)),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn a_worker_panic_is_a_failure_not_a_crash() {
        install_panic_hook();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut s = Sources::new();
        s.spawn("test", tx, || panic!("boom in the worker"));
        s.shutdown();
        let got: Vec<Action> = rx.try_iter().collect();
        assert!(
            got.iter().any(|a| matches!(a, Action::Failed(m)
                if m.contains("the test source crashed: boom in the worker"))),
            "{got:?}"
        );
    }

    #[test]
    fn a_replay_and_a_simulation_report_their_progress_to_the_end() {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/traces/live-seabios-qemu-512m.jsonl"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let mut s = Sources::new();
        replay(&mut s, fixture.into(), Pace::Unpaced, false, tx).unwrap();
        while !s.finished() {
            std::thread::sleep(Duration::from_millis(5));
        }
        s.shutdown();
        let progress: Vec<f64> = rx
            .try_iter()
            .filter_map(|a| match a {
                Action::Progress(tdpshare::Source::Live, p) => Some(p),
                _ => None,
            })
            .collect();
        assert!(progress.len() >= 2, "{progress:?}");
        assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
        assert_eq!(progress.last(), Some(&1.0));

        let scenario = Scenario::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../kmod/scenarios/refused.toml"
        )))
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut s = Sources::new();
        simulate(
            &mut s,
            scenario,
            vec![ShareMode::PinPrepopulate],
            Pace::Unpaced,
            1.0,
            tx,
        );
        while !s.finished() {
            std::thread::sleep(Duration::from_millis(5));
        }
        s.shutdown();
        let last = rx
            .try_iter()
            .filter_map(|a| match a {
                Action::Progress(_, p) => Some(p),
                _ => None,
            })
            .last();
        assert_eq!(last, Some(1.0));
    }

    #[test]
    fn shutdown_releases_a_stepped_replay() {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/traces/live-seabios-qemu-512m.jsonl"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let mut s = Sources::new();
        replay(&mut s, fixture.into(), Pace::Step, false, tx).unwrap();
        for _ in 0..3 {
            s.step.as_ref().unwrap().send(()).unwrap();
        }
        // Joins the worker, which waits for a fourth step: it must return.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            s.shutdown();
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "shutdown hung on the stepped replay"
        );
        drop(rx);
    }
}
