//! `tdpshare-probe` as scripts and systemd use it: its exit code tells.

use std::process::Command;

/// Runs `bin args` as user nobody (root drops to it with `setpriv`); `None` when this process
/// cannot (not root, or no setpriv).
fn as_nobody(bin: &str, args: &[&str]) -> Option<std::process::Output> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", bin])
        .args(args)
        .output()
        .ok()
}

#[test]
fn status_with_no_probe_attached_fails() {
    let Some(out) = as_nobody(env!("CARGO_BIN_EXE_tdpshare-probe"), &["status"]) else {
        println!("skipped: needs root (to drop to nobody) and setpriv");
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("0 of "), "{stdout}");
    // Unreadable tracefs is a denial, not "absent": sys_enter_ioctl exists on every kernel.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("syscalls:sys_enter_ioctl") && l.contains("denied")),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("no probe attached"), "{stderr}");
}

/// Starts `tdpshare-probe record -o OUT` as root; `None` (skipped) otherwise.
fn start_recording(out: &std::path::Path) -> Option<std::process::Child> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: recording needs root");
        return None;
    }
    let child = Command::new(env!("CARGO_BIN_EXE_tdpshare-probe"))
        .arg("record")
        .arg("-o")
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Attaching takes a moment; the recording has begun once the .partial file exists.
    let partial = out.with_extension("jsonl.partial");
    let start = std::time::Instant::now();
    while !partial.exists() && start.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Some(child)
}

fn signal(child: &std::process::Child, sig: libc::c_int) {
    // SAFETY: kill on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("tdpshare-probe-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn header_of(path: &std::path::Path) -> tdpshare::Header {
    tdpshare::TraceReader::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .header()
        .clone()
}

#[test]
fn sigterm_finishes_the_recording() {
    let dir = scratch("term");
    let out = dir.join("rec.jsonl");
    let Some(child) = start_recording(&out) else {
        return;
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    signal(&child, libc::SIGTERM);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(header_of(&out).format, "tdpshare-trace");
    assert!(!out.with_extension("jsonl.partial").exists());
}

#[test]
fn sighup_starts_a_new_segment() {
    let dir = scratch("hup");
    let out = dir.join("rec.jsonl");
    let Some(child) = start_recording(&out) else {
        return;
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    signal(&child, libc::SIGHUP);
    let second = dir.join("rec-1.jsonl");
    let start = std::time::Instant::now();
    while !out.exists() && start.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    signal(&child, libc::SIGTERM);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (header_of(&out), header_of(&second));
    assert!(b.start_unix_ns > a.start_unix_ns);
}

#[test]
fn a_killed_recorder_leaves_what_it_flushed() {
    let dir = scratch("kill");
    let out = dir.join("rec.jsonl");
    let Some(mut child) = start_recording(&out) else {
        return;
    };
    std::thread::sleep(tdpshare_probes::record::FLUSH_EVERY * 2);
    signal(&child, libc::SIGKILL);
    let _ = child.wait();
    // No chance to finish: the partial file holds at least the header, readable.
    let partial = out.with_extension("jsonl.partial");
    assert_eq!(header_of(&partial).format, "tdpshare-trace");
}
