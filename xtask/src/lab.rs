//! The lab: `cargo xtask lab build|run|test` (docs/lab.md).
//!
//! An L1 under QEMU TCG — `-cpu max` (AMD SVM with NPT, so KVM in it runs the TDP MMU), an
//! emulated VT-d, QEMU's `edu` DMA device — booting the kernel `xtask kernel build` made, with
//! an initramfs of busybox and the project's own programs. A command runs in it; its results
//! leave through a 9p share (a directory of the cache); the L1 powers off.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::kernel::{self, Config, cache_dir};
use crate::{has_command, output, root, run};

/// The programs the initramfs carries, by package.
const PROGRAMS: [(&str, &str); 3] = [
    ("tdpshare-guest", "tdpshare-lab"),
    ("tdpshare-probes", "tdpshare-probe"),
    ("sharetop", "sharetop"),
];
/// The memslot sequences the initramfs carries (`/fixtures`).
const FIXTURES: [&str; 3] = [
    "fixtures/traces/seabios-q35-64m.jsonl",
    "fixtures/traces/seabios-pc-2g.jsonl",
    "fixtures/traces/seabios-pc-8g.jsonl",
];
/// The sequence `lab test` replays: SeaBIOS on a 64 MiB q35, recorded on this machine kind.
const TEST_MEMSLOTS: &str = "/fixtures/seabios-q35-64m.jsonl";
/// The 9p share's tag.
const SHARE_TAG: &str = "lab";
/// The serial lines shown when the L1 dies.
const LAST_LINES: usize = 25;

fn initramfs_path() -> PathBuf {
    cache_dir().join("lab-initramfs.cpio.gz")
}

/// What a command leaves: the shared directory.
fn results_dir(name: &str) -> PathBuf {
    cache_dir().join("lab").join(name)
}

/// The shared libraries `binary` loads (ldd's resolved paths, the loader included).
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(binary))?;
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libelf.so.1 => /lib/x86_64-linux-gnu/libelf.so.1 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Copies `from` to the same absolute path under `dir` (following links).
fn copy_into(dir: &Path, from: &Path) -> anyhow::Result<()> {
    let to = dir.join(from.strip_prefix("/").unwrap_or(from));
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(from, &to)
        .with_context(|| format!("copying {} into the initramfs", from.display()))?;
    Ok(())
}

/// The init script: filesystems, the share, the command, its status, power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mkdir -p /lab
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 lab /lab; then
    echo "LAB: cannot mount the results share"
    poweroff -f
fi
echo "LAB: booted $(uname -r) in $(cut -d' ' -f1 /proc/uptime) s"
cd /lab
sh /lab/cmd.sh
echo $? > /lab/status
echo "LAB: command finished with status $(cat /lab/status) at $(cut -d' ' -f1 /proc/uptime) s"
sync
poweroff -f
"#;

/// `cargo xtask lab build`: the project's programs (release) and busybox in an initramfs.
pub fn build() -> anyhow::Result<PathBuf> {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.current_dir(root()).args(["build", "--release"]);
    for (package, _) in PROGRAMS {
        cargo.args(["-p", package]);
    }
    run(&mut cargo)?;
    let dir = cache_dir().join("lab-initramfs");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    for d in ["bin", "proc", "sys", "dev", "tmp", "fixtures"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("copying /bin/busybox (Debian's busybox-static)")?;
    for (_, program) in PROGRAMS {
        let binary = root().join("target/release").join(program);
        std::fs::copy(&binary, dir.join("bin").join(program))
            .with_context(|| format!("copying {}", binary.display()))?;
        for lib in shared_libraries(&binary)? {
            copy_into(&dir, &lib)?;
        }
    }
    for f in FIXTURES {
        let from = root().join(f);
        let name = from.file_name().context("a fixture name")?;
        std::fs::copy(&from, dir.join("fixtures").join(name))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    let image = initramfs_path();
    kernel::pack_initramfs(&dir, INIT, &image)?;
    let size = std::fs::metadata(&image)?.len();
    println!(
        "built: {} ({:.1} MiB)",
        image.display(),
        size as f64 / (1 << 20) as f64
    );
    Ok(image)
}

/// One L1 boot.
#[derive(Debug, Clone)]
pub struct Boot {
    pub config: Config,
    /// L1 memory in MiB.
    pub mem_mib: u64,
    /// L1 vCPUs.
    pub smp: u32,
    /// The VT-d in scalable mode (else legacy).
    pub scalable: bool,
    /// A disk image the L1 sees as /dev/vda (read-only: the L1 mounts it, never writes it).
    pub disk: Option<PathBuf>,
    pub timeout: Duration,
    /// The shell command to run.
    pub command: String,
    /// The results directory's name under the cache's `lab/`.
    pub name: String,
}

/// What a boot gave.
#[derive(Debug)]
pub struct Outcome {
    /// The command's exit status.
    pub status: i32,
    pub console: String,
    pub results: PathBuf,
    pub wall: Duration,
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Boots the L1 and runs `boot.command`; the console is echoed as it comes. Fails with the
/// last serial lines when the L1 dies or hangs (QEMU, which this started, is killed).
pub fn boot(boot: &Boot) -> anyhow::Result<Outcome> {
    boot_with(boot, |_| Ok(()))
}

/// [`boot`], with `prepare` filling the results directory (the L1's `/lab`) first.
pub fn boot_with(
    boot: &Boot,
    prepare: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<Outcome> {
    ensure!(
        has_command("qemu-system-x86_64", "--version"),
        "qemu-system-x86_64 is missing: run `cargo xtask kernel fetch`"
    );
    let kernel = kernel::bzimage(boot.config);
    ensure!(
        kernel.exists(),
        "no {} kernel at {}: run `cargo xtask kernel build --config {}`",
        boot.config.name(),
        kernel.display(),
        boot.config.name()
    );
    let initrd = initramfs_path();
    ensure!(
        initrd.exists(),
        "no lab initramfs at {}: run `cargo xtask lab build`",
        initrd.display()
    );
    let results = results_dir(&boot.name);
    if results.exists() {
        std::fs::remove_dir_all(&results)?;
    }
    std::fs::create_dir_all(&results)?;
    std::fs::write(results.join("cmd.sh"), format!("{}\n", boot.command))?;
    prepare(&results)?;
    let mut append = String::from("console=ttyS0 intel_iommu=on panic=-1 no5lvl");
    if boot.config != Config::Stock {
        // The series' VT-d claims NPT-format tables only when told it is QEMU's model.
        append.push_str(" intel_iommu_tdp_emulated=1");
    }
    let mut iommu = String::from("intel-iommu,intremap=on,aw-bits=48,snoop-control=on");
    if boot.scalable {
        iommu.push_str(",x-scalable-mode=on");
    }
    let mut qemu = Command::new("qemu-system-x86_64");
    // -cpu max under TCG: AMD SVM with NPT; aw-bits=48 (7.2's default is 39) and no5lvl in
    // the L1 (its VT-d cannot walk 5-level tables); edu's DMA mask widened to 48 bits.
    qemu.args(["-accel", "tcg", "-cpu", "max"])
        .args(["-smp", &boot.smp.to_string()])
        .args(["-m", &format!("{}M", boot.mem_mib)])
        .args(["-machine", "q35,kernel-irqchip=split"])
        .args(["-device", &iommu])
        .args(["-device", "edu,dma_mask=0xffffffffffff"])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag={SHARE_TAG},security_model=none,id={SHARE_TAG}",
            results.display()
        ))
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append]);
    if let Some(disk) = &boot.disk {
        qemu.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            disk.display()
        ));
    }
    qemu.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    println!("+ {qemu:?}");
    let start = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for stream in [
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
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut console = String::new();
    let log_path = results.join("console.log");
    let finished = loop {
        while let Ok(line) = rx.try_recv() {
            let line = line.trim_end_matches('\r').to_owned();
            println!("| {line}");
            console.push_str(&line);
            console.push('\n');
        }
        if let Some(status) = child.try_wait()? {
            // Whatever is still in the pipes.
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                println!("| {line}");
                console.push_str(line.trim_end_matches('\r'));
                console.push('\n');
            }
            break Some(status);
        }
        if start.elapsed() > boot.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let wall = start.elapsed();
    std::fs::write(&log_path, &console)?;
    let Some(qemu_status) = finished else {
        bail!(
            "the L1 did not finish within {} s (QEMU killed); last serial lines:\n{}\n(console: {})",
            boot.timeout.as_secs(),
            last_lines(&console, LAST_LINES),
            log_path.display()
        );
    };
    let status = std::fs::read_to_string(results.join("status"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let Some(status) = status else {
        bail!(
            "the L1 ended ({qemu_status}) before the command finished; last serial lines:\n{}\n\
             (console: {})",
            last_lines(&console, LAST_LINES),
            log_path.display()
        );
    };
    println!(
        "lab: {} kernel, command status {status}, {:.1} s wall; results in {}",
        boot.config.name(),
        wall.as_secs_f64(),
        results.display()
    );
    Ok(Outcome {
        status,
        console,
        results,
        wall,
    })
}

/// `cargo xtask lab run`: one command in the L1.
pub fn run_command(boot_spec: &Boot) -> anyhow::Result<()> {
    let outcome = boot(boot_spec)?;
    ensure!(
        outcome.status == 0,
        "the command exited with status {} in the L1",
        outcome.status
    );
    Ok(())
}

/// The lab VMM's command line in the L1, results in the share.
pub(crate) fn lab_command(scalable: bool) -> String {
    format!(
        "/bin/tdpshare-lab test --memslots {TEST_MEMSLOTS} --out /lab \
         --recorder /bin/tdpshare-probe{}",
        if scalable { " --scalable" } else { "" }
    )
}

/// `cargo xtask lab test`: the kernels (an incremental build, nothing when up to date), the
/// initramfs, the lab VMM on the series' kernel (VT-d scalable mode, then legacy mode) and on
/// the stock kernel; the recorded trace replayed by sharetop on this machine.
pub fn test(mem_mib: u64, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    kernel::fetch()?;
    kernel::patches_apply()?;
    kernel::build(Config::Lab)?;
    kernel::build(Config::Stock)?;
    build()?;
    let runs = [
        (Config::Lab, true, "series-scalable"),
        (Config::Lab, false, "series-legacy"),
        (Config::Stock, true, "stock-scalable"),
    ];
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for (config, scalable, name) in runs {
        println!("\n=== lab: {name} ===");
        let spec = Boot {
            config,
            mem_mib,
            smp: 1,
            scalable,
            disk: None,
            timeout,
            command: lab_command(scalable),
            name: name.to_string(),
        };
        let outcome = boot(&spec)?;
        let verdict = outcome
            .console
            .lines()
            .rev()
            .find(|l| l.contains("TDPSHARE-LAB:"))
            .unwrap_or("no TDPSHARE-LAB line")
            .trim()
            .to_owned();
        summary.push(format!(
            "{name:<16} {:>6.1} s  {verdict}",
            outcome.wall.as_secs_f64()
        ));
        if outcome.status != 0 {
            failed.push(name);
        }
        let trace = outcome.results.join("trace.jsonl");
        if trace.exists() {
            println!("\nsharetop --replay {} --once:", trace.display());
            run(Command::new(root().join("target/release/sharetop"))
                .arg("--replay")
                .arg(&trace)
                .arg("--once"))?;
        }
    }
    println!(
        "\nlab test ({:.0} s in all):",
        start.elapsed().as_secs_f64()
    );
    for line in &summary {
        println!("  {line}");
    }
    if !failed.is_empty() {
        bail!("the lab failed: {}", failed.join(", "));
    }
    Ok(())
}
