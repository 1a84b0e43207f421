//! `cargo xtask bench [--quick]`: the guest (Debian's kernel, a busybox initramfs printing the
//! bench's marker), the lab runs when the lab kernels are built, then `tdpshare-bench run` into
//! `target/bench/<timestamp>/`, and a check that the HTML report renders its plots in headless
//! Chromium (docs/bench.md).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};

use crate::kernel::{self, Config, cache_dir};
use crate::lab::{self, Boot};
use crate::{ensure_apt, output, recordboot, root, run};

/// What the guest's init prints (tdpshare-bench's `LINUX_MARKER`).
const MARKER: &str = "TDPSHARE-BENCH: up";
/// The scenarios the replay tier runs.
const SCENARIOS: [&str; 2] = [
    "kmod/scenarios/linux-boot-q35-8g.toml",
    "kmod/scenarios/boot-8g.toml",
];
/// The first plot colour (plot.rs `COLOURS[0]`): seen in the screenshot when the plots render.
const PLOT_COLOUR: [u8; 3] = [31, 119, 180];

fn initramfs() -> anyhow::Result<PathBuf> {
    let image = cache_dir().join("bench/initramfs.cpio.gz");
    recordboot::marker_initramfs(&cache_dir().join("bench/initramfs"), &image, MARKER)?;
    Ok(image)
}

/// The lab runs the lab tier reads, or why there are none.
fn lab_runs(quick: bool) -> Result<Vec<(String, PathBuf)>, String> {
    let lab_kernel = kernel::bzimage(Config::Lab);
    if !lab_kernel.exists() {
        return Err(format!(
            "the lab kernel is not built ({}: cargo xtask kernel build --config lab)",
            lab_kernel.display()
        ));
    }
    lab::build().map_err(|e| format!("the lab initramfs: {e:#}"))?;
    let mut runs = vec![(Config::Lab, "series-sharing")];
    if kernel::bzimage(Config::Stock).exists() {
        runs.push((Config::Stock, "stock-copied-table"));
    }
    if !quick {
        // Legacy-mode VT-d as well: the same counts through a context entry.
        runs.push((Config::Lab, "series-sharing-legacy"));
    }
    let mut out = Vec::new();
    for (config, name) in runs {
        let scalable = !name.ends_with("legacy");
        let spec = Boot {
            config,
            mem_mib: 2048,
            smp: 1,
            scalable,
            disk: None,
            timeout: Duration::from_secs(900),
            command: lab::lab_command(scalable),
            name: format!("bench-{name}"),
        };
        let outcome = lab::boot(&spec).map_err(|e| format!("lab run {name}: {e:#}"))?;
        if outcome.status != 0 {
            return Err(format!(
                "lab run {name} failed its checks (status {}): see {}",
                outcome.status,
                outcome.results.display()
            ));
        }
        out.push((name.to_owned(), outcome.results));
    }
    Ok(out)
}

/// `cargo xtask bench`.
pub fn bench(quick: bool) -> anyhow::Result<()> {
    // perf and bpftrace: the report sets the probes' overhead next to theirs.
    ensure_apt(&[
        "qemu-system-x86",
        "busybox-static",
        "cpio",
        "chromium",
        "linux-perf",
        "bpftrace",
    ])?;
    run(Command::new(env!("CARGO")).current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "tdpshare-bench",
        "-p",
        "tdpshare-probes",
    ]))?;
    // The analyzer in the dev profile: the tests built it already (a release polars build would
    // add minutes), and the recorded traces are small.
    run(Command::new(env!("CARGO")).current_dir(root()).args([
        "build",
        "-p",
        "tdpshare-analysis",
        "--bin",
        "tdpshare-analyze",
    ]))?;
    let (kernel, version) = recordboot::l2_kernel()?;
    let initrd = initramfs()?;
    let stamp = output(Command::new("date").args(["-u", "+%Y%m%dT%H%M%SZ"]))?;
    let out = root().join("target/bench").join(stamp.trim());
    let mut cmd = Command::new(root().join("target/release/tdpshare-bench"));
    cmd.arg("run")
        .arg("--out")
        .arg(&out)
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--recorder")
        .arg(root().join("target/release/tdpshare-probe"))
        .arg("--analyzer")
        .arg(root().join("target/debug/tdpshare-analyze"));
    if quick {
        cmd.arg("--quick");
    }
    for s in SCENARIOS {
        cmd.arg("--scenario").arg(root().join(s));
    }
    match lab_runs(quick) {
        Ok(runs) => {
            for (name, dir) in runs {
                cmd.arg("--lab").arg(format!("{name}={}", dir.display()));
            }
        }
        Err(why) => {
            println!("lab tier skipped: {why}");
            cmd.arg("--lab-skipped").arg(why);
        }
    }
    println!("guest: {version}");
    let status = cmd.status().context("running tdpshare-bench")?;
    ensure!(status.success(), "tdpshare-bench failed ({status})");
    check_html(&out.join("report.html"))?;
    println!("bench report: {}", out.display());
    Ok(())
}

/// Opens the report in headless Chromium and checks the screenshot shows the plots (their
/// first colour is on the page: the inline SVG rendered).
fn check_html(report: &Path) -> anyhow::Result<()> {
    let shot = report.with_file_name("report.png");
    let browser = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| crate::has_command(b, "--version"))
        .context("chromium is not installed: run `cargo xtask setup`")?;
    let result = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,6000",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", report.display()))
        .output()
        .context("running chromium")?;
    ensure!(
        shot.exists(),
        "chromium left no screenshot ({}): {}",
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    let pixels = plot_pixels(&shot)?;
    ensure!(
        pixels > 500,
        "the screenshot of {} shows no plot (found {pixels} pixels of the plots' colour)",
        report.display()
    );
    println!(
        "report renders in headless Chromium: {} ({pixels} plot pixels)",
        shot.display()
    );
    Ok(())
}

/// Pixels of [`PLOT_COLOUR`] (within a small tolerance: anti-aliasing, the bars' alpha).
fn plot_pixels(png_path: &Path) -> anyhow::Result<usize> {
    let file = std::fs::File::open(png_path)?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = decoder.read_info().context("reading the screenshot")?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    let channels = info.color_type.samples();
    ensure!(channels >= 3, "the screenshot is not RGB");
    let near = |a: u8, b: u8| a.abs_diff(b) <= 40;
    Ok(buf[..info.buffer_size()]
        .chunks_exact(channels)
        .filter(|p| {
            near(p[0], PLOT_COLOUR[0]) && near(p[1], PLOT_COLOUR[1]) && near(p[2], PLOT_COLOUR[2])
        })
        .count())
}
