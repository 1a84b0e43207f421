//! A real VMM's boot, recorded: `tdpshare-lab record -- CMD...` runs a VMM (Debian's QEMU with
//! `-enable-kvm`, from `cargo xtask lab record-boot`) under the probes until a marker appears in
//! a file it writes (its serial console, SeaBIOS's debug port), and retries a boot that never
//! shows the marker: about one nested L2 boot in nine dies silently under TCG.
//!
//! The probes record every process (the VMM does not exist before the recording starts, and
//! it is the only user of KVM in the L1).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tdpshare::event::{Event, EventKind};

use super::recorder::{Recorder, Recording};

/// What `tdpshare-lab record` is given.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// The probes recorder (`tdpshare-probe`).
    pub recorder: PathBuf,
    /// Where the trace (`trace.jsonl`) and the summary (`summary.txt`) go.
    pub out: PathBuf,
    /// The file the VMM writes the marker to.
    pub watch: PathBuf,
    /// The text that shows the boot got where it should.
    pub marker: String,
    /// Terminate the VMM once the marker is seen (firmware that never powers off); else it is
    /// left to exit (a guest that powers off).
    pub stop_at_marker: bool,
    /// Boots tried before giving up.
    pub attempts: u32,
    /// One attempt's limit.
    pub timeout: Duration,
    /// The VMM's command line.
    pub command: Vec<String>,
}

/// After the marker, how long a guest may take to power off.
const EXIT_GRACE: Duration = Duration::from_secs(60);
/// How long the recorder may take to attach (loading eBPF under TCG takes seconds).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the marker file and the VMM are polled.
const POLL: Duration = Duration::from_millis(100);

/// How one attempt ended.
#[derive(Debug)]
struct Attempt {
    marker_at: Option<Duration>,
    wall: Duration,
    exit: String,
}

/// Records the VMM's boot; `Ok(summary)` once an attempt showed the marker.
pub fn record(opts: &RecordOptions) -> anyhow::Result<String> {
    ensure!(!opts.command.is_empty(), "no VMM command given");
    ensure!(opts.attempts > 0, "--attempts must be at least 1");
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let trace = opts.out.join("trace.jsonl");
    for n in 1..=opts.attempts {
        // A file from an earlier attempt must not show its marker again.
        match std::fs::remove_file(&opts.watch) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", opts.watch.display())),
        }
        let recorder = Recorder::start(&opts.recorder, &trace, None, ATTACH_TIMEOUT)?;
        println!("record: attempt {n}: {}", recorder.attached);
        let attempt = run_vmm(opts)?;
        let recording = recorder.stop()?;
        println!(
            "record: attempt {n}: {} after {:.1} s ({})",
            match attempt.marker_at {
                Some(t) => format!("marker at {:.1} s", t.as_secs_f64()),
                None => "no marker".to_owned(),
            },
            attempt.wall.as_secs_f64(),
            attempt.exit
        );
        if attempt.marker_at.is_some() {
            let text = summary(n, &attempt, &recording);
            std::fs::write(opts.out.join("summary.txt"), &text)
                .with_context(|| format!("writing {}", opts.out.display()))?;
            return Ok(text);
        }
    }
    bail!(
        "no attempt of {} showed {:?} in {} (the VMM's output is in {})",
        opts.attempts,
        opts.marker,
        opts.watch.display(),
        opts.out.join("vmm.log").display()
    )
}

/// One boot of the VMM: until it exits, or the marker (then it is stopped, or given
/// [`EXIT_GRACE`] to power off), or the timeout.
fn run_vmm(opts: &RecordOptions) -> anyhow::Result<Attempt> {
    let log_path = opts.out.join("vmm.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut child = Command::new(&opts.command[0])
        .args(&opts.command[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", opts.command[0]))?;
    let start = Instant::now();
    let mut marker_at = None;
    let exit = loop {
        if let Some(status) = child.try_wait()? {
            // The marker may have been written just before the exit.
            if marker_at.is_none() && marker_seen(opts) {
                marker_at = Some(start.elapsed());
            }
            break format!("exited: {status}");
        }
        if marker_at.is_none() && marker_seen(opts) {
            marker_at = Some(start.elapsed());
            if opts.stop_at_marker {
                break terminate(&mut child, "stopped at the marker")?;
            }
        }
        let limit = match marker_at {
            Some(t) => (t + EXIT_GRACE).min(opts.timeout),
            None => opts.timeout,
        };
        if start.elapsed() > limit {
            break terminate(&mut child, "timed out")?;
        }
        std::thread::sleep(POLL);
    };
    Ok(Attempt {
        marker_at,
        wall: start.elapsed(),
        exit,
    })
}

fn marker_seen(opts: &RecordOptions) -> bool {
    std::fs::read(&opts.watch)
        .map(|bytes| String::from_utf8_lossy(&bytes).contains(&opts.marker))
        .unwrap_or(false)
}

/// SIGTERM (QEMU closes down as on a quit), SIGKILL after 10 s.
fn terminate(child: &mut Child, why: &str) -> anyhow::Result<String> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: signalling the child this function's caller started and has not reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(format!("{why}: {status}"));
        }
        std::thread::sleep(POLL);
    }
    child.kill()?;
    let status = child.wait()?;
    Ok(format!("{why}, killed: {status}"))
}

/// The event counts of a recording, by type, and how the attempt went.
fn summary(attempt_no: u32, attempt: &Attempt, recording: &Recording) -> String {
    let mut counts = BTreeMap::<&str, u64>::new();
    let mut vms = std::collections::BTreeSet::new();
    for e in &recording.events {
        *counts.entry(kind_name(e)).or_default() += 1;
        vms.insert(e.vm);
    }
    let mut text = String::new();
    let _ = writeln!(
        text,
        "attempt {attempt_no}: marker at {:.1} s, {:.1} s wall, {}",
        attempt.marker_at.unwrap_or_default().as_secs_f64(),
        attempt.wall.as_secs_f64(),
        attempt.exit
    );
    let _ = writeln!(
        text,
        "{} events from {} VM(s), {} records dropped in the kernel",
        recording.events.len(),
        vms.len(),
        recording.drops
    );
    for (kind, n) in counts {
        let _ = writeln!(text, "  {kind:<22} {n}");
    }
    text
}

/// The event's name in trace files; SMM entries and exits, CR0 and CR4 writes apart.
fn kind_name(e: &Event) -> &'static str {
    match &e.kind {
        EventKind::SmmTransition { enter: true } => "smm_transition (enter)",
        EventKind::SmmTransition { enter: false } => "smm_transition (leave)",
        EventKind::CrWrite { cr: 0, .. } => "cr_write (cr0)",
        EventKind::CrWrite { .. } => "cr_write (cr4)",
        kind => kind.name(),
    }
}
