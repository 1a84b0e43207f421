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
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("no probe attached"), "{stderr}");
}
