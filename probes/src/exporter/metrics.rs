//! Every metric family the exporter serves: name, type, unit, labels, help, and how its
//! samples come out of the [`Registry`]. This table is the reference (`tdpshare-probe serve
//! --metrics` prints it; docs/exporter.md carries that output, checked by a test).

use super::registry::{
    FLUSH_SCOPES, MEMSLOT_OPS, PATHS, PREPOP_CAUSES, ROOT_CAUSES, Registry, VmMetrics,
};
use super::text::{Kind, Sink};
use tdpshare::event::splits::SplitReason;
use tdpshare::event::trace::name_of;

/// What a scrape reads: the registry and this process's own figures.
#[derive(Debug)]
pub struct Scrape<'a> {
    pub reg: &'a Registry,
    pub process: Process,
    /// Each VM's `vm` label (its VMM's pid, or `other`) with its series.
    vms: Vec<(String, &'a VmMetrics)>,
}

impl<'a> Scrape<'a> {
    pub fn new(reg: &'a Registry, process: Process) -> Self {
        let vms = reg
            .vms()
            .map(|(id, m)| (id.map_or_else(|| "other".to_owned(), |i| i.to_string()), m))
            .collect();
        Self { reg, process, vms }
    }
}

/// This process's CPU time, memory and start time (the client libraries' `process_*`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Process {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub start_time_seconds: f64,
}

impl Process {
    /// Read from the kernel: `getrusage`, `/proc/self/statm`, `/proc/self/stat` and the boot
    /// time in `/proc/stat`.
    pub fn current() -> Self {
        // SAFETY: getrusage writes the struct it is given; zeroed is a valid rusage.
        let usage = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut u);
            u
        };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        // SAFETY: sysconf has no preconditions.
        let (page, ticks) = unsafe {
            (
                libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
                libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            )
        };
        let resident_pages = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0);
        let start_ticks = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                let (_, rest) = s.rsplit_once(')')?;
                // Field 22 of stat; `rest` starts at field 3.
                rest.split_whitespace().nth(19)?.parse::<f64>().ok()
            })
            .unwrap_or(0.0);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        Self {
            cpu_seconds: tv(usage.ru_utime) + tv(usage.ru_stime),
            resident_bytes: resident_pages * page,
            start_time_seconds: boot + start_ticks / ticks,
        }
    }
}

/// One metric family.
#[derive(Debug)]
pub struct Family {
    /// The family's name (samples add `_total`, `_bucket`, `_info` as their type wants).
    pub name: &'static str,
    pub kind: Kind,
    /// Base unit (`seconds`, `bytes`), or empty.
    pub unit: &'static str,
    pub labels: &'static [&'static str],
    pub help: &'static str,
    pub collect: fn(&Scrape<'_>, &mut Sink),
}

const VM: &[&str] = &["vm", "vmm"];

/// Per VM: `f(sink, labels vm+vmm, series)`.
fn per_vm(s: &Scrape<'_>, sink: &mut Sink, f: impl Fn(&mut Sink, &[(&str, &str)], &VmMetrics)) {
    for (vm, m) in &s.vms {
        f(sink, &[("vm", vm), ("vmm", &m.vmm)], m);
    }
}

/// Per VM and value of one more label: `values[i]` with count `counts(m)[i]`.
fn per_vm_by<const N: usize>(
    s: &Scrape<'_>,
    sink: &mut Sink,
    label: &str,
    values: [&str; N],
    counts: impl Fn(&VmMetrics) -> [u64; N],
) {
    for (vm, m) in &s.vms {
        for (v, n) in values.iter().zip(counts(m)) {
            sink.counter(&[("vm", vm), ("vmm", &m.vmm), (label, v)], n);
        }
    }
}

/// [`per_vm_by`] with the label values the trace format's names of `all` (causes, scopes).
fn per_vm_by_name<T: serde::Serialize, const N: usize>(
    s: &Scrape<'_>,
    sink: &mut Sink,
    label: &str,
    all: &[T; N],
    counts: impl Fn(&VmMetrics) -> [u64; N],
) {
    let names: [String; N] = std::array::from_fn(|i| name_of(&all[i]));
    per_vm_by(s, sink, label, names.each_ref().map(String::as_str), counts);
}

/// Every family, in exposition order.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "tdpshare_events",
        kind: Kind::Counter,
        unit: "",
        labels: &["vm", "vmm", "path"],
        help: "Events seen, by class: prepopulation, root_update, iommu, memslot, sharing.",
        collect: |s, sink| {
            let p: [&str; 5] = PATHS.map(|p| p.name());
            per_vm_by(s, sink, "path", p, |m| m.events);
        },
    },
    Family {
        name: "tdpshare_prepopulations",
        kind: Kind::Counter,
        unit: "",
        labels: &["vm", "vmm", "cause"],
        help: "Pre-populations of pinned memory into the TDP table (seed path 1), by cause.",
        collect: |s, sink| per_vm_by_name(s, sink, "cause", &PREPOP_CAUSES, |m| m.prepopulations),
    },
    Family {
        name: "tdpshare_prepopulation_entries",
        kind: Kind::Counter,
        unit: "",
        labels: &["vm", "vmm", "level"],
        help: "TDP entries written by pre-population, by leaf level (1: 4 KiB, 2: 2 MiB, 3: 1 GiB).",
        collect: |s, sink| per_vm_by(s, sink, "level", ["1", "2", "3"], |m| m.prepop_entries),
    },
    Family {
        name: "tdpshare_prepopulation_seconds",
        kind: Kind::Histogram,
        unit: "seconds",
        labels: VM,
        help: "Time one pre-population took.",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.histogram(l, &m.prepop_seconds)),
    },
    Family {
        name: "tdpshare_roots_allocated",
        kind: Kind::Counter,
        unit: "",
        labels: &["vm", "vmm", "cause"],
        help: "TDP roots allocated (root updates the IOMMU must follow; seed path 2), by cause.",
        collect: |s, sink| per_vm_by_name(s, sink, "cause", &ROOT_CAUSES, |m| m.roots_allocated),
    },
    Family {
        name: "tdpshare_roots_freed",
        kind: Kind::Counter,
        unit: "",
        labels: &["vm", "vmm", "cause"],
        help: "TDP roots freed, by cause.",
        collect: |s, sink| per_vm_by_name(s, sink, "cause", &ROOT_CAUSES, |m| m.roots_freed),
    },
    Family {
        name: "tdpshare_root_switches",
        kind: Kind::Counter,
        unit: "",
        labels: &["vm", "vmm", "cause"],
        help: "Switches to another existing root (the sharing series' root_update), by cause.",
        collect: |s, sink| per_vm_by_name(s, sink, "cause", &ROOT_CAUSES, |m| m.root_switches),
    },
    Family {
        name: "tdpshare_fast_zaps",
        kind: Kind::Counter,
        unit: "",
        labels: VM,
        help: "Fast zaps: every root of the VM invalidated at once (a memslot deletion or move).",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.counter(l, m.fast_zaps)),
    },
    Family {
        name: "tdpshare_zaps",
        kind: Kind::Counter,
        unit: "",
        labels: VM,
        help: "Range zaps of TDP entries.",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.counter(l, m.zaps)),
    },
    Family {
        name: "tdpshare_zapped_entries",
        kind: Kind::Counter,
        unit: "",
        labels: VM,
        help: "TDP entries removed by range zaps.",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.counter(l, m.zapped_entries)),
    },
    Family {
        name: "tdpshare_huge_page_splits",
        kind: Kind::Counter,
        unit: "",
        labels: &["vm", "vmm", "level", "reason"],
        help: "Huge pages split into smaller leaves, by the huge page's level (2: 2 MiB, 3: 1 GiB) and the reason inferred from the events before (dirty_logging, nx_hugepage, permission_change, memslot_boundary, other).",
        collect: |s, sink| {
            for (vm, m) in &s.vms {
                for (level, by_reason) in ["2", "3"].iter().zip(&m.splits) {
                    for (reason, n) in SplitReason::ALL.iter().zip(by_reason) {
                        sink.counter(
                            &[
                                ("vm", vm),
                                ("vmm", &m.vmm),
                                ("level", level),
                                ("reason", reason.name()),
                            ],
                            *n,
                        );
                    }
                }
            }
        },
    },
    Family {
        name: "tdpshare_huge_page_collapses",
        kind: Kind::Counter,
        unit: "",
        labels: &["vm", "vmm", "level"],
        help: "Leaves collapsed back into a huge page, by the huge page's level.",
        collect: |s, sink| per_vm_by(s, sink, "level", ["2", "3"], |m| m.collapses),
    },
    Family {
        name: "tdpshare_page_faults",
        kind: Kind::Counter,
        unit: "",
        labels: VM,
        help: "TDP page faults taken by vCPUs.",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.counter(l, m.page_faults)),
    },
    Family {
        name: "tdpshare_iotlb_flushes",
        kind: Kind::Counter,
        unit: "",
        labels: &["vm", "vmm", "scope"],
        help: "IOTLB invalidations (seed path 3), by scope: all, domain, range, range_leaves.",
        collect: |s, sink| per_vm_by_name(s, sink, "scope", &FLUSH_SCOPES, |m| m.iotlb_flushes),
    },
    Family {
        name: "tdpshare_iotlb_flush_seconds",
        kind: Kind::Histogram,
        unit: "seconds",
        labels: VM,
        help: "Time one IOTLB invalidation took (where the source times it).",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.histogram(l, &m.iotlb_flush_seconds)),
    },
    Family {
        name: "tdpshare_memslot_operations",
        kind: Kind::Counter,
        unit: "",
        labels: &["vm", "vmm", "op"],
        help: "Memslot operations of the VMM, by op: add, delete, move, flags.",
        collect: |s, sink| per_vm_by(s, sink, "op", MEMSLOT_OPS, |m| m.memslot_ops),
    },
    Family {
        name: "tdpshare_dma_maps",
        kind: Kind::Counter,
        unit: "",
        labels: VM,
        help: "DMA map requests (VFIO / iommufd map ioctls, IOMMU map calls).",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.counter(l, m.dma_maps)),
    },
    Family {
        name: "tdpshare_dma_unmaps",
        kind: Kind::Counter,
        unit: "",
        labels: VM,
        help: "DMA unmap requests.",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.counter(l, m.dma_unmaps)),
    },
    Family {
        name: "tdpshare_dma_mapped_bytes",
        kind: Kind::Counter,
        unit: "bytes",
        labels: VM,
        help: "Bytes DMA-mapped.",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.counter(l, m.dma_map_bytes)),
    },
    Family {
        name: "tdpshare_dma_unmapped_bytes",
        kind: Kind::Counter,
        unit: "bytes",
        labels: VM,
        help: "Bytes DMA-unmapped.",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.counter(l, m.dma_unmap_bytes)),
    },
    Family {
        name: "tdpshare_dma_map_seconds",
        kind: Kind::Histogram,
        unit: "seconds",
        labels: VM,
        help: "Time one timed DMA map took (the ioctl, pinning included).",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.histogram(l, &m.dma_map_seconds)),
    },
    Family {
        name: "tdpshare_dma_unmap_seconds",
        kind: Kind::Histogram,
        unit: "seconds",
        labels: VM,
        help: "Time one timed DMA unmap took.",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.histogram(l, &m.dma_unmap_seconds)),
    },
    Family {
        name: "tdpshare_io_page_faults",
        kind: Kind::Counter,
        unit: "",
        labels: &["vm", "vmm", "resolved"],
        help: "IO page faults of the device; resolved when the TDP fault path mapped the page.",
        collect: |s, sink| per_vm_by(s, sink, "resolved", ["true", "false"], |m| m.io_page_faults),
    },
    Family {
        name: "tdpshare_pinned_bytes",
        kind: Kind::Gauge,
        unit: "bytes",
        labels: VM,
        help: "Guest memory pinned for DMA now.",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.gauge(l, m.pinned_bytes as f64)),
    },
    Family {
        name: "tdpshare_smm_transitions",
        kind: Kind::Counter,
        unit: "",
        labels: VM,
        help: "vCPU entries into and exits from SMM (each switches address space and root).",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.counter(l, m.smm_transitions)),
    },
    Family {
        name: "tdpshare_cr_writes",
        kind: Kind::Counter,
        unit: "",
        labels: &["vm", "vmm", "cr"],
        help: "Guest writes of CR0 and CR4 seen by KVM (an MMU-role change resets the root).",
        collect: |s, sink| per_vm_by(s, sink, "cr", ["0", "4"], |m| m.cr_writes),
    },
    Family {
        name: "tdpshare_sharing_state",
        kind: Kind::Gauge,
        unit: "",
        labels: &["vm", "vmm", "mode", "state"],
        help: "1 for the VM's sharing mode and state (requested, granted, refused, stopped).",
        collect: |s, sink| {
            for (vm, m) in &s.vms {
                if let Some((mode, state)) = &m.sharing {
                    sink.gauge(
                        &[
                            ("vm", vm),
                            ("vmm", &m.vmm),
                            ("mode", mode),
                            ("state", state),
                        ],
                        1.0,
                    );
                }
            }
        },
    },
    Family {
        name: "tdpshare_sharing_refusals",
        kind: Kind::Counter,
        unit: "",
        labels: VM,
        help: "Sharing requests refused by the prerequisites' check.",
        collect: |s, sink| per_vm(s, sink, |k, l, m| k.counter(l, m.sharing_refusals)),
    },
    Family {
        name: "tdpshare_vm",
        kind: Kind::Info,
        unit: "",
        labels: &["vm", "vmm", "name"],
        help: "A VM tracked one by one: its VMM's pid, process name and -name.",
        collect: |s, sink| {
            for (vm, m) in &s.vms {
                sink.info(&[("vm", vm), ("vmm", &m.vmm), ("name", &m.name)]);
            }
        },
    },
    Family {
        name: "tdpshare_vm_up",
        kind: Kind::Gauge,
        unit: "",
        labels: VM,
        help: "1 while the VM's VMM runs, 0 once it has exited (its series stay for --vm-grace).",
        collect: |s, sink| {
            per_vm(s, sink, |k, l, m| {
                k.gauge(l, if m.exited_at.is_none() { 1.0 } else { 0.0 })
            })
        },
    },
    Family {
        name: "tdpshare_vms_tracked",
        kind: Kind::Gauge,
        unit: "",
        labels: &[],
        help: "VMs with series of their own (at most --max-vms).",
        collect: |s, sink| sink.gauge(&[], s.reg.tracked() as f64),
    },
    Family {
        name: "tdpshare_vms_folded",
        kind: Kind::Counter,
        unit: "",
        labels: &[],
        help: "VMs seen past --max-vms, whose events went to vm=\"other\".",
        collect: |s, sink| sink.counter(&[], s.reg.folded_total),
    },
    Family {
        name: "tdpshare_vms_expired",
        kind: Kind::Counter,
        unit: "",
        labels: &[],
        help: "VMs whose series were removed, --vm-grace after their VMM exited.",
        collect: |s, sink| sink.counter(&[], s.reg.expired_total),
    },
    Family {
        name: "tdpshare_probe_up",
        kind: Kind::Gauge,
        unit: "",
        labels: &["probe", "program"],
        help: "1 when the probe is attached, 0 otherwise (see tdpshare_probe_state).",
        collect: |s, sink| {
            for p in &s.reg.probes {
                let up = if p.state == "attached" { 1.0 } else { 0.0 };
                sink.gauge(&[("probe", &p.probe), ("program", &p.program)], up);
            }
        },
    },
    Family {
        name: "tdpshare_probe_state",
        kind: Kind::Gauge,
        unit: "",
        labels: &["probe", "program", "state"],
        help: "1 for the probe's state: attached, absent (not in this kernel), denied, failed, not_built.",
        collect: |s, sink| {
            for p in &s.reg.probes {
                sink.gauge(
                    &[
                        ("probe", &p.probe),
                        ("program", &p.program),
                        ("state", p.state),
                    ],
                    1.0,
                );
            }
        },
    },
    Family {
        name: "tdpshare_ring_buffer_drops",
        kind: Kind::Counter,
        unit: "",
        labels: &[],
        help: "Records the kernel dropped because the ring buffer was full (raise --ring-mib).",
        collect: |s, sink| sink.counter(&[], s.reg.drops),
    },
    Family {
        name: "tdpshare_exporter_events",
        kind: Kind::Counter,
        unit: "",
        labels: &[],
        help: "Events the exporter has counted (rate() of it: events per second).",
        collect: |s, sink| sink.counter(&[], s.reg.events_total),
    },
    Family {
        name: "tdpshare_build",
        kind: Kind::Info,
        unit: "",
        labels: &["version", "kernel"],
        help: "The exporter's version and the kernel it runs on.",
        collect: |s, sink| {
            sink.info(&[
                ("version", env!("CARGO_PKG_VERSION")),
                ("kernel", &s.reg.kernel),
            ])
        },
    },
    Family {
        name: "process_cpu_seconds",
        kind: Kind::Counter,
        unit: "seconds",
        labels: &[],
        help: "CPU time the exporter has used, user and system.",
        collect: |s, sink| sink.counter_f(&[], s.process.cpu_seconds),
    },
    Family {
        name: "process_resident_memory_bytes",
        kind: Kind::Gauge,
        unit: "bytes",
        labels: &[],
        help: "The exporter's resident memory.",
        collect: |s, sink| sink.gauge(&[], s.process.resident_bytes as f64),
    },
    Family {
        name: "process_start_time_seconds",
        kind: Kind::Gauge,
        unit: "seconds",
        labels: &[],
        help: "When the exporter started, seconds since the Unix epoch.",
        collect: |s, sink| sink.gauge(&[], s.process.start_time_seconds),
    },
];

/// The whole exposition of `scrape` in `format`.
pub fn render(scrape: &Scrape<'_>, format: super::text::Format) -> String {
    let mut sink = Sink::new(format);
    for f in FAMILIES {
        sink.family(f.name, f.kind, f.unit, f.help);
        (f.collect)(scrape, &mut sink);
    }
    sink.finish()
}

/// The sample names a family's series carry (for checking PromQL against the exporter).
pub fn sample_names(f: &Family) -> Vec<String> {
    match f.kind {
        Kind::Counter => vec![format!("{}_total", f.name)],
        Kind::Gauge => vec![f.name.to_owned()],
        Kind::Info => vec![format!("{}_info", f.name)],
        Kind::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{}{s}", f.name))
            .collect(),
    }
}

/// The metric reference as a Markdown table (docs/exporter.md).
pub fn reference() -> String {
    let mut out = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
    for f in FAMILIES {
        let shown = sample_names(f).join("`, `");
        let labels = f
            .labels
            .iter()
            .map(|l| format!("`{l}`"))
            .collect::<Vec<_>>()
            .join(", ");
        out += &format!(
            "| `{shown}` | {} | {labels} | {} |\n",
            f.kind.name(),
            f.help.replace('|', "\\|")
        );
    }
    out
}
