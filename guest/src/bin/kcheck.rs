//! `tdpshare-kcheck`: the boot check of a kernel built with the sharing series. It runs inside
//! that kernel (the initramfs's `/init` starts it) and checks, printing one line per check and a
//! summary line last:
//!
//! - the series' tracepoints exist (`tdpshare:*`, `amd_iommu:flush_pages`);
//! - `KVM_CAP_TDP_SHARE` is offered;
//! - `KVM_TDP_SHARE_REQUEST` refuses each bad configuration with exactly the refusal code
//!   tdpshare's model gives for the same VM and IOMMU (the model is the oracle), with the
//!   reasons in words;
//! - a good configuration is granted once (a second request is busy), with the format the model
//!   negotiates;
//! - pinning and pre-population work while granted, and pre-population is traced;
//! - dirty logging is refused while sharing and allowed again after `KVM_TDP_SHARE_STOP`.
//!
//! Exit status 0 when every check passed.

use std::ffi::CString;
use std::io::Write;
use std::process::ExitCode;

use tdpshare::decision::caps::{IommuCaps, KvmCaps, LevelSet, Walks};
use tdpshare::decision::format::{Kind, Layout};
use tdpshare::decision::iommu::IommuMode;
use tdpshare::decision::kvm::KvmKernel;
use tdpshare::decision::policy::ShareMode;
use tdpshare::decision::prereq::{self, SlotsNamed, VIommu, VmFacts};

use tdpshare_guest::sys::{Report, errno, ioctl, ioctl_val};
use tdpshare_guest::uapi::*;

const TRACING: &str = "/sys/kernel/tracing";
/// Guest memory of the test VM: 64 MiB at guest physical 0.
const MEM: usize = 64 << 20;

/// A VM with 64 MiB of anonymous memory in slot 0 and one vCPU.
struct Vm {
    fd: i32,
    vcpu: i32,
    mem: *mut libc::c_void,
}

impl Vm {
    fn new(kvm: i32) -> Result<Vm, String> {
        let fd =
            ioctl_val(kvm, KVM_CREATE_VM, 0).map_err(|e| format!("KVM_CREATE_VM: errno {e}"))?;
        // SAFETY: an anonymous private mapping; the result is checked.
        let mem = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(format!("mmap: errno {}", errno()));
        }
        // Owned (and closed on every exit path) from here on.
        let mut vm = Vm { fd, vcpu: -1, mem };
        vm.set_slot(0)?;
        vm.vcpu =
            ioctl_val(fd, KVM_CREATE_VCPU, 0).map_err(|e| format!("KVM_CREATE_VCPU: errno {e}"))?;
        Ok(vm)
    }

    fn set_slot(&self, flags: u32) -> Result<(), String> {
        let mut region = UserMemoryRegion {
            slot: 0,
            flags,
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: self.mem as u64,
        };
        // SAFETY: a struct kvm_userspace_memory_region, what KVM_SET_USER_MEMORY_REGION takes.
        unsafe { ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, &mut region) }
            .map(|_| ())
            .map_err(|e| format!("errno {e}"))
    }

    fn request(&self, req: &mut TdpShare) -> Result<i32, i32> {
        // SAFETY: a struct kvm_tdp_share, what KVM_TDP_SHARE_REQUEST takes.
        unsafe { ioctl(self.fd, KVM_TDP_SHARE_REQUEST, req) }
    }

    /// Offers VMX/SVM to the guest in vCPU 0's CPUID (nested virtualization).
    fn expose_nested(&self, kvm: i32) -> Result<(), String> {
        let mut cpuid = Cpuid2::<256> {
            nent: 256,
            padding: 0,
            entries: [CpuidEntry2::default(); 256],
        };
        // SAFETY: a struct kvm_cpuid2 whose nent says how many entries follow.
        unsafe { ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &mut cpuid) }
            .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: errno {e}"))?;
        let n = cpuid.nent as usize;
        let nested = cpuid.entries[..n].iter().any(|e| {
            (e.function == 1 && e.ecx & (1 << 5) != 0)
                || (e.function == 0x8000_0001 && e.ecx & (1 << 2) != 0)
        });
        if !nested {
            return Err("KVM offers neither VMX nor SVM to guests (nested off)".into());
        }
        // SAFETY: a struct kvm_cpuid2 whose nent says how many entries follow.
        unsafe { ioctl(self.vcpu, KVM_SET_CPUID2, &mut cpuid) }
            .map_err(|e| format!("KVM_SET_CPUID2: errno {e}"))?;
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: closing descriptors and unmapping the mapping this VM owns.
        unsafe {
            libc::close(self.vcpu);
            libc::close(self.fd);
            libc::munmap(self.mem, MEM);
        }
    }
}

/// The IOMMU of the lab: QEMU's VT-d, scalable mode, walking 4-level tables of both formats.
fn good_iommu() -> TdpShareIommu {
    TdpShareIommu {
        mode: IOMMU_VTD_SCALABLE,
        ept_levels: 1 << 4,
        npt_levels: 1 << 4,
        address_width: 48,
        flags: IOMMU_F_SP2M | IOMMU_F_SP1G | IOMMU_F_SNOOP | IOMMU_F_COHERENT,
    }
}

/// The model's view of the UAPI capabilities (as the kernel's Rust glue converts them).
fn model_caps(i: &TdpShareIommu) -> IommuCaps {
    let mode = match i.mode {
        0 => IommuMode::VtdLegacy,
        1 => IommuMode::VtdScalable,
        _ => IommuMode::AmdV2,
    };
    IommuCaps {
        name: "VT-d",
        mode,
        walks: Walks {
            ept: LevelSet::from_bits(i.ept_levels as u8),
            npt: LevelSet::from_bits(i.npt_levels as u8),
        },
        address_width: i.address_width as u8,
        superpage_2m: i.flags & IOMMU_F_SP2M != 0,
        superpage_1g: i.flags & IOMMU_F_SP1G != 0,
        snoop_control: i.flags & IOMMU_F_SNOOP != 0,
        coherent_walk: i.flags & IOMMU_F_COHERENT != 0,
        dirty_tracking: i.flags & (1 << 4) != 0,
        page_requests: i.flags & (1 << 5) != 0,
    }
}

/// The facts the kernel sees for a test VM: one vCPU, KVM's TDP format of this host.
fn model_facts(kind: Kind, nested: bool, viommu: VIommu, iopf: bool) -> VmFacts {
    VmFacts {
        tdp: true,
        nested_tdp_exposed: nested,
        viommu,
        kvm: KvmCaps {
            kind,
            levels: 4,
            max_huge_level: 3,
            layout: Layout::Sharing,
        },
        device_iopf: iopf,
        noncoherent_dma: false,
        vcpus: 1,
        guest_memfd: SlotsNamed::default(),
        kernel: KvmKernel::V6_12,
    }
}

/// The model's refusal code (0: granted) for a request.
fn model_code(req: &TdpShare, facts: &VmFacts) -> u32 {
    let Some(mode) = ShareMode::ALL.get(req.mode as usize) else {
        return R_INVALID;
    };
    match prereq::check(&mode.policy(), facts, &model_caps(&req.iommu)) {
        Ok(_) => 0,
        Err(r) => r.code(),
    }
}

fn tracepoints(report: &mut Report) {
    for (system, event) in [
        ("tdpshare", "prepopulate"),
        ("tdpshare", "root_update"),
        ("tdpshare", "iotlb_flush"),
        ("amd_iommu", "flush_pages"),
    ] {
        let path = format!("{TRACING}/events/{system}/{event}/format");
        let ok = std::path::Path::new(&path).exists();
        report.check(&format!("tracepoint {system}:{event}"), ok, &path);
    }
}

fn write_file(path: &str, text: &str) -> bool {
    std::fs::write(path, text).is_ok()
}

/// The bad configurations, each refused with the model's code.
fn refusals(report: &mut Report, kvm: i32, kind: Kind) -> Result<(), String> {
    type Edit = fn(&mut TdpShare);
    let cases: [(&str, Edit, bool, VIommu, bool); 7] = [
        (
            "an IOMMU that walks only EPT-format tables",
            |r| r.iommu.npt_levels = 0,
            false,
            VIommu::None,
            false,
        ),
        (
            "an IOMMU that walks only 5-level tables",
            |r| {
                r.iommu.ept_levels = 1 << 5;
                r.iommu.npt_levels = 1 << 5;
            },
            false,
            VIommu::None,
            false,
        ),
        (
            "an IOMMU without snoop control",
            |r| r.iommu.flags &= !IOMMU_F_SNOOP,
            false,
            VIommu::None,
            false,
        ),
        (
            "legacy VT-d claiming A/D bits",
            |r| {
                r.iommu.mode = 0;
                r.iommu.flags |= 1 << 4;
            },
            false,
            VIommu::None,
            false,
        ),
        (
            "a vIOMMU in shadow mode",
            |r| r.viommu = VIOMMU_SHADOW,
            false,
            VIommu::Shadow,
            false,
        ),
        (
            "IO-page-fault mode for a device without IO page faults",
            |r| r.mode = MODE_EXPORTED_IOPF,
            false,
            VIommu::None,
            false,
        ),
        (
            "an unknown mode",
            |r| r.mode = 7,
            false,
            VIommu::None,
            false,
        ),
    ];
    let vm = Vm::new(kvm)?;
    for (name, edit, nested, viommu, iopf) in cases {
        let mut req = TdpShare {
            mode: MODE_PINNED,
            iommu: good_iommu(),
            ..TdpShare::default()
        };
        edit(&mut req);
        let want = model_code(&req, &model_facts(kind, nested, viommu, iopf));
        let got = vm.request(&mut req);
        let ok = got == Err(libc::EACCES)
            && req.refusal == want
            && want != 0
            && !req.reason().is_empty();
        report.check(
            &format!("refused: {name}"),
            ok,
            format!(
                "code {:#x} (model {want:#x}): {}",
                req.refusal,
                req.reason()
            ),
        );
    }
    // Nested virtualization offered to the guest.
    let nested = Vm::new(kvm)?;
    match nested.expose_nested(kvm) {
        Ok(()) => {
            let mut req = TdpShare {
                mode: MODE_PINNED,
                iommu: good_iommu(),
                ..TdpShare::default()
            };
            let want = model_code(&req, &model_facts(kind, true, VIommu::None, false));
            let got = nested.request(&mut req);
            let ok = got == Err(libc::EACCES) && req.refusal == want && want != 0;
            report.check(
                "refused: VMX/SVM exposed to the guest",
                ok,
                format!(
                    "code {:#x} (model {want:#x}): {}",
                    req.refusal,
                    req.reason()
                ),
            );
        }
        Err(e) => report.check("refused: VMX/SVM exposed to the guest", false, e),
    }
    Ok(())
}

/// The good configuration: granted once, then pinning, pre-population, dirty logging, stop.
fn granted(report: &mut Report, kvm: i32, kind: Kind) -> Result<(), String> {
    let vm = Vm::new(kvm)?;
    let mut req = TdpShare {
        mode: MODE_PINNED,
        iommu: good_iommu(),
        ..TdpShare::default()
    };
    let want = model_code(&req, &model_facts(kind, false, VIommu::None, false));
    let got = vm.request(&mut req);
    let kind_code = if kind == Kind::Ept { FMT_EPT } else { FMT_NPT };
    report.check(
        "granted: pinned mode, QEMU VT-d in scalable mode",
        got == Ok(0) && want == 0 && req.refusal == 0 && req.kind == kind_code && req.levels == 4,
        format!(
            "result {got:?}, refusal {:#x}, format {} {}-level, largest leaf level {}",
            req.refusal, req.kind, req.levels, req.max_huge_level
        ),
    );
    let mut again = TdpShare {
        mode: MODE_PINNED,
        iommu: good_iommu(),
        ..TdpShare::default()
    };
    let busy = vm.request(&mut again);
    report.check(
        "a second request is busy",
        busy == Err(libc::EBUSY),
        format!("{busy:?}"),
    );

    // Touch the memory so pinning has pages to hold, then pin all of it.
    // SAFETY: `vm.mem` is a writable mapping of MEM bytes.
    unsafe { core::ptr::write_bytes(vm.mem.cast::<u8>(), 0x5a, MEM) };
    let mut range = TdpShareRange {
        gpa: 0,
        size: MEM as u64,
        flags: 0,
        pinned: 0,
    };
    // SAFETY: a struct kvm_tdp_share_range, what KVM_TDP_SHARE_PIN takes.
    let pin = unsafe { ioctl(vm.fd, KVM_TDP_SHARE_PIN, &mut range) };
    report.check(
        "pin the slot (FOLL_LONGTERM)",
        pin.is_ok() && range.pinned == (MEM / 4096) as u64,
        format!("{pin:?}, {} pages", range.pinned),
    );

    // Pre-populate through KVM_PRE_FAULT_MEMORY with tdpshare:prepopulate enabled.
    let traced = write_file(
        &format!("{TRACING}/events/tdpshare/prepopulate/enable"),
        "1",
    ) && write_file(&format!("{TRACING}/trace"), "");
    let mut pre = PreFaultMemory {
        gpa: 0,
        size: MEM as u64,
        ..PreFaultMemory::default()
    };
    let mut steps = 0;
    let mut result = Ok(0);
    while pre.size > 0 && steps < 100_000 {
        // SAFETY: a struct kvm_pre_fault_memory, what KVM_PRE_FAULT_MEMORY takes.
        result = unsafe { ioctl(vm.vcpu, KVM_PRE_FAULT_MEMORY, &mut pre) };
        if result.is_err() && result != Err(libc::EINTR) && result != Err(libc::EAGAIN) {
            break;
        }
        steps += 1;
    }
    let trace = std::fs::read_to_string(format!("{TRACING}/trace")).unwrap_or_default();
    let events = trace.lines().filter(|l| l.contains("prepopulate:")).count();
    report.check(
        "pre-populate the slot (KVM_PRE_FAULT_MEMORY), traced",
        pre.size == 0 && traced && events > 0,
        format!(
            "{result:?} after {steps} calls, {} bytes left, {events} tdpshare:prepopulate events",
            pre.size
        ),
    );
    let _ = write_file(
        &format!("{TRACING}/events/tdpshare/prepopulate/enable"),
        "0",
    );

    let dirty = vm.set_slot(KVM_MEM_LOG_DIRTY_PAGES);
    report.check(
        "dirty logging refused while sharing",
        dirty
            .as_ref()
            .is_err_and(|e| *e == format!("errno {}", libc::EBUSY)),
        format!("{dirty:?}"),
    );
    let stop = ioctl_val(vm.fd, KVM_TDP_SHARE_STOP, 0);
    report.check("stop sharing", stop == Ok(0), format!("{stop:?}"));
    let dirty = vm.set_slot(KVM_MEM_LOG_DIRTY_PAGES);
    report.check(
        "dirty logging allowed after the stop",
        dirty.is_ok(),
        format!("{dirty:?}"),
    );
    Ok(())
}

fn run(report: &mut Report) -> Result<(), String> {
    tracepoints(report);
    let path = CString::new("/dev/kvm").map_err(|e| e.to_string())?;
    // SAFETY: opening a device node by a NUL-terminated path.
    let kvm = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if kvm < 0 {
        return Err(format!("/dev/kvm: errno {}", errno()));
    }
    let cap = ioctl_val(kvm, KVM_CHECK_EXTENSION, KVM_CAP_TDP_SHARE);
    report.check("KVM_CAP_TDP_SHARE", cap == Ok(1), format!("{cap:?}"));
    let prefault = ioctl_val(kvm, KVM_CHECK_EXTENSION, KVM_CAP_PRE_FAULT_MEMORY);
    report.check(
        "KVM_CAP_PRE_FAULT_MEMORY",
        prefault == Ok(1),
        format!("{prefault:?}"),
    );
    let kind = if std::path::Path::new("/sys/module/kvm_amd").exists() {
        Kind::Npt
    } else {
        Kind::Ept
    };
    refusals(report, kvm, kind)?;
    granted(report, kvm, kind)?;
    Ok(())
}

fn main() -> ExitCode {
    let mut report = Report::new("kcheck");
    if let Err(e) = run(&mut report) {
        report.check("setup", false, e);
    }
    let verdict = if report.failed == 0 { "PASS" } else { "FAIL" };
    println!(
        "TDPSHARE-KCHECK: {verdict} ({} passed, {} failed)",
        report.passed, report.failed
    );
    let _ = std::io::stdout().flush();
    if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
