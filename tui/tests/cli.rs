//! The binary: its --help, headless output, clear errors, and one PTY smoke test of the TUI.

use std::process::Command;
use std::time::{Duration, Instant};

fn sharetop() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sharetop"))
}

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fixtures/traces/live-seabios-qemu-512m.jsonl"
);

#[test]
fn help() {
    let out = sharetop().arg("--help").output().unwrap();
    assert!(out.status.success());
    insta::assert_snapshot!(String::from_utf8_lossy(&out.stdout));
}

#[test]
fn once_prints_the_same_fields_in_every_format() {
    let run = |format: &str| {
        let out = sharetop()
            .args(["--replay", FIXTURE, "--once", "--format", format])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let csv = run("csv");
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let json: serde_json::Value = serde_json::from_str(&run("json")).unwrap();
    let row = json[0].as_object().unwrap();
    assert_eq!(header.len(), row.len());
    assert!(header.iter().all(|h| row.contains_key(*h)));
    assert_eq!(row["memslot_ops"], 30);
    assert_eq!(row["fast_zaps"], 12);
    let table = run("table");
    assert!(table.lines().next().unwrap().contains("memslot_ops"));
}

#[test]
fn bad_input_gets_a_clear_error() {
    let out = sharetop()
        .args(["--replay", "/nonexistent.jsonl", "--once"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open trace /nonexistent.jsonl"),
        "{err}"
    );
    let out = sharetop()
        .args(["--replay", FIXTURE, "--once", "--sort", "nope"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no column \"nope\"; columns are vm, name"),
        "{err}"
    );
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(session: &str, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let screen = tmux(&["capture-pane", "-p", "-t", session]);
        if screen.contains(needle) || start.elapsed() > Duration::from_secs(15) {
            return screen;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// sharetop with `args` running in a detached tmux session of `width`×30, its exit code written
/// to a file when it ends: `None` (skipped) without tmux.
struct Pty {
    session: String,
    done: std::path::PathBuf,
}

impl Pty {
    fn start(name: &str, args: &str, width: u16) -> Option<Pty> {
        if Command::new("tmux").arg("-V").output().is_err() {
            println!("skipped: tmux is not installed");
            return None;
        }
        let session = format!("sharetop-{name}-{}", std::process::id());
        let done = std::env::temp_dir().join(format!("{session}.exit"));
        let _ = std::fs::remove_file(&done);
        let cmd = format!(
            "{} {args}; echo $? > {}; sleep 30",
            env!("CARGO_BIN_EXE_sharetop"),
            done.display()
        );
        tmux(&["-L", &session, "kill-server"]);
        let width = width.to_string();
        let ok = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                &session,
                "-x",
                &width,
                "-y",
                "30",
                &cmd,
            ])
            .status()
            .unwrap();
        assert!(ok.success());
        Some(Pty { session, done })
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend(keys);
        tmux(&args);
    }

    /// The exit code once sharetop has ended (waiting up to 10 s; empty if it has not), and the
    /// screen after it.
    fn exit(&self) -> (String, String) {
        let start = Instant::now();
        while !self.done.exists() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let code = std::fs::read_to_string(&self.done).unwrap_or_default();
        let after = tmux(&["capture-pane", "-p", "-t", &self.session]);
        (code.trim().to_owned(), after)
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        tmux(&["kill-session", "-t", &self.session]);
        let _ = std::fs::remove_file(&self.done);
    }
}

/// The real binary in a real terminal (tmux): start a replay, press keys, quit cleanly.
#[test]
fn pty_smoke_test() {
    let Some(pty) = Pty::start("smoke", &format!("--replay {FIXTURE} --speed 1000"), 100) else {
        return;
    };
    let session = pty.session.as_str();
    let screen = wait_for(session, "17765");
    assert!(
        screen.contains("Overview") && screen.contains("17765"),
        "{screen}"
    );
    pty.keys(&["Enter"]);
    let screen = wait_for(session, "memslots (");
    assert!(screen.contains("VM 17765"), "{screen}");
    pty.keys(&["/", "f", "a", "s", "t", "Enter"]);
    let screen = wait_for(session, "/fast/");
    assert!(screen.contains("fast_zap"), "{screen}");
    pty.keys(&["?"]);
    assert!(wait_for(session, " keys ").contains("quit"));
    pty.keys(&["Escape", "q"]);
    let (code, after) = pty.exit();
    assert_eq!(code, "0", "sharetop did not exit cleanly");
    // The terminal was restored: the alternate screen is gone.
    assert!(!after.contains("Overview"), "{after}");
}

/// `--replay --step` in a real terminal: each `n` plays one event, and `q` quits at once
/// (it hung: the worker was joined while it still waited for its next step).
#[test]
fn pty_step_plays_one_event_per_key_and_quits() {
    let Some(pty) = Pty::start("step", &format!("--replay {FIXTURE} --step"), 120) else {
        return;
    };
    let screen = wait_for(&pty.session, "0 events");
    assert!(screen.contains("0 VMs, 0 events"), "{screen}");
    for n in 1..=3 {
        pty.keys(&["n"]);
        let want = format!("1 VMs, {n} events");
        let screen = wait_for(&pty.session, &want);
        assert!(screen.contains(&want), "after {n} steps: {screen}");
    }
    pty.keys(&["q"]);
    assert_eq!(pty.exit().0, "0", "sharetop --step did not quit on q");
}

#[test]
fn a_mode_has_one_spelling_and_the_dashed_alias() {
    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../kmod/scenarios/refused.toml"
    );
    for spelling in ["separate_table", "separate-table"] {
        let out = sharetop()
            .args(["--simulate", scenario, "--mode", spelling, "--once"])
            .args(["--format", "csv", "--sim-seconds", "0.1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{spelling}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("separate_table"));
    }
    let out = sharetop()
        .args(["--simulate", scenario, "--mode", "separate", "--once"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pin_prepopulate"));
}

fn scratch_trace(name: &str, extra: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sharetop-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(FIXTURE).unwrap();
    let mut lines: Vec<&str> = text.lines().take(21).collect();
    lines.push(extra);
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn a_bad_trace_is_a_failure_not_a_partial_result() {
    // Line 22 cut short (no newline at the end of the file), then a foreign event type.
    let cut = scratch_trace("cut.jsonl", "{\"ts_ns\":1,\"vm\":17765,\"source\":\"live\"");
    let out = sharetop()
        .args(["--replay"])
        .arg(&cut)
        .args(["--once", "--format", "csv"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sharetop: replay of") && err.contains("line 22"),
        "{err}"
    );
    let unknown = scratch_trace(
        "unknown.jsonl",
        "{\"ts_ns\":1,\"vm\":17765,\"source\":\"live\",\"kind\":{\"type\":\"warp_drive\"}}\n",
    );
    let out = sharetop()
        .args(["--replay"])
        .arg(&unknown)
        .args(["--once"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warp_drive") && err.contains("--skip-unknown"),
        "{err}"
    );
    let out = sharetop()
        .args(["--replay"])
        .arg(&unknown)
        .args(["--once", "--skip-unknown"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("1 events of types this build does not know were skipped")
    );
}

#[test]
fn a_failed_simulation_says_why_and_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("sharetop-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Two slots overlapping: the second add fails in the engine, not in the scenario's checks.
    let scenario = dir.join("bad.toml");
    std::fs::write(
        &scenario,
        "name = \"bad\"\n\
         [[timeline]]\nat_us = 0\ndo = \"memslot_add\"\nslot = 0\nas_id = 0\ngpa = 0x0\n\
         size = 0x200000\nhpa = 0x7f0000000000\n\
         [[timeline]]\nat_us = 1\ndo = \"memslot_add\"\nslot = 1\nas_id = 0\n\
         gpa = 0x100000\nsize = 0x200000\nhpa = 0x7f1000000000\n",
    )
    .unwrap();
    let out = sharetop()
        .args(["--simulate"])
        .arg(&scenario)
        .args(["--mode", "pin_prepopulate", "--once"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("sharetop: simulation in pin_prepopulate:"),
        "{err}"
    );
    // The cause, not only the step.
    assert!(err.contains("memslot 1 overlaps memslot 0"), "{err}");
}

#[test]
fn live_once_without_the_probes_fails() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: needs root to drop to nobody");
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_sharetop"))
        .arg("--once")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sharetop: no probe attached"), "{err}");
}

#[test]
fn bad_flags_are_usage_errors() {
    for args in [
        &["--interval", "inf"][..],
        &["--interval=-1"],
        &["--interval", "NaN"],
        &["--interval", "0"],
        &["--interval", "1", "--count", "0"],
        &["--count", "3"],
        &["--speed", "0"],
        &["--speed=-2"],
        &["--sim-seconds", "inf"],
        &["--pid", "0"],
        &["--pid", "4194304"],
        &["record", "-o", "/tmp/never.jsonl", "--duration=-1"],
        &["record", "-o", "/tmp/never.jsonl", "--duration", "NaN"],
    ] {
        let mut cmd = sharetop();
        cmd.args(args);
        // `record` takes no --replay.
        if args[0] != "record" {
            cmd.args(["--replay", FIXTURE]);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn the_view_without_a_terminal_says_so() {
    let out = sharetop()
        .args(["--replay", FIXTURE])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs a terminal") && err.contains("--once"),
        "{err}"
    );
    // No stray escape sequence.
    assert!(!err.contains('\x1b'), "{err:?}");
}

#[test]
fn a_mode_given_twice_is_one_vm() {
    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../kmod/scenarios/refused.toml"
    );
    let out = sharetop()
        .args(["--simulate", scenario, "--once", "--format", "csv"])
        .args([
            "--mode",
            "optimized",
            "--mode",
            "optimized",
            "--mode",
            "pin-prepopulate",
        ])
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&out.stdout);
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert_eq!(csv.matches("sim optimized").count(), 1, "{csv}");
}

#[test]
fn completions_and_the_man_page_match_the_flags() {
    for (shell, marker) in [
        ("bash", "_sharetop()"),
        ("zsh", "#compdef sharetop"),
        ("fish", "complete -c sharetop"),
    ] {
        let out = sharetop().args(["completions", shell]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        // Each shell spells the flags its way (fish: `-l replay`).
        assert!(
            text.contains(marker) && text.contains("replay") && text.contains("interval"),
            "{shell}"
        );
    }
    let out = sharetop().arg("manpage").output().unwrap();
    assert!(out.status.success());
    let roff = String::from_utf8_lossy(&out.stdout);
    assert!(
        roff.contains(".TH sharetop 1") && roff.contains("\\-\\-sim\\-seconds"),
        "{roff}"
    );
}
