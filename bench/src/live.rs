//! Tier 1, live: real VMs booted by QEMU on this host, timed from QEMU's start to a marker the
//! guest prints.
//!
//! A Linux guest (a kernel and a busybox initramfs whose init prints [`LINUX_MARKER`] and powers
//! off) boots under KVM where the host's KVM can boot Linux, under TCG otherwise — every case
//! names its accelerator. The firmware phase (SeaBIOS to "No bootable device") runs under the
//! host's KVM when there is one: it makes the real memslot sequence and root zaps, so the probes
//! count them, and it is the boot the probes' overhead is measured on — against `perf stat` and
//! `bpftrace` on the same tracepoints where those are installed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tdpshare::{TraceReader, VmStats};

/// What the guest's init prints once the kernel handed over to userspace.
pub const LINUX_MARKER: &str = "TDPSHARE-BENCH: up";
/// What SeaBIOS prints on its debug port when it ran out of boot devices.
pub const FIRMWARE_MARKER: &str = "No bootable device";
/// Set by SIGINT: every wait gives up, every child is killed, the report says it is partial.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// How the guest's memory is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    /// QEMU as is.
    Base,
    /// `-overcommit mem-lock=on`: QEMU locks (and so faults in) all guest memory — the
    /// userspace half of pinning for DMA.
    Pinned,
}

impl Config {
    pub fn name(self) -> &'static str {
        match self {
            Config::Base => "base",
            Config::Pinned => "pinned",
        }
    }
}

/// The host's transparent huge pages (`/sys/kernel/mm/transparent_hugepage/enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thp {
    /// QEMU's guest RAM may use huge pages (it asks with MADV_HUGEPAGE).
    On,
    /// `never`: 4 KiB host pages only.
    Off,
}

impl Thp {
    pub fn name(self) -> &'static str {
        match self {
            Thp::On => "thp",
            Thp::Off => "4k",
        }
    }
}

const THP_PATH: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// The THP setting now (the bracketed word), `None` when the host has none.
pub fn thp_setting() -> Option<String> {
    let text = std::fs::read_to_string(THP_PATH).ok()?;
    let start = text.find('[')?;
    let end = text[start..].find(']')?;
    Some(text[start + 1..start + end].to_owned())
}

/// Sets THP for the runs and puts the host's setting back when dropped.
#[derive(Debug)]
pub struct ThpGuard {
    original: String,
}

impl ThpGuard {
    /// `None` when THP cannot be changed here (no THP, not root): the 4 KiB cases are skipped.
    pub fn new() -> Option<ThpGuard> {
        let original = thp_setting()?;
        std::fs::write(THP_PATH, &original).ok()?;
        Some(ThpGuard { original })
    }

    pub fn set(&self, thp: Thp) -> anyhow::Result<()> {
        let value = match thp {
            Thp::On if self.original == "never" => "madvise",
            Thp::On => self.original.as_str(),
            Thp::Off => "never",
        };
        std::fs::write(THP_PATH, value).with_context(|| format!("writing {value} to {THP_PATH}"))
    }
}

impl Drop for ThpGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(THP_PATH, &self.original);
    }
}

/// A child that is killed and reaped when dropped (an error, Ctrl-C): no QEMU outlives a run.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl Reaped {
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: signalling a child this process started and has not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGINT (a recorder finishes its output), then wait up to `grace`.
    pub fn interrupt(&mut self, grace: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let pid = libc::pid_t::try_from(self.0.id())?;
        // SAFETY: as in `terminate`.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.0.kill()?;
        Ok(self.0.wait()?)
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The guest: kernel and initramfs.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Lines of `child`'s stdout and stderr, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let streams: Vec<Box<dyn std::io::Read + Send>> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    for s in streams {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Boots the Linux guest once; seconds from QEMU's start to the marker.
pub fn boot_linux(
    guest: &Guest,
    mem_mib: u64,
    config: Config,
    kvm: bool,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let mut qemu = Command::new("qemu-system-x86_64");
    if kvm {
        qemu.args(["-enable-kvm", "-cpu", "host"]);
    } else {
        qemu.args(["-accel", "tcg"]);
    }
    qemu.args(["-m", &format!("{mem_mib}M"), "-smp", "1"])
        .args([
            "-nographic",
            "-nodefaults",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"]);
    if config == Config::Pinned {
        qemu.args(["-overcommit", "mem-lock=on"]);
    }
    qemu.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = Reaped(qemu.spawn().context("starting qemu-system-x86_64")?);
    let rx = lines_of(&mut child.0);
    let mut tail = Vec::new();
    loop {
        check_interrupt()?;
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) if line.contains(LINUX_MARKER) => break,
            Ok(line) => {
                tail.push(line);
                if tail.len() > 8 {
                    tail.remove(0);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.0.wait()?;
                bail!(
                    "QEMU ended ({status}) before the guest's marker; last lines:\n{}",
                    tail.join("\n")
                );
            }
        }
        if start.elapsed() > timeout {
            bail!(
                "no marker within {} s; last lines:\n{}",
                timeout.as_secs(),
                tail.join("\n")
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    // The init powers off; give it a moment, then make sure.
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end && matches!(child.0.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.terminate(Duration::from_secs(5));
    Ok(secs)
}

/// A tool that counts the same events while the firmware boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watcher {
    None,
    /// tdpshare's own recorder (`tdpshare-probe record`).
    Probes,
    /// `perf stat -a -e 'kvmmmu:*'`.
    PerfStat,
    /// `bpftrace` counting `tracepoint:kvmmmu:*`.
    Bpftrace,
}

impl Watcher {
    pub fn name(self) -> &'static str {
        match self {
            Watcher::None => "none",
            Watcher::Probes => "tdpshare probes",
            Watcher::PerfStat => "perf stat",
            Watcher::Bpftrace => "bpftrace",
        }
    }
}

/// What one firmware boot gave.
#[derive(Debug, Default)]
pub struct FirmwareRun {
    /// Seconds from QEMU's start to SeaBIOS's marker.
    pub secs: f64,
    /// The probes' counts for the VM (with [`Watcher::Probes`]).
    pub stats: Option<VmStats>,
    /// Records the probes' kernel ring could not take.
    pub dropped: Option<u64>,
}

/// Starts `watcher` and waits until it is attached.
fn start_watcher(
    watcher: Watcher,
    recorder: Option<&Path>,
    dir: &Path,
) -> anyhow::Result<Option<Reaped>> {
    let (mut cmd, ready): (Command, &str) = match watcher {
        Watcher::None => return Ok(None),
        Watcher::Probes => {
            let program = recorder.context("no recorder given (--recorder)")?;
            let mut c = Command::new(program);
            c.arg("record").arg("-o").arg(dir.join("trace.jsonl"));
            (c, "recording with")
        }
        Watcher::PerfStat => {
            // System-wide with no workload: it counts until SIGINT, then writes its file.
            let mut c = Command::new("perf");
            c.args(["stat", "-a", "-e", "kvmmmu:*", "-x", ",", "-o"])
                .arg(dir.join("perf.txt"));
            (c, "")
        }
        Watcher::Bpftrace => {
            let mut c = Command::new("bpftrace");
            c.args(["-e", "tracepoint:kvmmmu:* { @[probe] = count(); }"]);
            (c, "Attaching")
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Reaped(
        cmd.spawn()
            .with_context(|| format!("starting {}", watcher.name()))?,
    );
    let rx = lines_of(&mut child.0);
    if ready.is_empty() {
        // perf stat prints nothing when it starts: give it time to open its events.
        std::thread::sleep(Duration::from_secs(2));
    } else {
        let start = Instant::now();
        loop {
            check_interrupt()?;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.contains(ready) => break,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("{} ended before it attached", watcher.name())
                }
            }
            ensure!(
                start.elapsed() < Duration::from_secs(120),
                "{} did not attach within 120 s",
                watcher.name()
            );
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in rx {});
    Ok(Some(child))
}

/// Boots SeaBIOS under the host's KVM (no boot device) while `watcher` counts.
pub fn boot_firmware(
    mem_mib: u64,
    config: Config,
    watcher: Watcher,
    recorder: Option<&Path>,
    dir: &Path,
) -> anyhow::Result<FirmwareRun> {
    std::fs::create_dir_all(dir)?;
    let console = dir.join("debugcon.txt");
    let _ = std::fs::remove_file(&console);
    let mut watching = start_watcher(watcher, recorder, dir)?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-enable-kvm",
        "-machine",
        "q35",
        "-m",
        &format!("{mem_mib}M"),
    ])
    .args(["-nographic", "-nodefaults", "-no-reboot", "-chardev"])
    .arg(format!("file,id=dbg,path={}", console.display()))
    .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg"]);
    if config == Config::Pinned {
        qemu.args(["-overcommit", "mem-lock=on"]);
    }
    qemu.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = Reaped(qemu.spawn().context("starting qemu-system-x86_64")?);
    let vm = child.id();
    let secs = loop {
        check_interrupt()?;
        let seen = std::fs::read(&console)
            .map(|b| String::from_utf8_lossy(&b).contains(FIRMWARE_MARKER))
            .unwrap_or(false);
        if seen {
            break start.elapsed().as_secs_f64();
        }
        if let Some(status) = child.0.try_wait()? {
            bail!("QEMU ended ({status}) before SeaBIOS's marker");
        }
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "SeaBIOS did not reach its marker within 120 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    child.terminate(Duration::from_secs(5));
    let mut run = FirmwareRun {
        secs,
        ..FirmwareRun::default()
    };
    if let Some(mut w) = watching.take() {
        let status = w.interrupt(Duration::from_secs(60))?;
        if watcher == Watcher::Probes {
            ensure!(status.success(), "the recorder failed ({status})");
            let mut stats = VmStats::default();
            let trace = dir.join("trace.jsonl");
            for e in
                TraceReader::open(&trace).with_context(|| format!("reading {}", trace.display()))?
            {
                let e = e.with_context(|| format!("reading {}", trace.display()))?;
                if e.vm == u64::from(vm) {
                    stats.record(&e);
                }
            }
            run.stats = Some(stats);
        }
    }
    Ok(run)
}

/// Whether a program runs here (`cmd --version` succeeds).
pub fn installed(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the host's KVM is usable.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Whether the running kernel carries the series (its tracepoints exist).
pub fn series_in_running_kernel() -> bool {
    [
        "/sys/kernel/tracing/events/tdpshare",
        "/sys/kernel/debug/tracing/events/tdpshare",
    ]
    .iter()
    .any(|p| Path::new(p).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thp_setting_is_the_bracketed_word() {
        // The parser, on the format the kernel prints.
        let text = "always [madvise] never\n";
        let start = text.find('[').unwrap();
        let end = text[start..].find(']').unwrap();
        assert_eq!(&text[start + 1..start + end], "madvise");
        if let Some(s) = thp_setting() {
            assert!(["always", "madvise", "never"].contains(&s.as_str()), "{s}");
        }
    }

    #[test]
    fn a_reaped_child_does_not_outlive_its_guard() {
        let child = Command::new("sleep").arg("60").spawn().unwrap();
        let pid = child.id();
        drop(Reaped(child));
        // The pid is gone (reaped): signal 0 fails.
        // SAFETY: probing a pid with signal 0 sends nothing.
        let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
        assert!(!alive);
    }
}
