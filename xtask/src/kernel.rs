//! The kernel half: `cargo xtask kernel fetch|build|boot|test` and
//! `cargo xtask patches check|apply|unapply|export`.
//!
//! Everything large lives in a cache outside the clone (`$TDPSHARE_CACHE`, else
//! `~/.cache/tdpshare`): Debian's `linux-source-6.12` unpacked into a git tree whose first
//! commit is the pristine source (tag `tdpshare-base`), the build directories
//! (`build-<config>`), the initramfs and the boot logs. Each command is idempotent and prints
//! what it does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::{ensure_apt, has_command, output, root, run};

/// The Debian package the series is based on, and its tarball.
const SOURCE_PACKAGE: &str = "linux-source-6.12";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
/// The tree's directory in the cache (the tarball's top directory).
const TREE: &str = "linux-source-6.12";
/// The pristine source in the tree.
const BASE_TAG: &str = "tdpshare-base";
/// What fetching, building and booting need.
const KERNEL_PACKAGES: [&str; 14] = [
    "linux-source-6.12",
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "dwarves",
    "busybox-static",
    "cpio",
    "libclang-dev",
    "rustc-web",
    "rust-web-src",
    "qemu-system-x86",
];
/// Linux 6.12's Rust support wants this bindgen (Debian's is too old).
const BINDGEN_VERSION: &str = "0.72.1";
/// The identity of the commits xtask makes in the cache tree.
const GIT_IDENTITY: [&str; 4] = [
    "-c",
    "user.name=tdpshare xtask",
    "-c",
    "user.email=xtask@tdpshare.invalid",
];

/// Where the cache lives.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TDPSHARE_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/tdpshare")
}

fn tree() -> PathBuf {
    cache_dir().join(TREE)
}

/// The pristine source's own worktree, for the stock kernel.
fn stock_tree() -> PathBuf {
    cache_dir().join("linux-stock")
}

/// The tree `config` builds from: the stock worktree (made at `tdpshare-base` if missing) or
/// the cache's tree with the series.
pub fn tree_for(config: Config) -> anyhow::Result<PathBuf> {
    let tree = ensure_tree()?;
    if config != Config::Stock {
        return Ok(tree);
    }
    let stock = stock_tree();
    if !stock.join(".git").exists() {
        run(git(&tree)
            .args(["worktree", "add", "-q", "--detach"])
            .arg(&stock)
            .arg(BASE_TAG))?;
    }
    let head = output(git(&stock).args(["rev-parse", "HEAD"]))?;
    let base = output(git(&tree).args(["rev-parse", &format!("{BASE_TAG}^{{commit}}")]))?;
    ensure!(
        head.trim() == base.trim(),
        "{} is not at {BASE_TAG}: remove it (git worktree remove) and build again",
        stock.display()
    );
    Ok(stock)
}

fn git(tree: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(tree).args(GIT_IDENTITY);
    cmd
}

/// Prints how long `what` took.
pub(crate) fn timed<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    let r = f();
    let secs = start.elapsed().as_secs();
    println!("{what}: {}m{:02}s", secs / 60, secs % 60);
    r
}

/// `cargo xtask kernel fetch`: the packages, bindgen, and the source tree in the cache.
pub fn fetch() -> anyhow::Result<()> {
    ensure_apt(&KERNEL_PACKAGES)?;
    let bindgen = Command::new("bindgen")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if bindgen.contains(BINDGEN_VERSION) {
        println!("present: bindgen {BINDGEN_VERSION}");
    } else {
        println!("installing: bindgen-cli {BINDGEN_VERSION} (Debian's is too old for Linux 6.12)");
        run(Command::new(env!("CARGO")).args([
            "install",
            "bindgen-cli",
            "--version",
            BINDGEN_VERSION,
            "--locked",
        ]))?;
    }
    let version = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))?;
    let tree = tree();
    if tree.join(".git").exists() {
        let tag = output(git(&tree).args(["tag", "-l", BASE_TAG]))?;
        ensure!(
            !tag.trim().is_empty(),
            "{} exists but has no tag {BASE_TAG}: remove it and fetch again",
            tree.display()
        );
        println!("present: {} ({SOURCE_PACKAGE} {version})", tree.display());
        return Ok(());
    }
    ensure!(
        !tree.exists(),
        "{} exists but is no git tree: remove it and fetch again",
        tree.display()
    );
    std::fs::create_dir_all(cache_dir())
        .with_context(|| format!("creating {}", cache_dir().display()))?;
    timed("unpacked", || {
        run(Command::new("tar")
            .arg("-C")
            .arg(cache_dir())
            .args(["-xf", SOURCE_TARBALL]))
    })?;
    // The tarball's .gitignore ignores most of the tree: the baseline takes every file.
    run(git(&tree).args(["init", "-q"]))?;
    timed("baseline commit", || {
        run(git(&tree).args(["add", "-A", "-f"]))?;
        run(git(&tree).args([
            "commit",
            "-q",
            "-m",
            &format!("Debian {SOURCE_PACKAGE} {version}"),
        ]))
    })?;
    run(git(&tree).args(["tag", BASE_TAG]))?;
    println!("fetched: {} at tag {BASE_TAG}", tree.display());
    Ok(())
}

/// The series' patch files, in order (`patches/series`).
fn series() -> anyhow::Result<Vec<PathBuf>> {
    let dir = root().join("patches");
    let list = std::fs::read_to_string(dir.join("series")).context("reading patches/series")?;
    let patches: Vec<PathBuf> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| dir.join(l))
        .collect();
    for p in &patches {
        ensure!(
            p.exists(),
            "patches/series names {}, which does not exist",
            p.display()
        );
    }
    ensure!(!patches.is_empty(), "patches/series lists no patch");
    Ok(patches)
}

/// A patch file's subject, without the `[PATCH n/m]` prefix.
fn subject(patch: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(patch)?;
    let mut lines = text.lines().skip_while(|l| !l.starts_with("Subject: "));
    let first = lines
        .next()
        .and_then(|l| l.strip_prefix("Subject: "))
        .with_context(|| format!("{} has no Subject line", patch.display()))?;
    // A long subject is folded onto continuation lines that start with a space.
    let mut line = first.to_string();
    for more in lines.take_while(|l| l.starts_with(' ')) {
        line.push_str(more);
    }
    Ok(match line.find("] ") {
        Some(i) if line.starts_with('[') => line[i + 2..].to_string(),
        _ => line.to_string(),
    })
}

fn ensure_tree() -> anyhow::Result<PathBuf> {
    let tree = tree();
    ensure!(
        tree.join(".git").exists(),
        "no kernel tree at {}: run `cargo xtask kernel fetch` first",
        tree.display()
    );
    Ok(tree)
}

/// A fresh worktree of `tree` at the pristine source, in the cache under `name` (an old one
/// there is removed first).
fn scratch_worktree(tree: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let scratch = cache_dir().join(name);
    if scratch.exists() {
        let _ = run(git(tree)
            .args(["worktree", "remove", "--force"])
            .arg(&scratch));
        let _ = std::fs::remove_dir_all(&scratch);
    }
    run(git(tree)
        .args(["worktree", "add", "-q", "--detach"])
        .arg(&scratch)
        .arg(BASE_TAG))?;
    Ok(scratch)
}

/// `cargo xtask patches check`: every patch applies, in order, to the pristine source.
pub fn patches_check() -> anyhow::Result<()> {
    let tree = ensure_tree()?;
    let patches = series()?;
    let scratch = scratch_worktree(&tree, "check-worktree")?;
    let result = (|| {
        for p in &patches {
            let name = p
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            let out = Command::new("git")
                .arg("-C")
                .arg(&scratch)
                .args(["apply", "--index", "--whitespace=error-all"])
                .arg(p)
                .output()
                .context("running git apply")?;
            if !out.status.success() {
                bail!(
                    "{name} does not apply to {BASE_TAG}:\n{}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            println!("applies: {name}");
        }
        Ok(())
    })();
    let _ = run(git(&tree)
        .args(["worktree", "remove", "--force"])
        .arg(&scratch));
    result?;
    println!("all {} patches apply to {BASE_TAG}", patches.len());
    Ok(())
}

/// Copies tdpshare's decision layer into the tree, where the series' Rust object builds it:
/// files that changed are rewritten (an unchanged one keeps its time, so make does not rebuild),
/// files no longer in kmod are removed.
fn install_decision(tree: &Path) -> anyhow::Result<()> {
    let from = root().join("kmod/src/decision");
    let to = tree.join("arch/x86/kvm/tdp_share/decision");
    std::fs::create_dir_all(&to)?;
    let (mut changed, mut same) = (0, 0);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&from)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_name().context("a file name")?.to_owned();
            let text =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let dest = to.join(&name);
            if std::fs::read(&dest).is_ok_and(|old| old == text) {
                same += 1;
            } else {
                std::fs::write(&dest, &text)
                    .with_context(|| format!("writing {}", dest.display()))?;
                changed += 1;
            }
            names.push(name);
        }
    }
    for entry in std::fs::read_dir(&to)? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| !names.iter().any(|m| m.as_os_str() == n))
        {
            std::fs::remove_file(&path)?;
        }
    }
    println!(
        "kmod/src/decision in {}: {changed} file(s) updated, {same} unchanged",
        to.display()
    );
    Ok(())
}

/// The subjects of the commits on top of the pristine source, oldest first.
fn applied_subjects(tree: &Path) -> anyhow::Result<Vec<String>> {
    let log = output(git(tree).args([
        "log",
        "--reverse",
        "--format=%s",
        &format!("{BASE_TAG}..HEAD"),
    ]))?;
    Ok(log.lines().map(str::to_string).collect())
}

/// `git patch-id --stable` of a diff (a patch file, or `git show`'s output): equal for equal
/// changes whatever the commit ids, dates and messages.
fn patch_id(tree: &Path, diff: &[u8]) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = git(tree)
        .args(["patch-id", "--stable"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running git patch-id")?;
    child
        .stdin
        .take()
        .context("git patch-id's stdin")?
        .write_all(diff)?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Whether the commits on top of the base carry the same changes as the series' files.
fn applied_changes_match(tree: &Path, patches: &[PathBuf]) -> anyhow::Result<bool> {
    let commits = output(git(tree).args(["rev-list", "--reverse", &format!("{BASE_TAG}..HEAD")]))?;
    for (commit, patch) in commits.lines().zip(patches) {
        let shown = git(tree)
            .args(["show", "--format=", commit])
            .output()?
            .stdout;
        let file = std::fs::read(patch).with_context(|| format!("reading {}", patch.display()))?;
        if patch_id(tree, &shown)? != patch_id(tree, &file)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether the tree has no uncommitted changes to tracked files.
fn is_clean(tree: &Path) -> anyhow::Result<bool> {
    let status = output(git(tree).args(["status", "--porcelain", "--untracked-files=no"]))?;
    Ok(status.trim().is_empty())
}

fn ensure_clean(tree: &Path) -> anyhow::Result<()> {
    ensure!(
        is_clean(tree)?,
        "{} has uncommitted changes: run `cargo xtask patches unapply` first",
        tree.display()
    );
    Ok(())
}

/// The ref `patches apply` leaves at the commit it made last: a tree whose HEAD is still there
/// holds nothing but a series xtask applied.
const APPLIED_REF: &str = "refs/tdpshare/applied";

/// `cargo xtask patches apply`: the series on top of the pristine source, one commit per patch.
/// A tree holding an older version of the series that xtask applied (other subjects, or the
/// same with other changes) is reset and the series applied again; a tree with commits or
/// changes of someone else's is left alone.
pub fn patches_apply() -> anyhow::Result<()> {
    let tree = ensure_tree()?;
    let patches = series()?;
    let want: Vec<String> = patches
        .iter()
        .map(|p| subject(p))
        .collect::<Result<_, _>>()?;
    let mut have = applied_subjects(&tree)?;
    let current = have == want && applied_changes_match(&tree, &patches)?;
    if !have.is_empty() && !current {
        let head = output(git(&tree).args(["rev-parse", "HEAD"]))?;
        let ours = git(&tree)
            .args(["rev-parse", "--verify", "-q", APPLIED_REF])
            .output()
            .is_ok_and(|o| o.status.success() && o.stdout == head.as_bytes());
        ensure!(
            ours && is_clean(&tree)?,
            "{} has commits or changes other than a series xtask applied on top of {BASE_TAG} \
             ({}): run `cargo xtask patches unapply` first",
            tree.display(),
            have.join("; ")
        );
        println!("the tree holds an older version of the series: applying it again");
        run(git(&tree).args(["reset", "-q", "--hard", BASE_TAG]))?;
        have.clear();
    }
    if current {
        println!("already applied: {} patches", want.len());
    } else {
        ensure_clean(&tree)?;
        for p in &patches {
            let out = git(&tree)
                .args(["am", "-q", "--whitespace=error-all"])
                .arg(p)
                .output()
                .context("running git am")?;
            if !out.status.success() {
                let _ = git(&tree).args(["am", "--abort"]).status();
                bail!(
                    "{} does not apply:\n{}",
                    p.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            println!("applied: {}", subject(p)?);
        }
        run(git(&tree).args(["update-ref", APPLIED_REF, "HEAD"]))?;
    }
    install_decision(&tree)
}

/// `cargo xtask patches unapply`: back to the pristine source.
pub fn patches_unapply() -> anyhow::Result<()> {
    let tree = ensure_tree()?;
    run(git(&tree).args(["reset", "-q", "--hard", BASE_TAG]))?;
    let _ = git(&tree).args(["update-ref", "-d", APPLIED_REF]).output();
    let decision = tree.join("arch/x86/kvm/tdp_share");
    if decision.exists() {
        std::fs::remove_dir_all(&decision)?;
    }
    println!("{} is at {BASE_TAG}", tree.display());
    Ok(())
}

/// `cargo xtask patches export [TREE]`: the commits on top of `tdpshare-base` in a kernel tree
/// (default: the cache's) become `patches/*.patch` and `patches/series`.
pub fn patches_export(from: Option<PathBuf>) -> anyhow::Result<()> {
    let tree = match from {
        Some(t) => t,
        None => ensure_tree()?,
    };
    let dir = root().join("patches");
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "patch") {
            std::fs::remove_file(&path)?;
        }
    }
    let files = output(
        git(&tree)
            .args(["format-patch", "--no-signature", "--zero-commit", "-o"])
            .arg(&dir)
            .arg(format!("{BASE_TAG}..HEAD")),
    )?;
    let names: Vec<String> = files
        .lines()
        .filter_map(|l| {
            Path::new(l.trim())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .collect();
    ensure!(
        !names.is_empty(),
        "no commit on top of {BASE_TAG} in {}",
        tree.display()
    );
    std::fs::write(dir.join("series"), names.join("\n") + "\n")?;
    println!("exported {} patches to {}", names.len(), dir.display());
    Ok(())
}

/// The kernel configurations `kernel build` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Config {
    /// x86_64_defconfig with KVM, both IOMMUs, iommufd, VFIO, BPF, BTF, Rust and the series:
    /// what the lab and the probes need.
    Lab,
    /// The same without BTF debug information: a faster build for the boot check.
    Minimal,
    /// The lab configuration on the pristine source (`tdpshare-base`, no series), in its own
    /// worktree (`linux-stock`): the lab's comparison kernel.
    Stock,
}

impl Config {
    /// Its name on the command line (`--config`).
    pub fn name(self) -> &'static str {
        match self {
            Config::Lab => "lab",
            Config::Minimal => "minimal",
            Config::Stock => "stock",
        }
    }

    /// `scripts/config` options on top of x86_64_defconfig.
    fn options(self) -> Vec<&'static str> {
        let mut on = vec![
            "RUST",
            "VIRTUALIZATION",
            "KVM",
            "KVM_AMD",
            "KVM_INTEL",
            "INTEL_IOMMU",
            "AMD_IOMMU",
            "IOMMUFD",
            "VFIO",
            "VFIO_DEVICE_CDEV",
            "VFIO_PCI",
            "PCI_MSI",
            "IRQ_REMAP",
            "BPF_SYSCALL",
            "BPF_JIT",
            // syscalls:sys_{enter,exit}_ioctl: the probes' memslot operations.
            "FTRACE_SYSCALLS",
            "FTRACE",
            "EVENT_TRACING",
            "SERIAL_8250_CONSOLE",
            "DEVTMPFS",
        ];
        if self != Config::Stock {
            on.push("KVM_TDP_SHARE");
        }
        if self != Config::Minimal {
            // BTF for the CO-RE probe and tp_btf; the VT-d debugfs shows the root table a
            // device's context or PASID entry points at (the lab compares it with KVM's).
            on.extend([
                "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT",
                "DEBUG_INFO_BTF",
                "DEBUG_FS",
                "IOMMU_DEBUGFS",
                "INTEL_IOMMU_DEBUGFS",
                // iommufd's mock driver, for tools/testing/selftests/iommu (the lab's
                // selftests run them on both kernels).
                "DEBUG_KERNEL",
                "RUNTIME_TESTING_MENU",
                "FAULT_INJECTION",
                "IOMMUFD_TEST",
            ]);
        }
        on
    }
}

pub fn build_dir(config: Config) -> PathBuf {
    cache_dir().join(format!("build-{}", config.name()))
}

/// The make command for the tree with Debian's Rust toolchain.
fn make(tree: &Path, build: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(tree)
        .arg(format!("O={}", build.display()))
        .args(["RUSTC=/usr/bin/rustc", "HOSTRUSTC=/usr/bin/rustc"]);
    cmd
}

pub fn bzimage(config: Config) -> PathBuf {
    build_dir(config).join("arch/x86/boot/bzImage")
}

/// Writes `config`'s configuration into its build directory (x86_64_defconfig plus the
/// options) and checks that every option stayed on.
fn configure(tree: &Path, config: Config) -> anyhow::Result<PathBuf> {
    let build = build_dir(config);
    std::fs::create_dir_all(&build)?;
    let dotconfig = build.join(".config");
    if !dotconfig.exists() {
        run(make(tree, &build).arg("x86_64_defconfig"))?;
    }
    let mut cfg = Command::new(tree.join("scripts/config"));
    cfg.arg("--file").arg(&dotconfig);
    for o in config.options() {
        cfg.args(["-e", o]);
    }
    run(&mut cfg)?;
    run(make(tree, &build).args(["-s", "olddefconfig"]))?;
    let text = std::fs::read_to_string(&dotconfig)?;
    for o in config.options() {
        ensure!(
            text.contains(&format!("CONFIG_{o}=y")),
            "CONFIG_{o} did not stay on in {} (a dependency is missing: see its Kconfig)",
            dotconfig.display()
        );
    }
    Ok(build)
}

fn jobs() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The directories the series changes: building them compiles every object it touches.
const TOUCHED_DIRS: [&str; 4] = [
    "arch/x86/kvm/",
    "drivers/iommu/intel/",
    "drivers/iommu/amd/",
    "drivers/iommu/iommufd/",
];

/// `cargo xtask kernel build`: the configuration, then bzImage, with the elapsed time.
pub fn build(config: Config) -> anyhow::Result<()> {
    let tree = tree_for(config)?;
    if config != Config::Stock {
        install_decision(&tree)?;
    }
    let build = configure(&tree, config)?;
    let jobs = jobs();
    timed(
        &format!("kernel build ({} config, -j{jobs})", config.name()),
        || run(make(&tree, &build).args(["-s", &format!("-j{jobs}"), "bzImage"])),
    )?;
    println!("built: {}", bzimage(config).display());
    Ok(())
}

/// `cargo xtask kernel check`, the CI job: fetch, check and apply the series, then compile
/// the objects it touches in the minimal configuration (no bzImage, no boot).
pub fn check() -> anyhow::Result<()> {
    fetch()?;
    patches_check()?;
    patches_apply()?;
    let tree = ensure_tree()?;
    let build = configure(&tree, Config::Minimal)?;
    let jobs = jobs();
    timed("compiling the touched objects", || {
        run(make(&tree, &build)
            .args(["-s", &format!("-j{jobs}")])
            .args(TOUCHED_DIRS))
    })?;
    println!("the series compiles: {}", TOUCHED_DIRS.join(" "));
    Ok(())
}

/// `cargo xtask patches build-each`: every prefix of the series compiles (each patch builds on
/// its own), in a scratch worktree and the `build-each` directory.
pub fn patches_build_each() -> anyhow::Result<()> {
    let tree = ensure_tree()?;
    let patches = series()?;
    let scratch = scratch_worktree(&tree, "each-worktree")?;
    let build = cache_dir().join("build-each");
    let result = (|| {
        let mut cfg_done = false;
        for (i, p) in patches.iter().enumerate() {
            run(git(&scratch).args(["am", "-q"]).arg(p))?;
            if scratch.join("arch/x86/kvm/tdp_share").exists() {
                install_decision(&scratch)?;
            }
            std::fs::create_dir_all(&build)?;
            if !cfg_done {
                run(make(&scratch, &build).arg("x86_64_defconfig"))?;
                cfg_done = true;
            }
            let mut cfg = Command::new(scratch.join("scripts/config"));
            cfg.arg("--file").arg(build.join(".config"));
            for o in Config::Minimal.options() {
                cfg.args(["-e", o]);
            }
            run(&mut cfg)?;
            run(make(&scratch, &build).args(["-s", "olddefconfig"]))?;
            let jobs = jobs();
            timed(&format!("patch {} of {}", i + 1, patches.len()), || {
                run(make(&scratch, &build)
                    .args(["-s", &format!("-j{jobs}")])
                    .args(TOUCHED_DIRS))
            })
            .with_context(|| format!("{} does not build on its own", p.display()))?;
            println!("builds: {}", subject(p)?);
        }
        Ok(())
    })();
    let _ = run(git(&tree)
        .args(["worktree", "remove", "--force"])
        .arg(&scratch));
    result
}

/// The static test binary and busybox in a gzip'd cpio, with an `/init` that runs the check.
fn initramfs() -> anyhow::Result<PathBuf> {
    run(Command::new(env!("CARGO"))
        .current_dir(root())
        .args([
            "build",
            "--release",
            "-p",
            "tdpshare-guest",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static"))?;
    let check = root().join("target/x86_64-unknown-linux-gnu/release/tdpshare-kcheck");
    let dir = cache_dir().join("initramfs");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("copying /bin/busybox (Debian's busybox-static)")?;
    std::fs::copy(&check, dir.join("bin/tdpshare-kcheck"))
        .with_context(|| format!("copying {}", check.display()))?;
    let init = "#!/bin/busybox sh\n\
        /bin/busybox mount -t proc proc /proc\n\
        /bin/busybox mount -t sysfs sysfs /sys\n\
        /bin/busybox mount -t devtmpfs devtmpfs /dev\n\
        /bin/busybox mount -t tracefs tracefs /sys/kernel/tracing\n\
        echo \"tdpshare initramfs on $(/bin/busybox uname -r)\"\n\
        for f in /sys/kernel/tracing/events/tdpshare/*/format \
            /sys/kernel/tracing/events/amd_iommu/*/format; do\n\
            echo \"=== tracefs $f\"; /bin/busybox cat $f; echo \"=== end\"; done\n\
        /bin/tdpshare-kcheck\n\
        echo \"tdpshare-kcheck exit status $?\"\n\
        /bin/busybox poweroff -f\n";
    let image = cache_dir().join("initramfs.cpio.gz");
    pack_initramfs(&dir, init, &image)?;
    Ok(image)
}

/// Writes `init` (executable) into `tree` and packs the tree as a gzipped newc cpio at `image`.
pub(crate) fn pack_initramfs(tree: &Path, init: &str, image: &Path) -> anyhow::Result<()> {
    let init_path = tree.join("init");
    std::fs::write(&init_path, init)?;
    run(Command::new("chmod").arg("755").arg(&init_path))?;
    run(Command::new("sh").current_dir(tree).arg("-c").arg(format!(
        "find . -print0 | cpio --null -o -H newc --quiet | gzip -1 > {}",
        image.display()
    )))
}

/// How long a boot may take before it counts as hung (TCG is slow, the check is not).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// `cargo xtask kernel boot`: the built kernel under QEMU TCG (SVM + NPT, an emulated VT-d in
/// scalable mode), running the check; its summary line decides.
pub fn boot(config: Config) -> anyhow::Result<()> {
    ensure!(
        has_command("qemu-system-x86_64", "--version"),
        "qemu-system-x86_64 is missing: run `cargo xtask kernel fetch`"
    );
    let kernel = bzimage(config);
    ensure!(
        kernel.exists(),
        "no kernel at {}: run `cargo xtask kernel build --config {}`",
        kernel.display(),
        config.name()
    );
    let initrd = initramfs()?;
    let log = cache_dir().join(format!("boot-{}.log", config.name()));
    let console = std::fs::File::create(&log)?;
    // -cpu max under TCG: AMD SVM with NPT, so KVM in the guest runs its TDP MMU; the VT-d
    // needs aw-bits=48 (QEMU 7.2's default is 39) and the guest no5lvl (5-level NPT roots
    // cannot be walked by it); intel_iommu_tdp_emulated: the unit is QEMU's model, which walks
    // x86-64-format tables and reads them coherently (it advertises neither).
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "2G"])
        .args(["-machine", "q35,kernel-irqchip=split"])
        .args([
            "-device",
            "intel-iommu,intremap=on,aw-bits=48,x-scalable-mode=on",
        ])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 intel_iommu=on panic=-1 no5lvl intel_iommu_tdp_emulated=1",
        ])
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console);
    println!("+ {qemu:?}");
    println!("console: {}", log.display());
    let start = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let secs = start.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    for line in text
        .lines()
        .filter(|l| l.contains("kcheck") || l.contains("TDPSHARE"))
    {
        println!("{}", line.trim_end());
    }
    let summary = text.lines().find(|l| l.contains("TDPSHARE-KCHECK:"));
    println!("boot: {secs:.1} s wall");
    match (status, summary) {
        (None, _) => bail!(
            "the guest did not power off within {} s (console: {})",
            BOOT_TIMEOUT.as_secs(),
            log.display()
        ),
        (_, None) => bail!(
            "the check printed no summary line (console: {})",
            log.display()
        ),
        (_, Some(line)) => {
            ensure!(line.contains("PASS"), "{}", line.trim());
            Ok(())
        }
    }
}

/// `cargo xtask kernel test`: fetch, apply, build and boot.
pub fn test(config: Config) -> anyhow::Result<()> {
    fetch()?;
    patches_apply()?;
    build(config)?;
    boot(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folded_subject_is_read_whole_without_its_prefix() {
        let dir = std::env::temp_dir().join(format!("xtask-subject-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("0006.patch");
        std::fs::write(
            &p,
            "From 0 Mon Sep 17 00:00:00 2001\nSubject: [PATCH 6/6] iommu/vt-d: Translate through a KVM\n VM's TDP table\n\nBody\n",
        )
        .unwrap();
        assert_eq!(
            subject(&p).unwrap(),
            "iommu/vt-d: Translate through a KVM VM's TDP table"
        );
        std::fs::write(&p, "no subject here\n").unwrap();
        assert!(
            subject(&p)
                .unwrap_err()
                .to_string()
                .contains("no Subject line")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_series_lists_patches_that_exist_and_the_rust_object_s_module_path() {
        let patches = series().unwrap();
        assert!(patches.len() >= 6);
        for p in &patches {
            assert!(subject(p).unwrap().contains(':'), "{}", p.display());
        }
        // The module path the Rust object declares is where install_decision copies to.
        let rust = patches
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .find(|t| t.contains("tdp_share_check.rs"))
            .unwrap();
        assert!(rust.contains("#[path = \"tdp_share/decision/mod.rs\"]"));
    }
}
