//! `cargo xtask`: the project's own tasks.
//!
//! - `setup`: installs what this project needs on a fresh Debian 12 machine (idempotent: it
//!   prints what it installs and skips what is present): rustfmt and clippy, the nightly
//!   toolchain's rust-src and bpf-linker (LLVM 22) for the eBPF programs, QEMU for the live
//!   tests.
//! - `test`: the structure checks (kmod's layers; its decision layer under the kernel's Rust
//!   rules; no dependency in its default build), then every test (the concurrency stress test
//!   in release mode).
//! - `fuzz`: the cargo-fuzz targets in `fuzz/`, each for a bounded time ([`fuzz`]).
//! - `kernel fetch|build|boot|test` and `patches check|apply|unapply|export`: the sharing
//!   series on Debian's Linux 6.12, in a cache outside the clone ([`kernel`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};

mod bench;
mod checks;
mod fuzz;
mod kernel;
mod lab;
mod recordboot;
mod selftests;
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
    /// Build the release binaries and write sharetop's shell completions (bash, zsh, fish) and
    /// man page into target/dist/.
    Dist,
    /// Run every test of the workspace and the kernel-buildability checks.
    Test,
    /// The kernel with the sharing series: fetch the source, build, boot the check.
    Kernel {
        #[command(subcommand)]
        action: KernelTask,
    },
    /// The sharing series (patches/): check, apply, unapply, export.
    Patches {
        #[command(subcommand)]
        action: PatchTask,
    },
    /// The lab: the kernel in an L1 under QEMU TCG with an emulated VT-d and edu (docs/lab.md).
    Lab {
        #[command(subcommand)]
        action: LabTask,
    },
    /// Boot-time runs (live, lab when built, replay) and the report in target/bench/<time>/,
    /// checked in headless Chromium (docs/bench.md).
    Bench {
        /// One memory size, one run per case: a few minutes, for CI and demos.
        #[arg(long)]
        quick: bool,
    },
    /// Every parser of outside input under libFuzzer (cargo-fuzz, nightly), each target for a
    /// bounded time; corpus and crashes in the cache (docs/fuzzing.md).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Only these targets (default: all).
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum LabTask {
    /// The initramfs: busybox, tdpshare-lab, tdpshare-probe, sharetop and the memslot fixtures.
    Build,
    /// Boot the L1 and run CMD in it; its results directory is shared (9p, mounted at /lab).
    Run {
        /// L1 memory (QEMU syntax: 2048M, 4G; a plain number is MiB).
        #[arg(long, default_value = "2G", value_parser = parse_mem)]
        mem: u64,
        /// The VT-d in scalable mode (default: legacy mode).
        #[arg(long)]
        scalable: bool,
        /// Boot the stock kernel (`kernel build --config stock`): no sharing, real TDP events.
        #[arg(long)]
        stock: bool,
        /// Seconds before the L1 counts as hung (QEMU is then killed).
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        /// The command (a shell command line) to run in the L1.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// The kernel's own KVM and iommufd selftests on the stock and the patched kernel (both
    /// unless one is named), side by side.
    Selftests {
        /// Only the stock kernel.
        #[arg(long, conflicts_with = "patched")]
        stock: bool,
        /// Only the patched kernel.
        #[arg(long)]
        patched: bool,
        /// L1 memory (QEMU syntax).
        #[arg(long, default_value = "2G", value_parser = parse_mem)]
        mem: u64,
        /// Seconds the whole L1 run may take.
        #[arg(long, default_value_t = 5400)]
        timeout: u64,
    },
    /// Kernels (incremental), initramfs, then the lab VMM's checks on the series' kernel
    /// (scalable and legacy mode) and the stock kernel.
    Test {
        /// L1 memory (QEMU syntax).
        #[arg(long, default_value = "2G", value_parser = parse_mem)]
        mem: u64,
        /// Seconds each L1 may take.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// A real Linux boot recorded under nested KVM: Debian's QEMU with -enable-kvm in the L1
    /// boots SeaBIOS alone, then a Debian kernel, while the probes record memslots, roots,
    /// fast zaps, SMM transitions and CR writes.
    RecordBoot {
        /// L2 memory (QEMU syntax); the L1 gets 2 GiB more.
        #[arg(long, default_value = "8G", value_parser = parse_mem)]
        mem: u64,
        /// The L2's machine type.
        #[arg(long, value_enum, default_value = "q35")]
        machine: recordboot::Machine,
        /// No VGA in the L2 (default: QEMU's std VGA, as without -nodefaults).
        #[arg(long)]
        no_vga: bool,
        /// No SMM in the L2's chipset (`smm=off`).
        #[arg(long)]
        no_smm: bool,
        /// L2 vCPUs.
        #[arg(long, default_value_t = 2)]
        vcpus: u32,
        /// No device passed through (default: the L1's edu, with vfio-pci, as a VM that
        /// shares its table has one).
        #[arg(long)]
        no_device: bool,
        /// Seconds the whole L1 run may take.
        #[arg(long, default_value_t = 2400)]
        timeout: u64,
        /// Save the recording as fixtures/{qemu-memslots,traces}/linux-boot-NAME.* and
        /// kmod/scenarios/linux-boot-NAME.toml.
        #[arg(long, value_name = "NAME")]
        save: Option<String>,
    },
}

/// A memory size in MiB from `2G`, `2048M` or `2048`.
fn parse_mem(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, factor) = match t.chars().last() {
        Some('G' | 'g') => (&t[..t.len() - 1], 1024),
        Some('M' | 'm') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is no memory size (2G, 2048M, 2048)"))?;
    let mib = n.saturating_mul(factor);
    if !(512..=16384).contains(&mib) {
        return Err(format!(
            "{mib} MiB: the L1 needs between 512 MiB and 16 GiB"
        ));
    }
    Ok(mib)
}

#[derive(Debug, Subcommand)]
enum KernelTask {
    /// Install the packages and bindgen, unpack linux-source-6.12 into the cache as a git tree.
    Fetch,
    /// Configure and build bzImage (the series must be applied).
    Build {
        #[arg(long, value_enum, default_value = "lab")]
        config: kernel::Config,
    },
    /// Boot the built kernel under QEMU TCG with the in-guest check; its summary decides.
    Boot {
        #[arg(long, value_enum, default_value = "lab")]
        config: kernel::Config,
    },
    /// The CI job: fetch, patches check and apply, compile the objects the series touches.
    Check,
    /// fetch, patches apply, build and boot.
    Test {
        #[arg(long, value_enum, default_value = "lab")]
        config: kernel::Config,
    },
}

#[derive(Debug, Subcommand)]
enum PatchTask {
    /// Check that every patch applies, in order, to the pristine source.
    Check,
    /// Apply the series to the cache's tree (one commit per patch) and copy the decision layer.
    Apply,
    /// Reset the cache's tree to the pristine source.
    Unapply,
    /// Compile the touched objects after each patch in turn (each patch builds on its own).
    BuildEach,
    /// Write the commits on top of tdpshare-base in a kernel tree to patches/.
    Export {
        /// The kernel tree (default: the cache's).
        tree: Option<PathBuf>,
    },
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

/// Debian packages: LLVM 22 for bpf-linker, QEMU for the live probe tests and the lab, tmux
/// for sharetop's terminal smoke test; clang, libelf and zlib for the CO-RE probe (clang
/// compiles it, libbpf-sys builds libbpf against the other two).
const APT_PACKAGES: [&str; 9] = [
    "llvm-22-dev",
    "qemu-system-x86",
    "tmux",
    "clang",
    "libelf-dev",
    "zlib1g-dev",
    "pkg-config",
    // `cargo xtask bench` checks its HTML report renders in headless Chromium.
    "chromium",
    // The analysis tests read its Parquet export with DuckDB, from a venv (`setup_duckdb`).
    "python3-venv",
];

/// The DuckDB the analysis tests read the Parquet export with (Python package, pinned).
const DUCKDB: &str = "duckdb==2.0.1";

/// The Python of the cache's virtual environment with DuckDB installed (`$TDPSHARE_CACHE/venv`,
/// never system-wide); created or completed when missing.
pub(crate) fn setup_duckdb() -> anyhow::Result<PathBuf> {
    let venv = kernel::cache_dir().join("venv");
    let python = venv.join("bin/python");
    let has = |python: &Path| {
        Command::new(python)
            .args(["-c", "import duckdb"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has(&python) {
        println!("present: duckdb in {}", venv.display());
        return Ok(python);
    }
    if !python.exists() {
        println!("creating: Python venv {}", venv.display());
        let system = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        run(Command::new(system).args(["-m", "venv"]).arg(&venv))?;
    }
    println!("installing: {DUCKDB} into {}", venv.display());
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", DUCKDB]))?;
    ensure!(has(&python), "{DUCKDB} installed but `import duckdb` fails");
    Ok(python)
}

fn has_command(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

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
    setup_ebpf_toolchain()?;
    setup_apt()?;
    setup_bpf_linker()?;
    setup_cargo_fuzz()?;
    setup_prometheus()?;
    setup_duckdb()?;
    Ok(())
}

/// The eBPF programs build with the nightly toolchain and its rust-src; bpf-linker needs that
/// nightly's LLVM to be 22.
fn setup_ebpf_toolchain() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("present: nightly toolchain");
    } else {
        println!("installing: nightly toolchain (minimal profile)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        println!("present: nightly rust-src");
    } else {
        println!("installing: nightly rust-src");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let version = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("?");
    ensure!(
        llvm.starts_with("22."),
        "the nightly toolchain uses LLVM {llvm}; bpf-linker here is built against LLVM 22 \
         (Debian's llvm-22-dev), so eBPF bitcode would fail with \"Invalid record\": install a \
         nightly whose LLVM is 22"
    );
    println!("present: nightly with LLVM {llvm}");
    Ok(())
}

fn setup_apt() -> anyhow::Result<()> {
    ensure_apt(&APT_PACKAGES)
}

/// Installs the Debian packages of `packages` that are missing.
pub(crate) fn ensure_apt(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    for p in packages.iter().filter(|p| !missing.contains(p)) {
        println!("present: apt package {p}");
    }
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing: apt packages {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn setup_bpf_linker() -> anyhow::Result<()> {
    if has_command("bpf-linker", "--version") {
        println!("present: bpf-linker");
        return Ok(());
    }
    println!("installing: bpf-linker (built against Debian's LLVM 22)");
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new(env!("CARGO"))
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path))?;
    Ok(())
}

/// Debian's Prometheus (server and promtool) for the exporter's tests: they start their own
/// server on a free port with a temporary configuration. The package's own service is left
/// stopped and disabled when this installs it (on a host with systemd it would start one on
/// :9090); a Prometheus that was installed before is not touched.
pub(crate) fn setup_prometheus() -> anyhow::Result<()> {
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "prometheus"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"));
    if installed {
        println!("present: apt package prometheus");
        return Ok(());
    }
    ensure_apt(&["prometheus"])?;
    if has_command("systemctl", "--version") {
        // Fails harmlessly where systemd is not running (a container): nothing was started.
        let _ = Command::new("systemctl")
            .args(["disable", "--now", "prometheus"])
            .status();
        println!("stopped and disabled: prometheus.service (the tests run their own)");
    }
    Ok(())
}

/// cargo-fuzz, for `cargo xtask fuzz` (pinned: its flags are what the task passes).
fn setup_cargo_fuzz() -> anyhow::Result<()> {
    if has_command("cargo-fuzz", "--version") {
        println!("present: cargo-fuzz");
        return Ok(());
    }
    println!("installing: {}", fuzz::CARGO_FUZZ);
    run(Command::new(env!("CARGO")).args(["install", "--locked", fuzz::CARGO_FUZZ]))
}

/// The fuzz targets (their own workspace, run by `cargo xtask fuzz`) still compile against
/// the crates' APIs: a type check with the stable toolchain, no sanitizer, no run.
fn check_fuzz_targets() -> anyhow::Result<()> {
    run(Command::new(env!("CARGO"))
        .current_dir(root())
        .args([
            "check",
            "-q",
            "--manifest-path",
            "fuzz/Cargo.toml",
            "--bins",
        ])
        .arg("--target-dir")
        .arg(root().join("target/fuzz-check")))
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
    cargo_test_env(args, &[], totals)
}

fn cargo_test_env(
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
    totals: &mut Totals,
) -> anyhow::Result<bool> {
    use std::io::{BufRead, BufReader};
    let mut cmd = Command::new(env!("CARGO"));
    cmd.envs(env.iter().copied());
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
    // The analysis tests read the Parquet export with DuckDB too: they require it here.
    let python = setup_duckdb()?;
    // The exporter's tests scrape it with a real Prometheus and check it with promtool.
    setup_prometheus()?;
    checks::check_layers(&root())?;
    checks::check_decision_layer(&root())?;
    check_kmod_default_build()?;
    check_fuzz_targets()?;
    let mut totals = Totals::default();
    let units = cargo_test_env(
        &["--workspace", "--all-features", "--all-targets"],
        &[
            ("TDPSHARE_DUCKDB_PYTHON", python.as_os_str()),
            // The exporter's Prometheus tests run here for real, never skip for lack of it.
            ("TDPSHARE_REQUIRE_PROMETHEUS", std::ffi::OsStr::new("1")),
        ],
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

/// `cargo xtask dist`: release binaries, and sharetop's completions and man page generated by
/// the binary itself (so they always match its flags).
fn dist() -> anyhow::Result<()> {
    run(Command::new(env!("CARGO")).current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "sharetop",
        "-p",
        "tdpshare-probes",
    ]))?;
    let bin = root().join("target/release/sharetop");
    let out = root().join("target/dist");
    std::fs::create_dir_all(out.join("completions"))?;
    std::fs::create_dir_all(out.join("man/man1"))?;
    let files = [
        (vec!["completions", "bash"], "completions/sharetop.bash"),
        (vec!["completions", "zsh"], "completions/_sharetop"),
        (vec!["completions", "fish"], "completions/sharetop.fish"),
        (vec!["manpage"], "man/man1/sharetop.1"),
    ];
    for (args, name) in files {
        let text = output(Command::new(&bin).args(&args))?;
        ensure!(
            !text.is_empty(),
            "sharetop {} printed nothing",
            args.join(" ")
        );
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    println!(
        "install: cp {0}/completions/sharetop.bash /usr/share/bash-completion/completions/sharetop; \
         cp {0}/man/man1/sharetop.1 /usr/local/share/man/man1/",
        out.display()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Test => test(),
        Task::Kernel { action } => match action {
            KernelTask::Fetch => kernel::fetch(),
            KernelTask::Build { config } => kernel::build(config),
            KernelTask::Boot { config } => kernel::boot(config),
            KernelTask::Check => kernel::check(),
            KernelTask::Test { config } => kernel::test(config),
        },
        Task::Lab { action } => match action {
            LabTask::Build => lab::build().map(|_| ()),
            LabTask::Run {
                mem,
                scalable,
                stock,
                timeout,
                cmd,
            } => lab::run_command(&lab::Boot {
                config: if stock {
                    kernel::Config::Stock
                } else {
                    kernel::Config::Lab
                },
                mem_mib: mem,
                smp: 1,
                scalable,
                disk: None,
                timeout: std::time::Duration::from_secs(timeout),
                command: cmd.join(" "),
                name: if stock { "run-stock" } else { "run" }.into(),
            }),
            LabTask::Selftests {
                stock,
                patched,
                mem,
                timeout,
            } => {
                let configs = match (stock, patched) {
                    (true, _) => vec![kernel::Config::Stock],
                    (_, true) => vec![kernel::Config::Lab],
                    _ => vec![kernel::Config::Stock, kernel::Config::Lab],
                };
                selftests::selftests(&configs, mem, std::time::Duration::from_secs(timeout))
            }
            LabTask::RecordBoot {
                mem,
                machine,
                no_vga,
                no_smm,
                vcpus,
                no_device,
                timeout,
                save,
            } => recordboot::record_boot(&recordboot::Options {
                mem_mib: mem,
                machine,
                vga: !no_vga,
                smm: !no_smm,
                vcpus,
                device: !no_device,
                timeout: std::time::Duration::from_secs(timeout),
                save,
            }),
            LabTask::Test { mem, timeout } => {
                lab::test(mem, std::time::Duration::from_secs(timeout))
            }
        },
        Task::Bench { quick } => bench::bench(quick),
        Task::Fuzz { seconds, targets } => fuzz::fuzz(seconds, &targets),
        Task::Dist => dist(),
        Task::Patches { action } => match action {
            PatchTask::Check => kernel::patches_check(),
            PatchTask::Apply => kernel::patches_apply(),
            PatchTask::Unapply => kernel::patches_unapply(),
            PatchTask::BuildEach => kernel::patches_build_each(),
            PatchTask::Export { tree } => kernel::patches_export(tree),
        },
    }
}
