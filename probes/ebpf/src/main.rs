//! tdpshare's eBPF programs: one per tracepoint of the catalog, plus the ioctl pair.
//!
//! No kernel layout is compiled in. A tracepoint program copies the raw record into the ring
//! buffer and userspace decodes it with the tracefs format of the running kernel; the ioctl
//! programs read `cmd`, `arg` and `ret` at offsets the loader takes from the format files and
//! sets as globals. Every hit is counted per VM (the VMM's tgid) and probe; ioctl latencies go
//! into per-VM log2 histograms; a record the ring buffer cannot take is counted as a drop.
#![no_std]
#![no_main]

use aya_ebpf::EbpfContext;
use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
    bpf_probe_read_kernel_buf, bpf_probe_read_user_buf,
};
use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf};
use aya_ebpf::programs::TracePointContext;
use aya_log_ebpf::debug;
use tdpshare_probes_common::{
    ProbeId, RECORD_DATA, Record, count_key, hist_key, ioctl_probe, is_cr_write_exit, log2_bucket,
};

/// Only this VMM's events (0: every process). Set by the loader.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;
/// Offsets of `cmd` and `arg` in `syscalls:sys_enter_ioctl`, of `ret` in `sys_exit_ioctl`.
#[unsafe(no_mangle)]
static IOCTL_CMD_OFFSET: u32 = 24;
#[unsafe(no_mangle)]
static IOCTL_ARG_OFFSET: u32 = 32;
#[unsafe(no_mangle)]
static IOCTL_RET_OFFSET: u32 = 16;
/// Offsets of `exit_reason`, `isa` and `info1` in `kvm:kvm_exit`.
#[unsafe(no_mangle)]
static EXIT_REASON_OFFSET: u32 = 8;
#[unsafe(no_mangle)]
static EXIT_ISA_OFFSET: u32 = 24;
#[unsafe(no_mangle)]
static EXIT_INFO1_OFFSET: u32 = 32;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
/// Hits per (tgid, probe).
#[map]
static COUNTS: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(4096, 0);
/// ioctl latency histograms per (tgid, probe, log2 bucket).
#[map]
static LATENCY: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(16384, 0);
/// Records the ring buffer could not take.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// An ioctl between its entry and exit.
#[repr(C)]
#[derive(Clone, Copy)]
struct InFlight {
    probe: u32,
    _pad: u32,
    start_ns: u64,
    arg: [u8; RECORD_DATA],
}

#[map]
static IN_FLIGHT: HashMap<u32, InFlight> = HashMap::with_max_entries(4096, 0);

fn global(v: &u32) -> u32 {
    // SAFETY: a plain read of a global the loader may have patched before load.
    unsafe { core::ptr::read_volatile(v) }
}

/// The current task's (tgid, tid), or `None` when the filter rejects it.
fn task() -> Option<(u32, u32)> {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let target = global(&TARGET_TGID);
    (target == 0 || target == tgid).then_some((tgid, tid))
}

fn add(map: &PerCpuHashMap<u64, u64>, key: u64, n: u64) {
    match map.get_ptr_mut(&key) {
        // SAFETY: a per-CPU value of this CPU: no other writer while we run.
        Some(v) => unsafe { *v += n },
        None => {
            let _ = map.insert(&key, &n, 0);
        }
    }
}

fn dropped<C: EbpfContext>(ctx: &C, probe: u32) {
    if let Some(v) = DROPS.get_ptr_mut(0) {
        // SAFETY: a per-CPU value of this CPU.
        unsafe { *v += 1 };
    }
    debug!(
        ctx,
        "tdpshare: ring buffer full, record of probe {} dropped", probe
    );
}

fn emit<C: EbpfContext>(ctx: &C, record: &Record) {
    if EVENTS.output::<Record>(record, 0).is_err() {
        dropped(ctx, record.probe);
    }
}

/// Whether a hit of `probe` is worth a record: every one, but for `kvm_exit`, which fires on
/// every VM exit and is kept only for CR0/CR4 writes.
fn wanted(ctx: &TracePointContext, probe: u32) -> bool {
    if probe != ProbeId::KvmExit as u32 {
        return true;
    }
    // SAFETY: the offsets come from the running kernel's format file.
    let field = |offset: &u32, wide: bool| unsafe {
        let at = global(offset) as usize;
        if wide {
            ctx.read_at::<u64>(at).ok()
        } else {
            ctx.read_at::<u32>(at).ok().map(u64::from)
        }
    };
    match (
        field(&EXIT_ISA_OFFSET, false),
        field(&EXIT_REASON_OFFSET, false),
        field(&EXIT_INFO1_OFFSET, true),
    ) {
        (Some(isa), Some(reason), Some(info1)) => is_cr_write_exit(isa, reason, info1).is_some(),
        _ => false,
    }
}

/// A tracepoint hit: count it and ship the raw record.
fn hit(ctx: &TracePointContext, probe: u32) -> u32 {
    let Some((tgid, tid)) = task() else {
        return 0;
    };
    if !wanted(ctx, probe) {
        return 0;
    }
    add(&COUNTS, count_key(tgid, probe), 1);
    let mut record = Record {
        probe,
        tgid,
        tid,
        // SAFETY: a helper without preconditions.
        cpu: unsafe { bpf_get_smp_processor_id() },
        // SAFETY: a helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        latency_ns: 0,
        ret: 0,
        data: [0; RECORD_DATA],
    };
    // SAFETY: the tracepoint record lies at the context pointer; a short record leaves the
    // rest as whatever follows it in the trace buffer, which userspace never decodes.
    let _ = unsafe { bpf_probe_read_kernel_buf(ctx.as_ptr() as *const u8, &mut record.data) };
    emit(ctx, &record);
    0
}

/// One program per tracepoint of the probe list: count the hit, ship the raw record.
macro_rules! tracepoint_programs {
    (
        tracepoints {
            $($variant:ident = $id:literal, $program:ident, $system:literal, $event:literal,
                $path:ident, $kernel:ident, $yields:literal;)*
        }
        $($rest:tt)*
    ) => {
        $(
            #[tracepoint]
            pub fn $program(ctx: TracePointContext) -> u32 {
                hit(&ctx, ProbeId::$variant as u32)
            }
        )*
    };
}

tdpshare_probes_common::with_probes!(tracepoint_programs);

/// `syscalls:sys_enter_ioctl`: remember a watched command and its argument struct.
#[tracepoint]
pub fn sys_enter_ioctl(ctx: TracePointContext) -> u32 {
    // SAFETY: the offset comes from the running kernel's format file.
    let cmd: u32 = match unsafe { ctx.read_at::<u64>(global(&IOCTL_CMD_OFFSET) as usize) } {
        Ok(c) => c as u32,
        Err(_) => return 0,
    };
    let Some(probe) = ioctl_probe(cmd) else {
        return 0;
    };
    let Some((_, tid)) = task() else {
        return 0;
    };
    // SAFETY: as above.
    let arg: u64 = match unsafe { ctx.read_at::<u64>(global(&IOCTL_ARG_OFFSET) as usize) } {
        Ok(a) => a,
        Err(_) => return 0,
    };
    let mut flight = InFlight {
        probe: probe as u32,
        _pad: 0,
        // SAFETY: a helper without preconditions.
        start_ns: unsafe { bpf_ktime_get_ns() },
        arg: [0; RECORD_DATA],
    };
    // The argument structs watched are at most 40 bytes; read 40, or 32 if that crosses into
    // an unmapped page.
    // SAFETY: `arg` is a user pointer; a failed read leaves zeros.
    unsafe {
        if bpf_probe_read_user_buf(arg as *const u8, &mut flight.arg[..40]).is_err() {
            let _ = bpf_probe_read_user_buf(arg as *const u8, &mut flight.arg[..32]);
        }
    }
    let _ = IN_FLIGHT.insert(&tid, &flight, 0);
    0
}

/// `syscalls:sys_exit_ioctl`: a watched command finished — its latency and result.
#[tracepoint]
pub fn sys_exit_ioctl(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    // SAFETY: a lookup of this task's own entry, copied out before it is removed.
    let Some(flight) = (unsafe { IN_FLIGHT.get(&tid) }).copied() else {
        return 0;
    };
    let _ = IN_FLIGHT.remove(&tid);
    // SAFETY: the offset comes from the running kernel's format file.
    let ret: i64 = unsafe { ctx.read_at::<i64>(global(&IOCTL_RET_OFFSET) as usize) }.unwrap_or(0);
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let latency = now.saturating_sub(flight.start_ns);
    add(&COUNTS, count_key(tgid, flight.probe), 1);
    add(
        &LATENCY,
        hist_key(tgid, flight.probe, log2_bucket(latency)),
        1,
    );
    let record = Record {
        probe: flight.probe,
        tgid,
        tid,
        // SAFETY: a helper without preconditions.
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns: flight.start_ns,
        latency_ns: latency,
        ret,
        data: flight.arg,
    };
    emit(&ctx, &record);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
