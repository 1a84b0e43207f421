//! `cargo xtask`: the project's own tasks.
//!
//! - `setup`: installs what this project needs on a fresh Debian 12 machine (idempotent: it
//!   prints what it installs and skips what is present).
//! - `test`: every test (the concurrency stress test in release mode), plus the check that
//!   keeps the kernel-side crate kernel-buildable.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "tdpshare project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the toolchain pieces and packages the project needs (idempotent).
    Setup,
    /// Run every test of the workspace and the kernel-buildability checks.
    Test,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Runs `cmd`, failing with its command line when it fails.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = format!("{cmd:?}");
    println!("+ {line}");
    let status = cmd.status().with_context(|| format!("starting {line}"))?;
    ensure!(status.success(), "{line} failed with {status}");
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {line}"))?;
    ensure!(
        out.status.success(),
        "{line} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Rustup components of the active toolchain the checks use.
const COMPONENTS: [&str; 2] = ["rustfmt", "clippy"];

fn setup() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed"]))
        .context("rustup is needed to manage the toolchain")?;
    for component in COMPONENTS {
        if installed.lines().any(|l| l.starts_with(component)) {
            println!("present: rustup component {component}");
        } else {
            println!("installing: rustup component {component}");
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}

/// The kernel-side crate must build with no dependency in its default (`no_std`) build.
fn check_kmod_default_build() -> anyhow::Result<()> {
    let tree = output(
        Command::new(env!("CARGO"))
            .current_dir(root())
            .args(["tree", "-p", "tdpshare", "-e", "normal", "--prefix", "none"])
            .args(["--no-default-features"]),
    )?;
    let deps: Vec<&str> = tree.lines().skip(1).filter(|l| !l.is_empty()).collect();
    if !deps.is_empty() {
        bail!(
            "tdpshare's default build must have no dependency (it is linked into kernels), found: {}",
            deps.join(", ")
        );
    }
    println!("ok: tdpshare default build has no dependency");
    run(Command::new(env!("CARGO")).current_dir(root()).args([
        "build",
        "-p",
        "tdpshare",
        "--no-default-features",
    ]))?;
    Ok(())
}

/// Totals over the `test result:` lines of one or more `cargo test` runs.
#[derive(Debug, Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds `test result: ok. 12 passed; 0 failed; 1 ignored; ...`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().skip_while(|w| w.ends_with('.'));
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs `cargo test ARGS`, echoing its output and adding its results to `totals`.
fn cargo_test(args: &[&str], totals: &mut Totals) -> anyhow::Result<bool> {
    use std::io::{BufRead, BufReader};
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root())
        .arg("test")
        .args(args)
        .stdout(std::process::Stdio::piped());
    println!("+ {cmd:?}");
    let mut child = cmd.spawn().context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        totals.add_line(&line);
    }
    Ok(child.wait().context("waiting for cargo test")?.success())
}

fn test() -> anyhow::Result<()> {
    check_kmod_default_build()?;
    let mut totals = Totals::default();
    let units = cargo_test(
        &["--workspace", "--all-features", "--all-targets"],
        &mut totals,
    )?;
    // Doc tests are not part of --all-targets.
    let docs = cargo_test(&["--workspace", "--all-features", "--doc"], &mut totals)?;
    // The concurrency proof at full size: ten million DMA translations, in release mode.
    let stress = cargo_test(
        &[
            "--release",
            "-p",
            "tdpshare",
            "--features",
            "std",
            "--test",
            "concurrency",
            "--",
            "--ignored",
            "--nocapture",
        ],
        &mut totals,
    )?;
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    ensure!(units && docs && stress, "some tests failed");
    ensure!(totals.passed > 0, "no test ran");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Test => test(),
    }
}
