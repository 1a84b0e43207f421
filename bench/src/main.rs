//! `tdpshare-bench`: boot-time runs in three tiers (live, lab, replay) and the report —
//! `report.md`, a self-contained `report.html`, `results.json` — and `compare` of two runs.
//! `cargo xtask bench` prepares the guest and the lab runs and calls `run`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tdpshare_bench::live::{self, Config, Guest, Thp, ThpGuard, Watcher};
use tdpshare_bench::results::{self, Case, Host, Results, Tier};
use tdpshare_bench::stats::Metric;
use tdpshare_bench::{hotpath, html, lab, replay};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Boot-time benchmark reports of TDP/IOMMU table sharing"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the tiers and write the report into a new directory.
    Run(RunArgs),
    /// Print the differences between two runs' results.json, with their noise.
    Compare { a: PathBuf, b: PathBuf },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The directory to write (must not exist yet).
    #[arg(long)]
    out: PathBuf,
    /// One memory size, one run each, fewer cases: a few minutes.
    #[arg(long)]
    quick: bool,
    /// Guest memory sizes in GiB (default 1,4,8; --quick: 1).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<u64>,
    /// Runs per case (default 3; --quick: 1 for boots, 3 for the overhead).
    #[arg(long)]
    runs: Option<usize>,
    /// The guest kernel (live tier).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The guest initramfs: its init prints the marker and powers off.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The probes recorder (`tdpshare-probe`).
    #[arg(long)]
    recorder: Option<PathBuf>,
    /// The analyzer (`tdpshare-analyze`): its report on the recorded traces goes into the
    /// bench report.
    #[arg(long)]
    analyzer: Option<PathBuf>,
    /// A boot scenario to replay (repeat it).
    #[arg(long)]
    scenario: Vec<PathBuf>,
    /// A lab run's results directory as NAME=DIR (repeat it).
    #[arg(long)]
    lab: Vec<String>,
    /// Why the lab tier did not run (given by xtask when the lab kernel is not built).
    #[arg(long)]
    lab_skipped: Option<String>,
    /// Seconds one Linux boot may take.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Compare { a, b } => compare(&a, &b),
    };
    if let Err(e) = result {
        eprintln!("tdpshare-bench: {e:#}");
        std::process::exit(1);
    }
}

fn compare(a: &std::path::Path, b: &std::path::Path) -> anyhow::Result<()> {
    let a = Results::load(a)?;
    let b = Results::load(b)?;
    print!("{}", results::compare(&a, &b));
    Ok(())
}

extern "C" fn on_sigint(_: libc::c_int) {
    live::INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_sigint() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

fn host() -> Host {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("?")
        .to_owned();
    let mem_kib: f64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0.0);
    let out = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    Host {
        git_revision: out("git", &["rev-parse", "--short", "HEAD"]),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: mem_kib / (1024.0 * 1024.0),
        qemu: out("qemu-system-x86_64", &["--version"])
            .lines()
            .next()
            .unwrap_or("no QEMU")
            .to_owned(),
        kvm: live::kvm_available(),
    }
}

/// What will run, printed first.
struct Plan {
    sizes: Vec<u64>,
    runs: usize,
    overhead_runs: usize,
    thp: Vec<Thp>,
    configs: Vec<Config>,
    /// Replay with huge host pages (`true`) and/or 4 KiB ones.
    replay_pages: Vec<bool>,
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.out.exists() {
        bail!(
            "{} exists: give a new directory (reports are never overwritten)",
            args.out.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    install_sigint();
    let started = Instant::now();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let thp_guard = ThpGuard::new();
    let plan = Plan {
        sizes: if !args.sizes.is_empty() {
            args.sizes.clone()
        } else if args.quick {
            vec![1]
        } else {
            vec![1, 4, 8]
        },
        runs: args.runs.unwrap_or(if args.quick { 1 } else { 3 }),
        overhead_runs: args.runs.unwrap_or(3).max(3),
        thp: if thp_guard.is_some() {
            vec![Thp::On, Thp::Off]
        } else {
            vec![Thp::On]
        },
        configs: vec![Config::Base, Config::Pinned],
        replay_pages: if args.quick {
            vec![true]
        } else {
            vec![true, false]
        },
    };
    let mut results = Results {
        format: results::FORMAT.into(),
        version: results::VERSION,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        command,
        quick: args.quick,
        complete: false,
        host: host(),
        tiers: Vec::new(),
        analysis: None,
    };
    let boots = plan.sizes.len() * plan.thp.len() * plan.configs.len() * plan.runs;
    println!(
        "plan: live tier — {boots} Linux boots ({} GiB × {} × {}, {} run(s) each), \
         SeaBIOS under KVM per size with the probes, the probes' overhead over {} boots per \
         tool; lab tier — {} run(s) read; replay tier — {} scenario(s) × 4 modes × {}; hot paths. \
         Roughly {} min.",
        plan.sizes
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        plan.configs
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join("/"),
        plan.thp
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join("/"),
        plan.runs,
        plan.overhead_runs,
        args.lab.len(),
        args.scenario.len(),
        if plan.replay_pages.len() == 2 {
            "huge and 4 KiB host pages"
        } else {
            "huge host pages"
        },
        1 + (boots as u64 * plan.sizes.iter().sum::<u64>() * 10) / 60 / plan.sizes.len() as u64
    );
    results.tiers = vec![
        tier("live", LIVE_ABOUT),
        tier("lab", LAB_ABOUT),
        tier("replay", REPLAY_ABOUT),
        tier("hot paths", HOTPATH_ABOUT),
    ];
    // Each tier fills its own entry as it goes: an interrupted run keeps what finished.
    let mut reached = 0;
    let outcome = (|| -> anyhow::Result<()> {
        let t = &mut results.tiers;
        live_tier(&args, &plan, thp_guard.as_ref(), &mut t[0])?;
        reached = 1;
        lab_tier(&args, &mut t[1])?;
        reached = 2;
        replay_tier(&args, &plan, &mut t[2])?;
        reached = 3;
        hotpath_tier(&args, &plan, &mut t[3])?;
        reached = 4;
        Ok(())
    })();
    drop(thp_guard);
    if let Err(e) = &outcome {
        for (i, t) in results.tiers.iter_mut().enumerate().skip(reached) {
            t.skipped.push(if i == reached {
                format!("not finished: {e:#}")
            } else {
                format!("not run: an earlier tier stopped the run ({e:#})")
            });
        }
    }
    results.complete = outcome.is_ok();
    if let Some(analyzer) = &args.analyzer {
        results.analysis = analyze(analyzer, &args.out);
    }
    let figures = html::figures(&results)?;
    write_report(&args.out, &results, &figures)?;
    println!(
        "report: {} ({:.0} s{})",
        args.out.join("report.html").display(),
        started.elapsed().as_secs_f64(),
        if results.complete { "" } else { ", PARTIAL" }
    );
    outcome
}

/// Every `trace.jsonl` under `dir`, sorted.
fn traces_under(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            traces_under(&p, out);
        } else if p.file_name().is_some_and(|n| n == "trace.jsonl") {
            out.push(p);
        }
    }
    out.sort();
}

/// `tdpshare-analyze report` (summary, root updates, what-if) on the traces the run recorded,
/// as Markdown; `None` when it recorded none.
fn analyze(analyzer: &std::path::Path, out: &std::path::Path) -> Option<results::Analysis> {
    let mut traces = Vec::new();
    traces_under(out, &mut traces);
    if traces.is_empty() {
        return None;
    }
    let rel = traces
        .iter()
        .map(|t| t.strip_prefix(out).unwrap_or(t).display().to_string())
        .collect();
    let run = std::process::Command::new(analyzer)
        .arg("report")
        .args(&traces)
        .args([
            "--format", "md", "--only", "summary", "--only", "roots", "--only", "whatif",
        ])
        .output();
    let markdown = match run {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(format!(
            "{} failed ({}): {}",
            analyzer.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {}: {e}", analyzer.display())),
    };
    Some(results::Analysis {
        traces: rel,
        markdown,
    })
}

/// The report files, each written whole (a `.partial` renamed into place).
fn write_report(
    dir: &std::path::Path,
    r: &Results,
    figures: &[html::Figure],
) -> anyhow::Result<()> {
    for (name, text) in [
        ("results.json", serde_json::to_string_pretty(r)?),
        ("report.md", html::markdown(r, figures)),
        ("report.html", html::html(r, figures)),
    ] {
        let path = dir.join(name);
        let partial = dir.join(format!("{name}.partial"));
        std::fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &path)?;
    }
    Ok(())
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:28} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

fn tier(name: &str, about: &str) -> Tier {
    Tier {
        name: name.into(),
        about: about.into(),
        cases: Vec::new(),
        skipped: Vec::new(),
    }
}

const LIVE_ABOUT: &str = "Real VMs booted by QEMU on this host, timed from QEMU's start to the \
    guest's marker (Linux: its init's first line; SeaBIOS: \"No bootable device\"). Pinned = \
    `-overcommit mem-lock=on`. Times are medians with min–max.";
const LAB_ABOUT: &str = "The lab (`cargo xtask lab`): a TCG L1 running the series with real NPT \
    tables and an emulated VT-d; the lab VMM replays a recorded memslot sequence, shares its \
    table with edu (series) or copies it into the IOMMU's own table (stock). Counts exact (the \
    probes in the L1); times are L1 seconds under TCG — slow and noisy, compare ratios.";
const REPLAY_ABOUT: &str = "The kmod simulator on boot scenarios recorded by the live tier and \
    the lab: the real page-table code on real table memory (pre-population time measured), \
    pinning and IOTLB costs modelled, in every mode, KVM 6.12's root lifecycle.";
const HOTPATH_ABOUT: &str = "The project's own hot paths: the trace format's write and read \
    rates (in this process), the probes' decoder (`tdpshare-probe bench-decode`, on this \
    kernel's record layout). The TDP population rate is the replay tier's \"population rate\"; \
    `cargo bench -p tdpshare --features std --bench populate` measures it alone \
    (docs/performance.md).";

fn live_tier(
    args: &RunArgs,
    plan: &Plan,
    thp: Option<&ThpGuard>,
    tier: &mut Tier,
) -> anyhow::Result<()> {
    if thp.is_none() {
        tier.skipped
            .push("4 KiB host pages: THP cannot be switched here (no THP or not root)".into());
    }
    if live::series_in_running_kernel() {
        tier.skipped.push(
            "sharing: the running kernel has the series, but QEMU cannot request sharing; \
             the lab tier measures it with the lab VMM"
                .into(),
        );
    } else {
        tier.skipped.push(format!(
            "sharing: the running kernel ({}) does not carry the series; the lab tier \
             measures sharing",
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        ));
    }
    let timeout = Duration::from_secs(args.timeout);
    let guest = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => Some(Guest {
            kernel: k.clone(),
            initrd: i.clone(),
        }),
        _ => {
            tier.skipped
                .push("Linux boots: no guest kernel/initramfs given (--kernel, --initrd)".into());
            None
        }
    };
    let kvm = live::kvm_available();
    if let Some(guest) = &guest {
        // Where the host's KVM boots Linux, KVM; else TCG, and the case says so.
        let accel_kvm = kvm
            && match live::boot_linux(guest, 1024, Config::Base, true, Duration::from_secs(20)) {
                Ok(_) => true,
                Err(e) => {
                    let text = e.to_string();
                    let why: Vec<&str> = text
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .collect();
                    tier.skipped.push(format!(
                        "Linux under this host's KVM: {} — Linux boots use TCG",
                        why.join(" / ")
                    ));
                    false
                }
            };
        let accel = if accel_kvm { "kvm" } else { "tcg" };
        if !accel_kvm {
            tier.skipped.push(
                "probe counts of the Linux boots: under TCG no KVM runs, so the probes see \
                 nothing; the counts come from SeaBIOS under KVM (below) and from the lab"
                    .into(),
            );
        }
        let cases = plan.sizes.len() * plan.thp.len() * plan.configs.len();
        let bar = progress((cases * plan.runs) as u64, "Linux boots");
        for &t in &plan.thp {
            if let Some(g) = thp {
                g.set(t)?;
            }
            for &size in &plan.sizes {
                for &config in &plan.configs {
                    let mut secs = Vec::new();
                    for _ in 0..plan.runs {
                        secs.push(live::boot_linux(
                            guest,
                            size * 1024,
                            config,
                            accel_kvm,
                            timeout,
                        )?);
                        bar.inc(1);
                    }
                    tier.cases.push(Case {
                        id: format!("live/{accel}/{size}g/{}/{}", config.name(), t.name()),
                        label: format!(
                            "Linux, {accel}, {size} GiB, {}, {}",
                            config.name(),
                            if t == Thp::On { "THP" } else { "4 KiB pages" }
                        ),
                        metrics: Metric::of("boot to marker", "s", "measured", &secs)
                            .into_iter()
                            .collect(),
                    });
                }
            }
        }
        bar.finish();
        if let Some(g) = thp {
            g.set(Thp::On)?;
        }
    }
    if !kvm {
        tier.skipped
            .push("SeaBIOS under KVM and the probes' counts: /dev/kvm is not usable".into());
        return Ok(());
    }
    let work = args.out.join("work");
    // SeaBIOS under the host's KVM, with the probes: real memslots, roots, fast zaps.
    let bar = progress(
        (plan.sizes.len() * plan.configs.len() * (plan.runs + 1)) as u64,
        "SeaBIOS under KVM",
    );
    for &size in &plan.sizes {
        for &config in &plan.configs {
            let mut secs = Vec::new();
            for i in 0..plan.runs {
                let dir = work.join(format!("fw-{size}g-{}-{i}", config.name()));
                secs.push(
                    live::boot_firmware(size * 1024, config, Watcher::None, None, &dir)?.secs,
                );
                bar.inc(1);
            }
            let mut metrics: Vec<Metric> = Metric::of("firmware to marker", "s", "measured", &secs)
                .into_iter()
                .collect();
            if let Some(recorder) = &args.recorder {
                let dir = work.join(format!("fw-{size}g-{}-probes", config.name()));
                let run = live::boot_firmware(
                    size * 1024,
                    config,
                    Watcher::Probes,
                    Some(recorder),
                    &dir,
                )?;
                if let Some(s) = run.stats {
                    metrics.extend([
                        Metric::count("memslot operations", s.memslot_ops),
                        Metric::count("roots allocated", s.roots_allocated),
                        Metric::count("fast zaps", s.fast_zaps),
                        Metric::count("huge-page splits", s.splits),
                        Metric::count("page faults", s.page_faults),
                        Metric::count("IOTLB flushes", s.iotlb_flushes),
                    ]);
                }
            }
            bar.inc(1);
            tier.cases.push(Case {
                id: format!("live/kvm/{size}g/{}/firmware", config.name()),
                label: format!("SeaBIOS, kvm, {size} GiB, {}", config.name()),
                metrics,
            });
        }
    }
    bar.finish();
    if args.recorder.is_none() {
        tier.skipped
            .push("probe counts and overhead: no recorder given (--recorder)".into());
        return Ok(());
    }
    // The probes' overhead: the same boot without and with each tool counting its events.
    let mut watchers = vec![Watcher::None, Watcher::Probes];
    for (w, cmd) in [(Watcher::PerfStat, "perf"), (Watcher::Bpftrace, "bpftrace")] {
        if live::installed(cmd) {
            watchers.push(w);
        } else {
            tier.skipped.push(format!(
                "overhead of {}: `{cmd}` is not installed",
                w.name()
            ));
        }
    }
    let bar = progress(
        (watchers.len() * plan.overhead_runs) as u64,
        "overhead (SeaBIOS, 1 GiB)",
    );
    let mut medians = Vec::new();
    let mut metrics = Vec::new();
    // Interleaved rounds, so drift in the host's load hits every tool alike.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); watchers.len()];
    for round in 0..plan.overhead_runs {
        for (i, &w) in watchers.iter().enumerate() {
            let dir = work.join(format!("overhead-{}-{round}", w.name().replace(' ', "-")));
            let run =
                match live::boot_firmware(1024, Config::Base, w, args.recorder.as_deref(), &dir) {
                    Ok(r) => r,
                    Err(e) if w == Watcher::PerfStat || w == Watcher::Bpftrace => {
                        tier.skipped
                            .push(format!("overhead of {}: {e:#}", w.name()));
                        samples[i].clear();
                        continue;
                    }
                    Err(e) => return Err(e),
                };
            samples[i].push(run.secs);
            bar.inc(1);
        }
    }
    bar.finish();
    for (w, s) in watchers.iter().zip(&samples) {
        if let Some(m) = Metric::of(&format!("with {}", w.name()), "s", "measured", s) {
            medians.push((*w, m.median));
            metrics.push(m);
        }
    }
    if let Some(&(_, base)) = medians.iter().find(|(w, _)| *w == Watcher::None) {
        for &(w, m) in medians.iter().filter(|(w, _)| *w != Watcher::None) {
            metrics.push(Metric {
                name: format!("overhead of {}", w.name()),
                unit: "ratio".into(),
                median: m / base,
                min: m / base,
                max: m / base,
                n: 1,
                kind: "measured".into(),
            });
        }
    }
    tier.cases.push(Case {
        id: "live/kvm/1g/base/overhead".into(),
        label: "SeaBIOS, kvm, 1 GiB: the counting tools' overhead (ratio of medians)".into(),
        metrics,
    });
    Ok(())
}

fn lab_tier(args: &RunArgs, tier: &mut Tier) -> anyhow::Result<()> {
    tier.skipped.extend(args.lab_skipped.iter().cloned());
    if !args.lab.is_empty() {
        tier.skipped.push(
            "the 2021 design's root updates in a real kernel: the series implements only the \
             persistent root (KVM_TDP_SHARE_MODE_PINNED; the others answer EOPNOTSUPP) — the \
             replay tier compares the designs; huge pages on/off: the lab VMM's L2 memory is \
             4 KiB-backed (the lab kernels have no THP)"
                .into(),
        );
    }
    if args.lab.is_empty() && tier.skipped.is_empty() {
        tier.skipped
            .push("no lab runs given (--lab NAME=DIR)".into());
    }
    for spec in &args.lab {
        let (name, dir) = spec
            .split_once('=')
            .with_context(|| format!("--lab takes NAME=DIR, not {spec:?}"))?;
        tier.cases.push(lab::case(
            std::path::Path::new(dir),
            &format!("lab/{name}"),
            name,
        )?);
    }
    Ok(())
}

fn replay_tier(args: &RunArgs, plan: &Plan, tier: &mut Tier) -> anyhow::Result<()> {
    if args.scenario.is_empty() {
        tier.skipped.push("no scenario given (--scenario)".into());
    }
    if !plan.replay_pages.contains(&false) {
        tier.skipped.push(
            "4 KiB host pages: not in --quick (130 M entries for the Linux boot's 2021 design, \
             over a minute)"
                .into(),
        );
    }
    let bar = progress(args.scenario.len() as u64, "replay");
    for s in &args.scenario {
        if live::INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        tier.cases
            .extend(replay::replay(s, plan.runs, &plan.replay_pages)?);
        bar.inc(1);
    }
    bar.finish();
    Ok(())
}

fn hotpath_tier(args: &RunArgs, plan: &Plan, tier: &mut Tier) -> anyhow::Result<()> {
    tier.cases
        .push(hotpath::trace_rates(200_000, plan.runs.max(3))?);
    match &args.recorder {
        Some(recorder) => match hotpath::decode_rate(recorder, 1_000_000, plan.runs.max(3)) {
            Ok(case) => tier.cases.push(case),
            Err(e) => tier.skipped.push(format!("probe decode rate: {e:#}")),
        },
        None => tier
            .skipped
            .push("probe decode rate: no recorder given (--recorder)".into()),
    }
    Ok(())
}
