//! `cargo xtask lab record-boot`: a real Linux boot's memslot and root history, recorded
//! under nested KVM (docs/lab.md, "A real Linux boot").
//!
//! This machine's KVM cannot boot Linux, and QEMU's memslot trace fires only with KVM: so the
//! lab's L1 (the series' kernel under TCG, KVM on NPT) runs Debian's own QEMU with
//! `-enable-kvm` from a Debian root filesystem on a virtio disk, and the probes record what the
//! L1's KVM does while QEMU boots an L2 — twice: SeaBIOS alone (no boot device), then a Debian
//! kernel to its first userspace instruction. The difference between the two is what Linux
//! adds. The cache keeps the root filesystem (`mmdebstrap`), the L2 kernel (Debian's
//! `linux-image-amd64`) and the L2 initramfs; `--save NAME` turns a recording into the
//! project's fixtures and a simulator scenario.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::ValueEnum;

use crate::kernel::{self, Config, cache_dir, timed};
use crate::lab::{self, Boot};
use crate::{ensure_apt, output, root, run};

/// How the root filesystem is made: Debian 12 with its QEMU and busybox.
const DEBOOTSTRAP: [&str; 3] = [
    "--variant=essential",
    "--include=qemu-system-x86,busybox-static",
    "bookworm",
];
/// The root filesystem image's size (the tree is ~300 MB).
const IMAGE_SIZE: &str = "1G";
/// The L2 kernel: Debian's current one.
const L2_KERNEL_PACKAGE: &str = "linux-image-amd64";
/// What the L2's init prints once the kernel handed over to userspace.
const L2_MARKER: &str = "TDPSHARE-L2: up";
/// What SeaBIOS prints when it ran out of boot devices (on its debug port, 0x402).
const SEABIOS_MARKER: &str = "No bootable device";
/// The event types a saved fixture keeps: the memslot, root and MMU-context history.
const FIXTURE_TYPES: [&str; 10] = [
    "memslot_add",
    "memslot_delete",
    "memslot_move",
    "memslot_flags",
    "root_alloc",
    "root_free",
    "fast_zap",
    "smm_transition",
    "cr_write",
    "sharing_requested",
];
/// L1 boots tried: QEMU 7.2's nested SVM under TCG now and then delivers an exception of the L2
/// (an int3 as the L2's kernel patches its text) to the L1, whose kernel then dies with an
/// "Oops: int3" in `kvm_arch_vcpu_ioctl_run` (seen 2 times in 5 record-boot runs).
const L1_ATTEMPTS: u32 = 3;

/// Whether a failed L1 boot's report shows its kernel died (as opposed to a hang or an error
/// of the command, which a new boot would not fix).
fn l1_kernel_died(report: &str) -> bool {
    report.contains("Kernel panic") || report.contains("Oops:")
}

/// The L1's memory beyond the L2's: its kernel, QEMU, the recorder's buffers.
const L1_OVERHEAD_MIB: u64 = 2048;

/// The L2's machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Machine {
    Q35,
    Pc,
}

impl Machine {
    fn name(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
        }
    }
}

/// What `lab record-boot` is asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// L2 memory in MiB.
    pub mem_mib: u64,
    pub machine: Machine,
    /// The L2 has the default VGA (std); `false`: none.
    pub vga: bool,
    /// The L2's chipset emulates SMM (QEMU's default).
    pub smm: bool,
    pub vcpus: u32,
    /// Pass the L1's edu through to the L2 (vfio-pci), as the VMs that share tables have a
    /// device: its BAR is a memslot the guest's PCI enumeration toggles, and VFIO maps and
    /// pins guest RAM.
    pub device: bool,
    /// The whole L1 run's limit.
    pub timeout: Duration,
    /// Save the recording as `fixtures/…/linux-boot-NAME.*` and
    /// `kmod/scenarios/linux-boot-NAME.toml`.
    pub save: Option<String>,
}

impl Options {
    /// The run's label: `q35-8g`, `pc-2g-novga-nosmm`.
    fn label(&self) -> String {
        let mut label = format!("{}-{}", self.machine.name(), mem_label(self.mem_mib));
        if !self.vga {
            label.push_str("-novga");
        }
        if !self.smm {
            label.push_str("-nosmm");
        }
        if !self.device {
            label.push_str("-nodev");
        }
        label
    }

    /// The L2's QEMU, common to both phases (run in the root filesystem).
    fn qemu(&self) -> String {
        let mut machine = String::from(self.machine.name());
        if !self.smm {
            machine.push_str(",smm=off");
        }
        format!(
            "chroot /rootfs qemu-system-x86_64 -enable-kvm -machine {machine} -smp {} -m {}M \
             -nographic -nodefaults -vga {} -no-reboot -trace 'kvm_set_user_memory*'{}",
            self.vcpus,
            self.mem_mib,
            if self.vga { "std" } else { "none" },
            if self.device {
                " -device vfio-pci,host=$EDU"
            } else {
                ""
            }
        )
    }
}

fn mem_label(mib: u64) -> String {
    if mib.is_multiple_of(1024) {
        format!("{}g", mib / 1024)
    } else {
        format!("{mib}m")
    }
}

fn dir() -> PathBuf {
    cache_dir().join("record-boot")
}

/// The Debian root filesystem image (built once; rebuilt when the recipe changes), and the
/// version of its QEMU.
fn rootfs() -> anyhow::Result<(PathBuf, String)> {
    let image = dir().join("rootfs.img");
    let recipe_path = dir().join("rootfs.recipe");
    let version_path = dir().join("rootfs.qemu-version");
    let recipe = format!("mmdebstrap {}", DEBOOTSTRAP.join(" "));
    let cached = std::fs::read_to_string(&recipe_path).unwrap_or_default();
    if image.exists() && cached.trim() == recipe {
        let version = std::fs::read_to_string(&version_path).unwrap_or_default();
        println!("present: {} ({recipe})", image.display());
        return Ok((image, version.trim().to_owned()));
    }
    ensure_apt(&["mmdebstrap", "e2fsprogs"])?;
    let tree = dir().join("rootfs");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    std::fs::create_dir_all(dir())?;
    timed("root filesystem", || {
        run(Command::new("mmdebstrap").args(DEBOOTSTRAP).arg(&tree))
    })?;
    let version = output(
        Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                tree.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f=${Version}", "qemu-system-x86"]),
    )?;
    // Mount points the L1 binds into it.
    std::fs::create_dir_all(tree.join("lab"))?;
    let partial = image.with_extension("img.partial");
    timed("image", || {
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&partial)
            .arg(IMAGE_SIZE))
    })?;
    std::fs::rename(&partial, &image)?;
    std::fs::remove_dir_all(&tree)?;
    std::fs::write(&version_path, &version)?;
    std::fs::write(&recipe_path, &recipe)?;
    println!("built: {} (QEMU {version})", image.display());
    Ok((image, version))
}

/// Debian's kernel for the L2 (`/boot/vmlinuz-*` of `linux-image-amd64`'s current
/// dependency), and its package and version; `cargo xtask bench` boots it too.
pub(crate) fn l2_kernel() -> anyhow::Result<(PathBuf, String)> {
    let kernel = dir().join("l2/vmlinuz");
    let version_path = dir().join("l2/kernel.version");
    if kernel.exists() && version_path.exists() {
        let version = std::fs::read_to_string(&version_path)?;
        println!("present: {} ({})", kernel.display(), version.trim());
        return Ok((kernel, version.trim().to_owned()));
    }
    let depends = output(Command::new("apt-cache").args(["depends", L2_KERNEL_PACKAGE]))?;
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
        .map(|p| format!("linux-image-{p}"))
        .with_context(|| format!("no linux-image dependency of {L2_KERNEL_PACKAGE}"))?;
    let work = dir().join("l2/download");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    run(Command::new("apt-get")
        .current_dir(&work)
        .args(["download", &package]))?;
    let deb = std::fs::read_dir(&work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let version = output(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?;
    run(Command::new("sh").current_dir(&work).arg("-c").arg(format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x ./boot",
        deb.display()
    )))?;
    let vmlinuz = std::fs::read_dir(work.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{} has no /boot/vmlinuz-*", deb.display()))?;
    std::fs::rename(&vmlinuz, &kernel)?;
    std::fs::remove_dir_all(&work)?;
    let version = format!("{package} {}", version.trim());
    std::fs::write(&version_path, &version)?;
    println!("fetched: {} ({version})", kernel.display());
    Ok((kernel, version))
}

/// A busybox initramfs whose init prints `marker` (and the uptime) and powers off: the end of
/// a boot that reached userspace. Built in `tree`, packed at `image`.
pub(crate) fn marker_initramfs(tree: &Path, image: &Path, marker: &str) -> anyhow::Result<()> {
    if tree.exists() {
        std::fs::remove_dir_all(tree)?;
    }
    for d in ["bin", "proc", "dev"] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
        .context("copying /bin/busybox (Debian's busybox-static)")?;
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
         echo \"{marker} $(/bin/busybox cut -d' ' -f1 /proc/uptime) s\"\n\
         /bin/busybox poweroff -f\n"
    );
    kernel::pack_initramfs(tree, &init, image)
}

/// The L2's initramfs: the marker, then power off.
fn l2_initramfs() -> anyhow::Result<PathBuf> {
    let image = dir().join("l2/initramfs.cpio.gz");
    marker_initramfs(&dir().join("l2/initramfs"), &image, L2_MARKER)?;
    Ok(image)
}

/// The L1's script: the root filesystem mounted read-only with the L1's /dev, /proc, /sys and
/// the share bound in, then each phase under the recorder.
fn script(opts: &Options) -> String {
    let qemu = opts.qemu();
    let device = u8::from(opts.device);
    format!(
        r#"set -u
mkdir -p /rootfs
mount -t ext4 -o ro /dev/vda /rootfs || {{ echo "RECORD: cannot mount /dev/vda"; exit 2; }}
mount -t tmpfs tmpfs /rootfs/tmp
mount -o bind /dev /rootfs/dev
mount -t proc proc /rootfs/proc
mount -o bind /sys /rootfs/sys
mount -o bind /lab /rootfs/lab
echo "RECORD: L1 $(uname -r), $(nproc) vCPUs, $(grep MemTotal /proc/meminfo)"
EDU=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = 0x1234 ] && [ "$(cat $d/device)" = 0x11e8 ]; then EDU=${{d##*/}}; fi
done
if [ {device} = 1 ]; then
    [ -n "$EDU" ] || {{ echo "RECORD: no edu device in the L1"; exit 2; }}
    echo vfio-pci > /sys/bus/pci/devices/$EDU/driver_override
    [ -e /sys/bus/pci/devices/$EDU/driver ] && echo $EDU > /sys/bus/pci/devices/$EDU/driver/unbind
    echo $EDU > /sys/bus/pci/drivers_probe
    echo "RECORD: edu $EDU passed through, IOMMU group $(basename $(readlink /sys/bus/pci/devices/$EDU/iommu_group))"
fi
cat /sys/module/kvm_amd/parameters/npt /sys/module/kvm/parameters/tdp_mmu 2>/dev/null | tr '\n' ' '
echo
status=0
mkdir -p /lab/seabios /lab/linux
/bin/tdpshare-lab record --out /lab/seabios --watch /lab/seabios/console \
    --marker '{SEABIOS_MARKER}' --stop-at-marker --timeout 300 -- \
    {qemu} -D /lab/seabios/qemu.trace \
    -chardev file,id=dbg,path=/lab/seabios/console -device isa-debugcon,iobase=0x402,chardev=dbg \
    || status=1
/bin/tdpshare-lab record --out /lab/linux --watch /lab/linux/console \
    --marker '{L2_MARKER}' --timeout 900 -- \
    {qemu} -D /lab/linux/qemu.trace -serial file:/lab/linux/console \
    -kernel /lab/l2/vmlinuz -initrd /lab/l2/initramfs.cpio.gz -append 'console=ttyS0 panic=-1' \
    || status=1
exit $status
"#
    )
}

/// `cargo xtask lab record-boot`.
pub fn record_boot(opts: &Options) -> anyhow::Result<()> {
    ensure!(opts.vcpus >= 1, "--vcpus must be at least 1");
    ensure!(
        opts.mem_mib >= 128,
        "--mem must be at least 128M for a Linux L2"
    );
    let start = Instant::now();
    kernel::fetch()?;
    kernel::patches_apply()?;
    kernel::build(Config::Lab)?;
    lab::build()?;
    // The host side turns the recording into fixtures with the analyzer: never a stale one.
    run(Command::new(env!("CARGO")).current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "tdpshare-analysis",
    ]))?;
    let (image, qemu_version) = rootfs()?;
    let (l2_kernel, l2_version) = l2_kernel()?;
    let l2_initrd = l2_initramfs()?;
    let label = opts.label();
    let name = format!("record-boot-{label}");
    let boot = Boot {
        config: Config::Lab,
        mem_mib: opts.mem_mib + L1_OVERHEAD_MIB,
        smp: opts.vcpus.max(2),
        scalable: false,
        disk: Some(image),
        timeout: opts.timeout,
        command: "sh /lab/record.sh".into(),
        name: name.clone(),
    };
    let mut attempt = 1;
    let outcome = loop {
        let result = lab::boot_with(&boot, |dir| {
            std::fs::create_dir_all(dir.join("l2"))?;
            std::fs::copy(&l2_kernel, dir.join("l2/vmlinuz"))?;
            std::fs::copy(&l2_initrd, dir.join("l2/initramfs.cpio.gz"))?;
            std::fs::write(dir.join("record.sh"), script(opts))?;
            Ok(())
        });
        match result {
            Ok(outcome) => break outcome,
            Err(e) if attempt < L1_ATTEMPTS && l1_kernel_died(&format!("{e:#}")) => {
                // Keep the dead L1's console: the next boot empties the results directory.
                let kept = cache_dir()
                    .join("lab")
                    .join(format!("{name}-died-{attempt}.log"));
                let _ = std::fs::copy(
                    cache_dir().join("lab").join(&name).join("console.log"),
                    &kept,
                );
                println!(
                    "record-boot: the L1 kernel died (attempt {attempt} of {L1_ATTEMPTS}; \
                     console kept in {}); booting it again",
                    kept.display()
                );
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let l1_release = outcome
        .console
        .lines()
        .find_map(|l| l.split_once("LAB: booted ").map(|(_, r)| r.to_owned()))
        .and_then(|r| r.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    let results = outcome.results.clone();
    for phase in ["seabios", "linux"] {
        if let Ok(summary) = std::fs::read_to_string(results.join(phase).join("summary.txt")) {
            println!("\n{phase}:\n{summary}");
        }
    }
    ensure!(
        outcome.status == 0,
        "a phase did not reach its marker (status {}): see {}",
        outcome.status,
        results.display()
    );
    let provenance = Provenance {
        command: command_line(opts),
        l1: format!(
            "the series' kernel {l1_release} (cargo xtask kernel build) under QEMU {} TCG, -cpu max \
             (SVM+NPT), {} vCPUs, {} MiB",
            host_qemu_version(),
            boot.smp,
            boot.mem_mib
        ),
        l2: format!(
            "Debian's qemu-system-x86 {qemu_version}: {}; {l2_version} with a busybox init \
             that powers off",
            opts.qemu()
                .trim_start_matches("chroot /rootfs ")
                .replace(" -trace 'kvm_set_user_memory*'", "")
                .replace("host=$EDU", "host=<the L1's edu>")
        ),
    };
    let mut summary = Vec::new();
    for phase in ["seabios", "linux"] {
        let dir = results.join(phase);
        let memslots = dir.join("qemu-memslots.jsonl");
        let imported = output(
            Command::new(root().join("target/release/tdpshare-analyze"))
                .arg("import-qemu")
                .arg(dir.join("qemu.trace"))
                .arg("-o")
                .arg(&memslots)
                .args(["--start-unix-ns", "0"]),
        )?;
        let history = dir.join("history.jsonl");
        let mut filter = Command::new(root().join("target/release/tdpshare-analyze"));
        filter
            .arg("filter")
            .arg(dir.join("trace.jsonl"))
            .arg("-o")
            .arg(&history);
        for t in FIXTURE_TYPES {
            filter.args(["--type", t]);
        }
        let kept = output(&mut filter)?;
        summary.push(format!(
            "{phase}: QEMU {} ; probes {}",
            imported.trim(),
            kept.trim()
        ));
    }
    println!(
        "\nrecord-boot {label}: {:.0} s in all ({:.0} s in the L1)",
        start.elapsed().as_secs_f64(),
        outcome.wall.as_secs_f64()
    );
    for line in &summary {
        println!("  {line}");
    }
    if let Some(save) = &opts.save {
        save_fixture(save, &results, &provenance)?;
    }
    Ok(())
}

/// Where a recording came from.
struct Provenance {
    command: String,
    l1: String,
    l2: String,
}

fn command_line(opts: &Options) -> String {
    let mut cmd = format!(
        "cargo xtask lab record-boot --mem {} --machine {} --vcpus {}",
        mem_label(opts.mem_mib).to_uppercase(),
        opts.machine.name(),
        opts.vcpus
    );
    if !opts.vga {
        cmd.push_str(" --no-vga");
    }
    if !opts.smm {
        cmd.push_str(" --no-smm");
    }
    if !opts.device {
        cmd.push_str(" --no-device");
    }
    if let Some(save) = &opts.save {
        cmd.push_str(&format!(" --save {save}"));
    }
    cmd
}

fn host_qemu_version() -> String {
    output(Command::new("qemu-system-x86_64").arg("--version"))
        .ok()
        .and_then(|v| {
            v.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into())
}

/// Copies a recording into the tree: QEMU's memslot trace of each phase, the probes' history
/// of each phase, and a scenario replaying the Linux boot's history, headed by where it came
/// from.
fn save_fixture(name: &str, results: &Path, provenance: &Provenance) -> anyhow::Result<()> {
    ensure!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
        "--save takes a name of lowercase letters, digits and dashes, not {name:?}"
    );
    let mut written = Vec::new();
    for phase in ["seabios", "linux"] {
        let dir = results.join(phase);
        let qemu = root().join(format!(
            "fixtures/qemu-memslots/linux-boot-{name}.{phase}.trace"
        ));
        std::fs::copy(dir.join("qemu.trace"), &qemu)?;
        let history = root().join(format!("fixtures/traces/linux-boot-{name}.{phase}.jsonl"));
        std::fs::copy(dir.join("history.jsonl"), &history)?;
        written.push(qemu);
        written.push(history);
    }
    let history = root().join(format!("fixtures/traces/linux-boot-{name}.linux.jsonl"));
    let toml = output(
        Command::new(root().join("target/release/tdpshare-analyze"))
            .arg("scenario")
            .arg(&history)
            .args(["--name", &format!("linux-boot-{name}")]),
    )?;
    let header = format!(
        "# A real Linux boot's memslot, root, SMM and control-register history, recorded in the lab.\n\
         #\n\
         # Recorded by `{}`\n\
         # (docs/lab.md, \"A real Linux boot\"): the probes in an L1 running\n\
         #   {}\n\
         # while it ran\n\
         #   {}\n\
         # Fixture: fixtures/traces/linux-boot-{name}.linux.jsonl (QEMU's own memslot trace of the\n\
         # same boot: fixtures/qemu-memslots/linux-boot-{name}.linux.trace; SeaBIOS alone: *.seabios.*).\n\
         # Generated by `tdpshare-analyze scenario`; a test checks it still matches the fixture.\n",
        provenance.command, provenance.l1, provenance.l2
    );
    // Every design side by side: the 2023 one needs a device that takes IO page faults (edu
    // takes none; the memslot and root history does not depend on it).
    ensure!(
        toml.contains("device_iopf = false\n"),
        "the generated scenario has no `device_iopf = false` line to turn on"
    );
    let toml = toml.replacen(
        "device_iopf = false\n",
        "# As if the device took IO page faults, so the 2023 design runs too (edu takes none).\n\
         device_iopf = true\n",
        1,
    );
    let scenario = root().join(format!("kmod/scenarios/linux-boot-{name}.toml"));
    let partial = scenario.with_extension("toml.partial");
    std::fs::write(&partial, format!("{header}{toml}"))?;
    std::fs::rename(&partial, &scenario)?;
    written.push(scenario);
    println!("saved:");
    for w in &written {
        println!("  {}", w.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            mem_mib: 8192,
            machine: Machine::Q35,
            vga: true,
            smm: true,
            vcpus: 2,
            device: true,
            timeout: Duration::from_secs(1),
            save: None,
        }
    }

    #[test]
    fn labels_name_what_differs_from_the_default() {
        assert_eq!(opts().label(), "q35-8g");
        let o = Options {
            mem_mib: 2000,
            machine: Machine::Pc,
            vga: false,
            smm: false,
            ..opts()
        };
        assert_eq!(o.label(), "pc-2000m-novga-nosmm");
    }

    #[test]
    fn the_l2_command_follows_the_options() {
        let q = opts().qemu();
        assert!(q.contains("-machine q35 ") && q.contains("-m 8192M") && q.contains("-vga std"));
        assert!(q.ends_with(" -device vfio-pci,host=$EDU"));
        let o = Options {
            vga: false,
            smm: false,
            device: false,
            ..opts()
        };
        let q = o.qemu();
        assert!(q.contains("-machine q35,smm=off ") && q.contains("-vga none"));
        assert!(!q.contains("vfio-pci"));
        assert_eq!(o.label(), "q35-8g-novga-nosmm-nodev");
    }

    #[test]
    fn only_a_dead_l1_kernel_is_booted_again() {
        assert!(l1_kernel_died(
            "the L1 ended (exit status: 0) before the command finished; last serial lines:\n\
             [ 39.03] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n\
             [ 40.71] Kernel panic - not syncing: Fatal exception in interrupt"
        ));
        assert!(!l1_kernel_died(
            "the L1 did not finish within 2400 s (QEMU killed); last serial lines:\nrecord: ..."
        ));
    }

    #[test]
    fn a_bad_fixture_name_is_refused() {
        let dir = Path::new("/nonexistent");
        let p = Provenance {
            command: String::new(),
            l1: String::new(),
            l2: String::new(),
        };
        let err = save_fixture("../x", dir, &p).unwrap_err();
        assert!(err.to_string().contains("lowercase letters"), "{err}");
    }
}
