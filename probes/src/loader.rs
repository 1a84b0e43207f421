//! Loads the eBPF object, attaches every catalog probe it can, and streams decoded events.
//!
//! Starting never fails as a whole: each probe ends up attached, absent (the running kernel has
//! no such tracepoint), denied (missing privilege) or failed (with the verifier's or kernel's
//! reason), and the session works with whatever attached.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use tdpshare::Log2Histogram;
use tdpshare::event::Event;
use tdpshare_probes_common::{Record, split_hist_key};

use crate::btf::RoleLayout;
use crate::catalog::{CATALOG, Kernel, Probe};
use crate::core::CoreProbe;
use crate::decode::{Decoder, parse_record};
use crate::tracefs::{self, Format};

/// The eBPF object built by build.rs (empty when the toolchain was missing).
static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tdpshare-probes.bpf.o"));
/// Why the object is empty, if it is.
const MISSING: &str = env!("TDPSHARE_EBPF_MISSING");

/// What became of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeState {
    Attached,
    /// The running kernel has no such tracepoint.
    Absent,
    /// Not allowed: the reason names the capability.
    Denied(String),
    Failed(String),
    /// This build carries no eBPF programs.
    NotBuilt(String),
}

impl fmt::Display for ProbeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeState::Attached => f.write_str("attached"),
            ProbeState::Absent => f.write_str("absent"),
            ProbeState::Denied(r) => write!(f, "denied: {r}"),
            ProbeState::Failed(r) => write!(f, "failed: {r}"),
            ProbeState::NotBuilt(r) => write!(f, "not built: {r}"),
        }
    }
}

/// One row of the status table.
#[derive(Debug, Clone)]
pub struct ProbeStatus {
    pub probe: &'static Probe,
    pub state: ProbeState,
}

/// Two rings' records as one stream, in the order the kernel emitted them. An ioctl record is
/// stamped with the ioctl's start but emitted at its end, after the tracepoints it caused (the
/// decoder folds those into it): its place is its start plus its latency. The sort is stable,
/// so records of one ring emitted at the same time keep their ring order.
fn in_emission_order(records: &mut [Record]) {
    records.sort_by_key(|r| r.ts_ns.saturating_add(r.latency_ns));
}

/// Options of [`Session::start`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Only this VMM (its pid); all processes when `None`.
    pub pid: Option<u32>,
    /// Where tracefs is (default: found, or mounted at /sys/kernel/tracing).
    pub tracefs: Option<PathBuf>,
    /// The event ring buffer's size in bytes (a power of two, a multiple of the page size);
    /// default [`DEFAULT_RING_BYTES`]. A consumer slower than the kernel's bursts (a recorder
    /// writing JSON under nested TCG) needs more to lose nothing.
    pub ring_bytes: Option<u32>,
}

/// The event ring buffer's size unless told otherwise: 4 MiB, about 37 000 records.
pub const DEFAULT_RING_BYTES: u32 = 1 << 22;

/// Per-VM, per-probe figures kept in the kernel.
#[derive(Debug, Clone, Default)]
pub struct KernelCounters {
    /// (tgid, probe id) → hits.
    pub counts: HashMap<(u32, u32), u64>,
    /// (tgid, probe id) → ioctl latency histogram.
    pub latency: HashMap<(u32, u32), Log2Histogram>,
    /// Records the ring buffer could not take.
    pub drops: u64,
}

/// Keeps the last messages the eBPF programs logged (aya-log), for the probes view.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics(std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

impl Diagnostics {
    const KEEP: usize = 64;

    /// The messages kept, oldest first.
    pub fn messages(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl log::Log for Diagnostics {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if let Ok(mut q) = self.0.lock() {
            if q.len() == Self::KEEP {
                q.pop_front();
            }
            q.push_back(format!("{}: {}", record.level(), record.args()));
        }
    }
    fn flush(&self) {}
}

/// Attached probes and the stream of their events.
pub struct Session {
    pub statuses: Vec<ProbeStatus>,
    /// Notes for the user (tracefs mounted, role layout not from BTF, …).
    pub notes: Vec<String>,
    ebpf: Option<Ebpf>,
    ring: Option<RingBuf<MapData>>,
    core: Option<CoreProbe>,
    logger: Option<aya_log::EbpfLogger<Diagnostics>>,
    diagnostics: Diagnostics,
    decoder: Decoder,
    records: u64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("statuses", &self.statuses)
            .field("records", &self.records)
            .finish_non_exhaustive()
    }
}

/// Is `e`, or anything it was caused by, a permission error?
fn denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        let text = err.to_string();
        if text.contains("Operation not permitted") || text.contains("Permission denied") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The whole cause chain in one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text.lines().next().unwrap_or("").to_owned()
}

const PRIVILEGE: &str = "needs CAP_BPF and CAP_PERFMON (run as root), or use --replay / --simulate";

/// CLOCK_MONOTONIC now, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Why tracefs cannot be read, when it is mounted but this process may not look inside (it
/// is root-only: a service running with capabilities instead of root needs
/// CAP_DAC_READ_SEARCH). Every tracepoint would otherwise look absent.
fn tracefs_denied() -> Option<String> {
    tracefs::TRACEFS_ROOTS.iter().find_map(|root| {
        let events = std::path::Path::new(root).join("events");
        match std::fs::metadata(&events) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Some(format!(
                "{root} is not readable (root, or CAP_DAC_READ_SEARCH, reads the tracepoints' \
                 formats)"
            )),
            _ => None,
        }
    })
}

/// Finds tracefs, mounting it at /sys/kernel/tracing if it is not mounted anywhere.
fn ensure_tracefs(notes: &mut Vec<String>) -> Option<PathBuf> {
    if let Some(root) = tracefs::tracefs_root() {
        return Some(root);
    }
    if let Some(why) = tracefs_denied() {
        notes.push(why);
        return None;
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: mount(2) with constant C strings and no data.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        notes.push("tracefs was not mounted: mounted it at /sys/kernel/tracing".into());
        tracefs::tracefs_root()
    } else {
        notes.push(format!(
            "tracefs is not mounted and mounting it failed ({}): every tracepoint looks absent",
            std::io::Error::last_os_error()
        ));
        None
    }
}

impl Session {
    /// Loads and attaches everything that can be.
    pub fn start(opts: &LoadOptions) -> Session {
        let mut notes = Vec::new();
        let tracefs = opts.tracefs.clone().or_else(|| ensure_tracefs(&mut notes));
        // Not absent but unreadable: each tracepoint says so instead of "absent".
        let unreadable = if tracefs.is_none() && opts.tracefs.is_none() {
            tracefs_denied()
        } else {
            None
        };
        let missing = |unreadable: &Option<String>| match unreadable {
            Some(why) => ProbeState::Denied(why.clone()),
            None => ProbeState::Absent,
        };
        let (role, role_problem) = RoleLayout::of_running_kernel();
        if let Some(p) = role_problem {
            notes.push(format!("role word decoded with Linux 6.x's layout: {p}"));
        }
        // The formats of every probe that exists here.
        let mut formats = HashMap::new();
        let mut present = HashMap::new();
        for p in CATALOG {
            let loaded = tracefs
                .as_deref()
                .map(|t| Format::load(t, p.system, p.event));
            match loaded {
                Some(Ok(f)) => {
                    if let Some(id) = p.id {
                        formats.insert(id, f.clone());
                    }
                    present.insert(p.program, f);
                }
                Some(Err(tracefs::FormatError::Absent { .. })) | None => {}
                Some(Err(e)) => {
                    notes.push(format!("{}:{}: {e}", p.system, p.event));
                }
            }
        }
        let series = CATALOG
            .iter()
            .any(|p| p.kernel == Kernel::Series && present.contains_key(p.program));
        let decoder = Decoder::new(
            formats,
            role,
            Decoder::host_spte_format(series),
            monotonic_ns(),
        );
        let mut session = Session {
            statuses: Vec::new(),
            notes,
            ebpf: None,
            ring: None,
            core: None,
            logger: None,
            diagnostics: Diagnostics::default(),
            decoder,
            records: 0,
        };
        // The CO-RE program loads with libbpf, independently of the Rust object.
        let core_state = match CATALOG.iter().find(|p| p.core) {
            Some(p) if !present.contains_key(p.program) => missing(&unreadable),
            Some(_) => match CoreProbe::start(opts.pid, PRIVILEGE) {
                Ok(core) => {
                    session.core = Some(core);
                    session.decoder.core_roots = true;
                    session.decoder.core_cr_values = true;
                    ProbeState::Attached
                }
                Err(state) => state,
            },
            None => ProbeState::Absent,
        };
        let all = |state: ProbeState| -> Vec<ProbeStatus> {
            CATALOG
                .iter()
                .map(|probe| ProbeStatus {
                    probe,
                    state: if probe.core {
                        core_state.clone()
                    } else {
                        state.clone()
                    },
                })
                .collect()
        };
        if OBJECT.is_empty() {
            session.statuses = all(ProbeState::NotBuilt(MISSING.to_owned()));
            return session;
        }
        // Offsets the ioctl programs read at, from this kernel's formats.
        let offset = |program: &str, field: &str, default: u32| {
            present
                .get(program)
                .and_then(|f| f.field(field).ok())
                .map_or(default, |f| f.offset as u32)
        };
        let (cmd, arg, ret) = (
            offset("sys_enter_ioctl", "cmd", 24),
            offset("sys_enter_ioctl", "arg", 32),
            offset("sys_exit_ioctl", "ret", 16),
        );
        // The fields kvm_exit's in-kernel filter reads.
        let (reason, isa, info1) = (
            offset("kvm_exit", "exit_reason", 8),
            offset("kvm_exit", "isa", 24),
            offset("kvm_exit", "info1", 32),
        );
        let target = opts.pid.unwrap_or(0);
        let mut loader = EbpfLoader::new();
        loader
            .override_global("TARGET_TGID", &target, true)
            .override_global("IOCTL_CMD_OFFSET", &cmd, true)
            .override_global("IOCTL_ARG_OFFSET", &arg, true)
            .override_global("IOCTL_RET_OFFSET", &ret, true)
            .override_global("EXIT_REASON_OFFSET", &reason, true)
            .override_global("EXIT_ISA_OFFSET", &isa, true)
            .override_global("EXIT_INFO1_OFFSET", &info1, true)
            .map_max_entries("EVENTS", opts.ring_bytes.unwrap_or(DEFAULT_RING_BYTES));
        let mut ebpf = match loader.load(OBJECT) {
            Ok(e) => e,
            Err(e) => {
                let state = if denied(&e) {
                    ProbeState::Denied(PRIVILEGE.into())
                } else {
                    ProbeState::Failed(chain(&e))
                };
                session.statuses = all(state);
                return session;
            }
        };
        session.logger =
            aya_log::EbpfLogger::init_with_logger(&mut ebpf, session.diagnostics.clone()).ok();
        for probe in CATALOG {
            let state = if probe.core {
                core_state.clone()
            } else if !present.contains_key(probe.program) {
                missing(&unreadable)
            } else {
                attach(&mut ebpf, probe)
            };
            session.statuses.push(ProbeStatus { probe, state });
        }
        session.ring = ebpf
            .take_map("EVENTS")
            .and_then(|m| RingBuf::try_from(m).ok());
        session.ebpf = Some(ebpf);
        session
    }

    /// Probes attached.
    pub fn attached(&self) -> usize {
        self.statuses
            .iter()
            .filter(|s| s.state == ProbeState::Attached)
            .count()
    }

    /// Drains the ring buffer into `out`; returns the records read.
    pub fn poll(&mut self, out: &mut Vec<Event>) -> usize {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
        let mut n = 0;
        let mut records = Vec::new();
        if let Some(ring) = self.ring.as_mut() {
            while let Some(item) = ring.next() {
                n += 1;
                match parse_record(&item) {
                    Some(r) => records.push(r),
                    None => self.decoder.undecodable += 1,
                }
            }
        }
        if let Some(core) = self.core.as_mut() {
            let before = records.len();
            core.poll(&mut records);
            n += records.len() - before;
        }
        in_emission_order(&mut records);
        for r in &records {
            out.extend(self.decoder.decode(r));
        }
        // A CR-write exit whose thread has been silent for a millisecond had no kvm_cr.
        out.extend(
            self.decoder
                .flush_pending(monotonic_ns().saturating_sub(1_000_000)),
        );
        self.records += n as u64;
        n
    }

    /// The eBPF programs' own diagnostics (aya-log), latest last.
    pub fn diagnostics(&self) -> Vec<String> {
        self.diagnostics.messages()
    }

    /// Records read so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Records that could not be decoded / were decoded into no event on purpose.
    pub fn undecodable(&self) -> (u64, u64) {
        (self.decoder.undecodable, self.decoder.uneventful)
    }

    /// The kernel's per-VM counters, histograms and drops.
    pub fn counters(&self) -> KernelCounters {
        let mut out = KernelCounters {
            drops: self.core.as_ref().map_or(0, CoreProbe::drops),
            ..KernelCounters::default()
        };
        let Some(ebpf) = self.ebpf.as_ref() else {
            return out;
        };
        if let Some(Ok(counts)) = ebpf
            .map("COUNTS")
            .map(PerCpuHashMap::<_, u64, u64>::try_from)
        {
            for (key, values) in counts.iter().flatten() {
                let total: u64 = values.iter().sum();
                out.counts
                    .insert(((key >> 32) as u32, (key & 0xffff_ffff) as u32), total);
            }
        }
        if let Some(Ok(hist)) = ebpf
            .map("LATENCY")
            .map(PerCpuHashMap::<_, u64, u64>::try_from)
        {
            for (key, values) in hist.iter().flatten() {
                let (tgid, probe, bucket) = split_hist_key(key);
                let n: u64 = values.iter().sum();
                let h = out.latency.entry((tgid, probe)).or_default();
                let b = (bucket as usize).min(63);
                h.buckets[b] += n;
                h.count += n;
                // The bucket's lower bound: the exact values stay in the kernel.
                let low = if b == 0 { 0 } else { 1u64 << b };
                h.sum = h.sum.saturating_add(low.saturating_mul(n));
                h.max = h.max.max(if b >= 63 {
                    u64::MAX
                } else {
                    (1u64 << (b + 1)) - 1
                });
            }
        }
        if let Some(Ok(drops)) = ebpf.map("DROPS").map(PerCpuArray::<_, u64>::try_from)
            && let Ok(values) = drops.get(&0, 0)
        {
            out.drops += values.iter().sum::<u64>();
        }
        out
    }
}

fn attach(ebpf: &mut Ebpf, probe: &Probe) -> ProbeState {
    let Some(program) = ebpf.program_mut(probe.program) else {
        return ProbeState::Failed(format!("no program {} in the object", probe.program));
    };
    let tp: &mut TracePoint = match program.try_into() {
        Ok(tp) => tp,
        Err(e) => return ProbeState::Failed(chain(&e)),
    };
    if let Err(e) = tp.load() {
        return if denied(&e) {
            ProbeState::Denied(PRIVILEGE.into())
        } else {
            ProbeState::Failed(chain(&e))
        };
    }
    match tp.attach(probe.system, probe.event) {
        Ok(_) => ProbeState::Attached,
        Err(e) if denied(&e) => ProbeState::Denied(PRIVILEGE.into()),
        Err(e) => ProbeState::Failed(chain(&e)),
    }
}

/// The status table as text.
pub fn status_table(statuses: &[ProbeStatus]) -> String {
    let width = statuses
        .iter()
        .map(|s| s.probe.system.len() + s.probe.event.len() + 1 + 9 * usize::from(s.probe.core))
        .max()
        .unwrap_or(0);
    let mut out = format!("{:width$}  {:<13}  state\n", "tracepoint", "path");
    for s in statuses {
        let name = format!(
            "{}:{}{}",
            s.probe.system,
            s.probe.event,
            if s.probe.core { " (CO-RE)" } else { "" }
        );
        // The trace format's spelling (`root_update`), not Rust's.
        let path = crate::catalog::seed_path(s.probe.watches).name();
        let note = if s.probe.kernel == Kernel::Series && s.state == ProbeState::Absent {
            " (tdpshare patch series not in this kernel)"
        } else {
            ""
        };
        out.push_str(&format!("{name:width$}  {path:<13}  {}{note}\n", s.state));
    }
    out
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdpshare_probes_common::{ProbeId, RECORD_DATA};

    fn rec(probe: ProbeId, ts_ns: u64, latency_ns: u64) -> Record {
        Record {
            probe: probe as u32,
            tgid: 1,
            tid: 1,
            cpu: 0,
            ts_ns,
            latency_ns,
            ret: 0,
            data: [0; RECORD_DATA],
        }
    }

    #[test]
    fn an_ioctl_comes_after_the_tracepoints_it_caused() {
        // KVM_PRE_FAULT_MEMORY from 100 to 150, its pre-population steps at 110 and 140, the
        // next ioctl's step at 160: each ioctl must follow its own steps, or the decoder
        // credits them to the next ioctl (what the lab saw: entries shifted by one call).
        let mut records = vec![
            rec(ProbeId::TdpsharePrepopulate, 110, 0),
            rec(ProbeId::TdpsharePrepopulate, 140, 0),
            rec(ProbeId::IoctlPreFaultMemory, 100, 50),
            rec(ProbeId::TdpsharePrepopulate, 160, 0),
        ];
        in_emission_order(&mut records);
        let order: Vec<u64> = records.iter().map(|r| r.ts_ns).collect();
        assert_eq!(order, [110, 140, 100, 160]);
    }
}
