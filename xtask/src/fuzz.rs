//! `cargo xtask fuzz`: every parser of outside input under libFuzzer (cargo-fuzz, nightly,
//! AddressSanitizer, overflow checks), each for a bounded time, from the seeds in the tree.
//!
//! Seeds are read from where the tree keeps real inputs — the recorded traces, tracefs formats,
//! QEMU memslot traces and scenarios — plus `fuzz/seeds/` (the raw records, as hex). The
//! growing corpus, the build and any crash live in the cache (`$TDPSHARE_CACHE/fuzz`), never
//! in the clone. A crash fails the task and names the input that reproduces it
//! (`cargo +nightly fuzz run TARGET FILE`); it then belongs in a regression test.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail, ensure};

use crate::{kernel, root, run};

/// A fuzz target: its name, the tree's directories of seed inputs, and the largest input
/// libFuzzer makes (the seeds past it are cut).
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    seeds: &'static [&'static str],
    max_len: usize,
}

/// Every target (`fuzz/fuzz_targets/NAME.rs`).
pub const TARGETS: &[Target] = &[
    Target {
        name: "trace_reader",
        seeds: &["fixtures/traces", "fuzz/seeds/trace_reader"],
        max_len: 16 * 1024,
    },
    Target {
        name: "tracefs_format",
        seeds: &["fixtures/tracefs-6.18", "fixtures/tracefs-6.12-series"],
        max_len: 4 * 1024,
    },
    Target {
        name: "record_decoder",
        // fuzz/seeds/record_decoder.hex, written out as files by `hex_seeds`.
        seeds: &[],
        max_len: 1 + 24 * 104,
    },
    Target {
        name: "scenario",
        seeds: &["kmod/scenarios"],
        max_len: 16 * 1024,
    },
    Target {
        name: "qemu_import",
        seeds: &["fixtures/qemu-memslots"],
        max_len: 16 * 1024,
    },
];

/// What one target's run gave.
#[derive(Debug)]
struct Outcome {
    name: &'static str,
    seconds: u64,
    execs: Option<u64>,
    corpus: usize,
    crash: Option<PathBuf>,
}

/// The cargo-fuzz the targets are built with (installed by `cargo xtask setup`).
pub const CARGO_FUZZ: &str = "cargo-fuzz@0.13.2";

pub fn fuzz(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    ensure!(
        crate::has_command("cargo-fuzz", "--version"),
        "cargo-fuzz is missing: run `cargo xtask setup` (it installs {CARGO_FUZZ})"
    );
    let targets: Vec<Target> = if only.is_empty() {
        TARGETS.to_vec()
    } else {
        only.iter()
            .map(|n| {
                TARGETS
                    .iter()
                    .copied()
                    .find(|t| t.name == n)
                    .with_context(|| {
                        let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
                        format!("no fuzz target {n:?}; there are {}", names.join(", "))
                    })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let cache = kernel::cache_dir().join("fuzz");
    let target_dir = cache.join("target");
    let fuzz_dir = root().join("fuzz");
    run(Command::new("cargo")
        .current_dir(&fuzz_dir)
        .args(["+nightly", "fuzz", "build", "--target-dir"])
        .arg(&target_dir))?;

    let mut outcomes = Vec::new();
    for t in &targets {
        let corpus = cache.join("corpus").join(t.name);
        let artifacts = cache.join("artifacts").join(t.name);
        fs::create_dir_all(&corpus)?;
        fs::create_dir_all(&artifacts)?;
        let mut seed_dirs: Vec<PathBuf> = t
            .seeds
            .iter()
            .map(|d| root().join(d))
            .filter(|d| d.is_dir())
            .collect();
        let hex = root().join("fuzz/seeds").join(format!("{}.hex", t.name));
        if hex.exists() {
            let dir = cache.join("seeds").join(t.name);
            hex_seeds(&hex, &dir)?;
            seed_dirs.push(dir);
        }
        ensure!(!seed_dirs.is_empty(), "{}: no seeds in the tree", t.name);
        let log = cache.join(format!("{}.log", t.name));
        println!("fuzzing {} for {seconds} s (log {})", t.name, log.display());
        let started = Instant::now();
        let status = Command::new("cargo")
            .current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", "--target-dir"])
            .arg(&target_dir)
            .arg(t.name)
            .arg(&corpus)
            .args(&seed_dirs)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={}", t.max_len))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .args(["-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1"])
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::options().append(true).open(&log)?)
            .status()
            .context("starting cargo fuzz run")?;
        let text = fs::read_to_string(&log).unwrap_or_default();
        let crash = text
            .lines()
            .filter_map(|l| l.split_once("Test unit written to "))
            .map(|(_, p)| PathBuf::from(p.trim()))
            .next_back();
        ensure!(
            status.success() || crash.is_some(),
            "{}: cargo fuzz run failed with {status} and wrote no crash; see {}",
            t.name,
            log.display()
        );
        outcomes.push(Outcome {
            name: t.name,
            seconds: started.elapsed().as_secs(),
            execs: stat(&text, "stat::number_of_executed_units:"),
            corpus: fs::read_dir(&corpus).map_or(0, |d| d.count()),
            crash,
        });
    }

    let mut table = String::from("| target | seconds | executions | exec/s | corpus | result |\n");
    table += "|---|---:|---:|---:|---:|---|\n";
    for o in &outcomes {
        let execs = o.execs.map_or("?".into(), |e| e.to_string());
        let rate = o
            .execs
            .map_or("?".into(), |e| (e / o.seconds.max(1)).to_string());
        let result = o
            .crash
            .as_ref()
            .map_or("no crash".into(), |p| format!("CRASH {}", p.display()));
        writeln!(
            table,
            "| {} | {} | {execs} | {rate} | {} | {result} |",
            o.name, o.seconds, o.corpus
        )?;
    }
    println!("\n{table}");
    let summary = cache.join("summary.md");
    fs::write(&summary, &table)?;
    println!("(also in {})", summary.display());
    let crashed: Vec<_> = outcomes.iter().filter(|o| o.crash.is_some()).collect();
    if !crashed.is_empty() {
        let names: Vec<_> = crashed.iter().map(|o| o.name).collect();
        bail!(
            "{} crashed; reproduce with `cargo +nightly fuzz run TARGET FILE` in fuzz/",
            names.join(", ")
        );
    }
    Ok(())
}

/// The number after `key` in libFuzzer's final statistics.
fn stat(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key))
        .filter_map(|v| v.trim().parse().ok())
        .next_back()
}

/// Writes each `name hex` line of `hex` (comments start with `#`) as a file `name` in `dir`.
fn hex_seeds(hex: &Path, dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    let text = fs::read_to_string(hex).with_context(|| format!("reading {}", hex.display()))?;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{}:{}", hex.display(), i + 1);
        let (name, digits) = line
            .split_once(' ')
            .with_context(|| format!("{}: expected `name hex`", at()))?;
        ensure!(
            digits.len() % 2 == 0 && digits.bytes().all(|b| b.is_ascii_hexdigit()),
            "{}: not an even number of hex digits",
            at()
        );
        let bytes: Vec<u8> = (0..digits.len())
            .step_by(2)
            .map(|j| u8::from_str_radix(&digits[j..j + 2], 16))
            .collect::<Result<_, _>>()?;
        fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_a_source_and_seeds() {
        for t in TARGETS {
            let src = root()
                .join("fuzz/fuzz_targets")
                .join(format!("{}.rs", t.name));
            assert!(src.exists(), "{} has no {}", t.name, src.display());
            let hex = root().join("fuzz/seeds").join(format!("{}.hex", t.name));
            let dirs = t.seeds.iter().filter(|d| root().join(d).is_dir()).count();
            assert!(dirs > 0 || hex.exists(), "{} has no seeds", t.name);
        }
        let manifest = fs::read_to_string(root().join("fuzz/Cargo.toml")).unwrap();
        let bins = manifest.matches("[[bin]]").count();
        assert_eq!(bins, TARGETS.len(), "fuzz/Cargo.toml and TARGETS disagree");
    }

    #[test]
    fn hex_seeds_are_bytes_and_bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("xtask-hex-{}", std::process::id()));
        let hex = dir.join("s.hex");
        fs::create_dir_all(&dir).unwrap();
        fs::write(&hex, "# c\na 00ff10\n").unwrap();
        hex_seeds(&hex, &dir.join("out")).unwrap();
        assert_eq!(fs::read(dir.join("out/a")).unwrap(), [0, 0xff, 0x10]);
        fs::write(&hex, "b 0g\n").unwrap();
        let e = hex_seeds(&hex, &dir.join("out")).unwrap_err().to_string();
        assert!(e.contains("s.hex:1"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn final_stats_are_read() {
        let log = "#2 INITED\nstat::number_of_executed_units: 123456\nstat::peak_rss_mb: 80\n";
        assert_eq!(stat(log, "stat::number_of_executed_units:"), Some(123_456));
        assert_eq!(stat("", "stat::number_of_executed_units:"), None);
    }
}
