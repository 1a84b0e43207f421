//! The lab VMM: an L2 VM whose memory layout follows a memslot sequence recorded from a real
//! QEMU boot, the `edu` device's DMA translated by the L2's own TDP table (the series) or by a
//! copy of it (a stock kernel), the probes recording the kernel meanwhile, and the checks of
//! `cargo xtask lab test` (docs/lab.md).
//!
//! The order of a VMM with a passed-through device: guest RAM and firmware are registered,
//! the device is realized (sharing is requested, the device attached and memory pinned and
//! pre-faulted), then the firmware runs and changes memslots, then the guest kernel boots and
//! touches its memory.

pub mod boot;
pub mod device;
pub mod iommu;
pub mod memory;
pub mod model;
pub mod recorder;
pub mod share;
pub mod vm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use kvm_ioctls::Kvm;
use tdpshare::event::{Event, EventKind, Memslot};
use tdpshare::sim::Action;
use tdpshare::{Gpa, Hpa, Iova, TraceReader};
use vm_memory::{Bytes, GuestAddress};

use crate::sys::{Report, errno_text};
use device::Edu;
use iommu::{Iommu, KernelLog};
use memory::Backing;
use model::ActionLog;
use vm::{L2, Op, Slot};

/// What `tdpshare-lab test` is given.
#[derive(Debug, Clone)]
pub struct Options {
    /// The memslot sequence: a tdpshare trace of memslot events (imported from QEMU's
    /// `kvm_set_user_memory` trace).
    pub memslots: PathBuf,
    /// Memslot calls before the device is realized and sharing starts.
    pub share_after: usize,
    /// Where the trace, the scenario and the summary go.
    pub out: PathBuf,
    /// The probes recorder (`tdpshare-probe`); `None`: nothing recorded, the checks that need
    /// the trace are skipped and say so.
    pub recorder: Option<PathBuf>,
    /// The VT-d runs in scalable mode (QEMU's `x-scalable-mode=on`).
    pub scalable: bool,
}

/// The lab's own memslot for the move test: id, size, its recorded address, and where it is
/// placed before and after the move.
const TEST_SLOT: u16 = 100;
const TEST_SLOT_SIZE: u64 = 2 << 20;
const TEST_SLOT_UA: u64 = 0x7e00_0000_0000;
const TEST_GPA_BEFORE: u64 = 0x1000_0000;
const TEST_GPA_AFTER: u64 = 0x1800_0000;
/// DMA transfers: 1000 dwords of pattern (edu takes at most 4095 bytes).
const DMA_DWORDS: u32 = 1000;
const DMA_BYTES: u64 = DMA_DWORDS as u64 * 4;
const DMA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the L1's DMAR driver may take to log a fault (interrupt, then a printk).
const FAULT_WAIT: Duration = Duration::from_secs(5);
const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;

/// How the device's DMA is translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Translation {
    /// Not attached yet.
    None,
    /// Through the L2's TDP table (the series' KVM hardware page table).
    Shared { hwpt: u32 },
    /// Through the IOMMU's own table, filled from the memslots (`IOMMU_IOAS_MAP`).
    Copied,
}

/// The memslot events of the first VM in `path`.
pub fn load_memslots(path: &Path) -> anyhow::Result<Vec<Event>> {
    let reader = TraceReader::open(path)
        .with_context(|| format!("opening the memslot sequence {}", path.display()))?;
    let events: Vec<Event> = reader
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", path.display()))?;
    let vm = events.first().map(|e| e.vm);
    let slots: Vec<Event> = events
        .into_iter()
        .filter(|e| Some(e.vm) == vm)
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::MemslotAdd(_)
                    | EventKind::MemslotDelete(_)
                    | EventKind::MemslotMove { .. }
                    | EventKind::MemslotFlags { .. }
            )
        })
        .collect();
    ensure!(
        !slots.is_empty(),
        "{} holds no memslot events",
        path.display()
    );
    Ok(slots)
}

/// Everything the run holds.
struct Lab {
    l2: L2,
    backing: Backing,
    edu: Edu,
    bdf: String,
    iommu: Iommu,
    dev_id: u32,
    vtd: (u64, u64),
    series: bool,
    scalable: bool,
    translation: Translation,
    granted: Option<share::Granted>,
    log: ActionLog,
    klog: KernelLog,
    /// The recorded address of each present slot (the model names memory by it).
    ua: std::collections::HashMap<(u8, u16), u64>,
    /// What the run changed from the recorded sequence, and why.
    deviations: Vec<String>,
    /// The IOMMU's root for the device when sharing started, and around the memslot move.
    iommu_roots: Vec<(&'static str, Option<u64>)>,
}

impl Lab {
    /// `KVM_TDP_SHARE_PIN` over slot `s`: the pages pinned.
    fn pin(&self, s: &Slot) -> anyhow::Result<u64> {
        share::pin(self.l2.vm_fd(), s.gpa, s.size).map_err(|e| {
            anyhow::anyhow!(
                "KVM_TDP_SHARE_PIN {:#x}+{:#x}: {}",
                s.gpa,
                s.size,
                errno_text(e)
            )
        })
    }

    /// `KVM_PRE_FAULT_MEMORY` over slot `s`.
    fn prefault(&self, s: &Slot) -> anyhow::Result<()> {
        self.l2.prefault(s.gpa, s.size).map_err(|e| {
            anyhow::anyhow!(
                "KVM_PRE_FAULT_MEMORY {:#x}+{:#x}: {}",
                s.gpa,
                s.size,
                errno_text(e)
            )
        })
    }

    /// Makes the device's DMA reach `s` (address space 0 only): pinned and pre-faulted into
    /// the shared table, or mapped into the IOMMU's own.
    fn map_slot(&mut self, s: Slot) -> anyhow::Result<()> {
        if s.as_id != 0 {
            return Ok(());
        }
        match self.translation {
            Translation::Shared { .. } => {
                self.pin(&s)?;
                self.prefault(&s)?;
            }
            Translation::Copied => self.iommu.map(s.gpa, s.host, s.size, !s.readonly())?,
            Translation::None => {}
        }
        Ok(())
    }

    /// The opposite, before a slot goes (the shared table's pins go with the slot, in KVM).
    fn unmap_slot(&mut self, s: Slot) -> anyhow::Result<()> {
        if s.as_id == 0 && self.translation == Translation::Copied {
            self.iommu.unmap(s.gpa, s.size)?;
        }
        Ok(())
    }

    fn add(&mut self, m: &Memslot, host: u64) -> anyhow::Result<()> {
        let mut slot = Slot {
            as_id: m.as_id,
            slot: m.slot,
            gpa: m.gpa.0,
            size: m.size,
            flags: m.flags,
            host,
        };
        if let Err(e) = self.l2.set_slot(slot) {
            // The series refuses write-protection dirty logging while sharing: a VMM keeps the
            // slot without it (QEMU's display then redraws in full).
            if e == libc::EBUSY
                && slot.flags & KVM_MEM_LOG_DIRTY_PAGES != 0
                && self.translation != Translation::None
            {
                slot.flags &= !KVM_MEM_LOG_DIRTY_PAGES;
                self.l2.set_slot(slot).map_err(|e| {
                    anyhow::anyhow!(
                        "adding slot {} without dirty logging: {}",
                        m.slot,
                        errno_text(e)
                    )
                })?;
                self.deviations.push(format!(
                    "slot {} at {:#x}: dirty logging refused while sharing (EBUSY), added without it",
                    m.slot, m.gpa.0
                ));
            } else {
                bail!(
                    "adding slot {} at {:#x}+{:#x}: {}",
                    m.slot,
                    m.gpa.0,
                    m.size,
                    errno_text(e)
                );
            }
        }
        self.ua.insert((m.as_id, m.slot), m.ua);
        self.log.push(Action::MemslotAdd {
            slot: m.slot,
            as_id: m.as_id,
            gpa: m.gpa,
            size: m.size,
            flags: slot.flags,
            hpa: Hpa(m.ua),
        });
        self.map_slot(slot)
    }

    fn delete(&mut self, as_id: u8, id: u16) -> anyhow::Result<()> {
        let old = self
            .l2
            .slot(as_id, id)
            .with_context(|| format!("slot {id} of address space {as_id} is not present"))?;
        self.unmap_slot(old)?;
        self.l2
            .delete_slot(as_id, id)
            .map_err(|e| anyhow::anyhow!("deleting slot {id}: {}", errno_text(e)))?;
        self.ua.remove(&(as_id, id));
        self.log.push(Action::MemslotDelete { slot: id, as_id });
        Ok(())
    }

    /// Applies one recorded memslot event.
    fn apply(&mut self, e: &Event) -> anyhow::Result<()> {
        match &e.kind {
            EventKind::MemslotAdd(m) => {
                let host = self.backing.host(m.ua, m.size)?;
                self.add(m, host)
            }
            EventKind::MemslotDelete(m) => self.delete(m.as_id, m.slot),
            EventKind::MemslotMove { slot: m, .. } => {
                let old = self
                    .l2
                    .slot(m.as_id, m.slot)
                    .with_context(|| format!("moving slot {}, which is not present", m.slot))?;
                self.unmap_slot(old)?;
                let moved = Slot {
                    gpa: m.gpa.0,
                    ..old
                };
                self.l2
                    .set_slot(moved)
                    .map_err(|e| anyhow::anyhow!("moving slot {}: {}", m.slot, errno_text(e)))?;
                self.log.push(Action::MemslotMove {
                    slot: m.slot,
                    as_id: m.as_id,
                    gpa: m.gpa,
                });
                self.map_slot(moved)
            }
            EventKind::MemslotFlags { slot: m, .. } => {
                let old = self
                    .l2
                    .slot(m.as_id, m.slot)
                    .with_context(|| format!("changing slot {}, which is not present", m.slot))?;
                let mut flags = m.flags;
                if flags & KVM_MEM_LOG_DIRTY_PAGES != 0 && self.translation != Translation::None {
                    flags &= !KVM_MEM_LOG_DIRTY_PAGES;
                    self.deviations.push(format!(
                        "slot {}: dirty logging not turned on while sharing",
                        m.slot
                    ));
                }
                self.l2
                    .set_slot(Slot { flags, ..old })
                    .map_err(|e| anyhow::anyhow!("slot {} flags: {}", m.slot, errno_text(e)))?;
                self.log.push(Action::MemslotFlags {
                    slot: m.slot,
                    as_id: m.as_id,
                    flags,
                });
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The device is realized: the series' sharing (request, pin, the KVM hardware page
    /// table, pre-fault), or on a stock kernel the IOMMU's own table mapped from the slots.
    fn start_dma(&mut self, report: &mut Report) -> anyhow::Result<()> {
        let slots: Vec<Slot> = self.l2.slots().copied().collect();
        if !self.series {
            report.check(
                "sharing on the stock kernel",
                true,
                "refused: KVM has no KVM_CAP_TDP_SHARE (a kernel without the series); the \
                 device gets the IOMMU's own table, mapped from the memslots (IOMMU_IOAS_MAP)",
            );
            self.edu
                .attach(self.iommu.ioas)
                .map_err(|e| anyhow::anyhow!("attaching edu to the IOAS: {}", errno_text(e)))?;
            self.translation = Translation::Copied;
            for s in slots {
                self.map_slot(s)?;
            }
            self.iommu_roots
                .push(("at attach", iommu::translation_root(&self.bdf)?));
            return Ok(());
        }
        let caps = iommu::vtd_caps(self.vtd.0, self.vtd.1, self.scalable, iommu::vtd_emulated());
        let granted = match share::request(self.l2.vm_fd(), caps) {
            Ok(g) => g,
            Err(r) => {
                report.check(
                    "sharing requested",
                    false,
                    format!(
                        "refused ({}, refusal {:#x}): {}",
                        errno_text(r.errno),
                        r.refusal,
                        r.reason
                    ),
                );
                bail!("KVM refused to share the L2's table: {}", r.reason);
            }
        };
        report.check(
            "sharing requested",
            true,
            format!(
                "granted: {}, {} levels, leaves up to level {}, snoop {}",
                granted.format(),
                granted.levels,
                granted.max_huge_level,
                if granted.snoop {
                    "in the leaves"
                } else {
                    "by the IOMMU"
                }
            ),
        );
        self.granted = Some(granted);
        self.log.push(Action::ShareStart);
        let start = Instant::now();
        let mut pinned = 0;
        for s in slots.iter().filter(|s| s.as_id == 0) {
            pinned += self.pin(s)?;
        }
        let hwpt = match self.iommu.alloc_kvm_hwpt(self.dev_id, self.l2.vm_fd()) {
            Ok(h) => h,
            Err(e) => {
                let why = self
                    .klog
                    .read()
                    .into_iter()
                    .filter(|l| l.contains("KVM") || l.contains("TDP"))
                    .collect::<Vec<_>>()
                    .join("; ");
                report.check(
                    "KVM-backed hardware page table",
                    false,
                    format!("IOMMU_HWPT_ALLOC(KVM): {} {why}", errno_text(e)),
                );
                bail!("the VT-d refused KVM's table");
            }
        };
        self.edu
            .attach(hwpt)
            .map_err(|e| anyhow::anyhow!("attaching edu to KVM's table: {}", errno_text(e)))?;
        self.translation = Translation::Shared { hwpt };
        // Pre-faulted only now: the attach gave the VM a fresh root.
        for s in slots.iter().filter(|s| s.as_id == 0) {
            self.prefault(s)?;
        }
        let root = iommu::translation_root(&self.bdf)?;
        self.iommu_roots.push(("at attach", root));
        report.check(
            "edu attached to the L2's TDP table",
            root.is_some(),
            format!(
                "hardware page table {hwpt}, {pinned} pages pinned and pre-faulted in {:.2} s; \
                 the VT-d's {} entry points at {}",
                start.elapsed().as_secs_f64(),
                if self.scalable { "PASID" } else { "context" },
                root.map_or("nothing".into(), |r| format!("{r:#x}"))
            ),
        );
        Ok(())
    }

    /// The largest RAM slot of address space 0.
    fn ram(&self) -> anyhow::Result<Slot> {
        self.l2
            .slots()
            .filter(|s| !s.readonly())
            .max_by_key(|s| s.size)
            .copied()
            .context("no RAM slot after the replay")
    }

    fn run(&mut self, op: Op) -> anyhow::Result<u32> {
        let result = self.l2.run(&self.backing, op)?;
        let (gpa, size, write) = match op {
            Op::Fill { gpa, dwords, .. } => (gpa, u64::from(dwords) * 4, true),
            Op::Touch { gpa, pages } => (gpa, u64::from(pages) * 4096, true),
            Op::Sum { gpa, dwords } => (gpa, u64::from(dwords) * 4, false),
        };
        self.log.push(Action::Touch {
            vcpu: 0,
            gpa: Gpa(gpa),
            size: size.next_multiple_of(4096),
            write,
        });
        Ok(result)
    }

    fn dma(&mut self, iova: u64, to_ram: bool) -> anyhow::Result<Duration> {
        let took = self.edu.dma(iova, DMA_BYTES, to_ram, DMA_TIMEOUT)?;
        self.log.push(Action::Dma {
            iova: Iova(iova),
            size: DMA_BYTES,
            write: to_ram,
            stride: 4096,
        });
        Ok(took)
    }

    fn read_guest(&self, gpa: u64, len: u64) -> anyhow::Result<Vec<u8>> {
        let mut buf = vec![0u8; usize::try_from(len)?];
        self.backing
            .guest(&self.l2.placed())?
            .read_slice(&mut buf, GuestAddress(gpa))
            .with_context(|| format!("reading the L2's memory at {gpa:#x}"))?;
        Ok(buf)
    }

    fn write_guest(&self, gpa: u64, bytes: &[u8]) -> anyhow::Result<()> {
        self.backing
            .guest(&self.l2.placed())?
            .write_slice(bytes, GuestAddress(gpa))
            .with_context(|| format!("writing the L2's memory at {gpa:#x}"))
    }

    /// DMAR faults logged for `[addr, addr + len)` within `wait`.
    fn faults_at(&mut self, addr: u64, len: u64, wait: Duration) -> Vec<iommu::DmarFault> {
        let start = Instant::now();
        let mut found = Vec::new();
        loop {
            for line in self.klog.read() {
                if let Some(f) = iommu::parse_dmar_fault(&line)
                    && f.addr >= addr
                    && f.addr < addr + len
                {
                    found.push(f);
                }
            }
            if !found.is_empty() || start.elapsed() >= wait {
                return found;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A guest-physical page no memslot holds, at or above `from`.
    fn hole(&self, from: u64) -> u64 {
        let mut gpa = from.next_multiple_of(2 << 20);
        while self
            .l2
            .slots()
            .any(|s| s.contains(gpa, 2 << 20) || (gpa < s.end() && gpa + (2 << 20) > s.gpa))
        {
            gpa += 2 << 20;
        }
        gpa
    }
}

/// `tdpshare-lab test`: everything, printed one check a line; true when every check passed.
pub fn test(opts: &Options) -> anyhow::Result<bool> {
    let mut report = Report::new("lab");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let events = load_memslots(&opts.memslots)?;
    let mut extents: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::MemslotAdd(m) => Some((m.ua, m.size)),
            _ => None,
        })
        .collect();
    extents.sort_unstable();
    let mut backing = Backing::new(extents)?;
    backing.add(TEST_SLOT_UA, TEST_SLOT_SIZE)?;

    // The device first: a VMM opens it before the guest runs.
    let bdf = device::find_edu()?;
    let cdev = device::bind_vfio(&bdf)?;
    let iommu = Iommu::open()?;
    let edu = Edu::open(&cdev, iommu.raw_fd())?;
    let dev_id = edu.dev_id;
    let vtd = iommu.vtd_registers(dev_id)?;
    report.note(format!(
        "kernel {}; edu {bdf} ({}), VT-d cap {:#x} ecap {:#x}, {} mode",
        release.trim(),
        cdev.display(),
        vtd.0,
        vtd.1,
        if opts.scalable { "scalable" } else { "legacy" }
    ));

    let trace_path = opts.out.join("trace.jsonl");
    let recorder = match &opts.recorder {
        Some(program) => {
            let r = recorder::Recorder::start(
                program,
                &trace_path,
                Some(std::process::id()),
                Duration::from_secs(300),
            )?;
            report.note(format!("probes: {}", r.attached));
            Some(r)
        }
        None => None,
    };

    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let l2 = L2::new(&kvm)?;
    let series = share::offered(l2.vm_fd());
    report.note(if series {
        "KVM offers KVM_CAP_TDP_SHARE: the kernel carries the sharing series"
    } else {
        "KVM does not offer KVM_CAP_TDP_SHARE: a stock kernel, no sharing"
    });
    let mut lab = Lab {
        l2,
        backing,
        edu,
        bdf,
        iommu,
        dev_id,
        vtd,
        series,
        scalable: opts.scalable,
        translation: Translation::None,
        granted: None,
        log: ActionLog::default(),
        klog: KernelLog::open()?,
        ua: std::collections::HashMap::new(),
        deviations: Vec::new(),
        iommu_roots: Vec::new(),
    };

    // The recorded sequence, with the device realized after `share_after` calls.
    let start = Instant::now();
    for (i, e) in events.iter().enumerate() {
        if i == opts.share_after {
            lab.start_dma(&mut report)?;
        }
        lab.apply(e)
            .with_context(|| format!("memslot call {} of {}", i + 1, events.len()))?;
    }
    if lab.translation == Translation::None {
        lab.start_dma(&mut report)?;
    }
    let present: Vec<String> = lab
        .l2
        .slots()
        .map(|s| format!("{:#x}+{:#x}", s.gpa, s.size))
        .collect();
    report.check(
        "memslot sequence replayed",
        true,
        format!(
            "{} calls from {} in {:.2} s; slots now {}",
            events.len(),
            opts.memslots.display(),
            start.elapsed().as_secs_f64(),
            present.join(" ")
        ),
    );
    for d in &lab.deviations {
        report.note(format!("deviation: {d}"));
    }

    // The guest kernel boots: every page of RAM above 1 MiB written once.
    let ram = lab.ram()?;
    let from = ram.gpa.max(1 << 20);
    let pages = u32::try_from((ram.end() - from) / 4096)?;
    let t = Instant::now();
    lab.run(Op::Touch { gpa: from, pages })?;
    report.check(
        "the L2 touched its memory",
        true,
        format!(
            "{pages} pages from {from:#x} written by the vCPU in {:.2} s",
            t.elapsed().as_secs_f64()
        ),
    );

    // 1. DMA round trip through the L2's table.
    let src = (ram.gpa + ram.size / 2).next_multiple_of(4096);
    let dst = src + (1 << 20);
    ensure!(
        dst + DMA_BYTES <= ram.end(),
        "the RAM slot {:#x}+{:#x} is too small for the DMA test",
        ram.gpa,
        ram.size
    );
    let seed = 0x7464_7073; // "tdps"
    let expected = vm::pattern(seed, DMA_DWORDS);
    lab.write_guest(dst, &vec![0u8; expected.len()])?;
    lab.run(Op::Fill {
        gpa: src,
        dwords: DMA_DWORDS,
        seed,
    })?;
    let t_in = lab.dma(src, false)?;
    let t_out = lab.dma(dst, true)?;
    let seen = lab.read_guest(dst, DMA_BYTES)?;
    let sum = lab.run(Op::Sum {
        gpa: dst,
        dwords: DMA_DWORDS,
    })?;
    let faults = lab.faults_at(0, u64::MAX, Duration::ZERO);
    report.check(
        "DMA round trip",
        seen == expected && sum == vm::checksum(&expected) && faults.is_empty(),
        format!(
            "L2 {src:#x} -> edu ({:.2} s) -> L2 {dst:#x} ({:.2} s): {DMA_BYTES} bytes {}, \
             the vCPU's checksum {sum:#010x} (expected {:#010x}), {} DMAR faults",
            t_in.as_secs_f64(),
            t_out.as_secs_f64(),
            if seen == expected { "match" } else { "DIFFER" },
            vm::checksum(&expected),
            faults.len()
        ),
    );

    // 2. DMA to a guest-physical address nothing maps.
    let hole = lab.hole(ram.end());
    let before = lab.backing.digest();
    lab.dma(hole, true)?;
    let faults = lab.faults_at(hole, DMA_BYTES, FAULT_WAIT);
    let unchanged = lab.backing.digest() == before;
    report.check(
        "DMA to an unpopulated address faults",
        !faults.is_empty() && unchanged,
        format!(
            "{hole:#x}: {}; the L2's memory {}",
            faults
                .first()
                .map_or("no DMAR fault logged".into(), |f| f.text.clone()),
            if unchanged { "unchanged" } else { "CHANGED" }
        ),
    );

    // 3. A slot deleted and added elsewhere: the old address faults, the new one works.
    let root_before = iommu::translation_root(&lab.bdf)?;
    lab.iommu_roots
        .push(("before the memslot move", root_before));
    let test_host = lab.backing.host(TEST_SLOT_UA, TEST_SLOT_SIZE)?;
    let test_slot = Memslot {
        slot: TEST_SLOT,
        as_id: 0,
        gpa: Gpa(TEST_GPA_BEFORE),
        size: TEST_SLOT_SIZE,
        flags: 0,
        ua: TEST_SLOT_UA,
    };
    lab.add(&test_slot, test_host)?;
    lab.write_guest(TEST_GPA_BEFORE, &vec![0u8; expected.len()])?;
    lab.dma(TEST_GPA_BEFORE, true)?;
    let first = lab.read_guest(TEST_GPA_BEFORE, DMA_BYTES)?;
    lab.delete(0, TEST_SLOT)?;
    lab.add(
        &Memslot {
            gpa: Gpa(TEST_GPA_AFTER),
            ..test_slot
        },
        test_host,
    )?;
    lab.write_guest(TEST_GPA_AFTER, &vec![0u8; expected.len()])?;
    lab.dma(TEST_GPA_BEFORE, true)?;
    let stale = lab.faults_at(TEST_GPA_BEFORE, DMA_BYTES, FAULT_WAIT);
    let after_stale = lab.read_guest(TEST_GPA_AFTER, DMA_BYTES)?;
    lab.dma(TEST_GPA_AFTER, true)?;
    let moved = lab.read_guest(TEST_GPA_AFTER, DMA_BYTES)?;
    let moved_sum = lab.run(Op::Sum {
        gpa: TEST_GPA_AFTER,
        dwords: DMA_DWORDS,
    })?;
    let root_after = iommu::translation_root(&lab.bdf)?;
    lab.iommu_roots.push(("after the memslot move", root_after));
    report.check(
        "memslot delete + re-add",
        first == expected
            && !stale.is_empty()
            && after_stale.iter().all(|&b| b == 0)
            && moved == expected
            && moved_sum == vm::checksum(&expected),
        format!(
            "DMA to {TEST_GPA_BEFORE:#x} {}; after the move there it {} and wrote {}; to \
             {TEST_GPA_AFTER:#x} it {} (vCPU checksum {moved_sum:#010x})",
            if first == expected {
                "worked"
            } else {
                "FAILED"
            },
            stale.first().map_or("did NOT fault".into(), |f| format!(
                "faulted (reason {:#04x})",
                f.reason
            )),
            if after_stale.iter().all(|&b| b == 0) {
                "nothing"
            } else {
                "into the memory (a stale IOTLB entry)"
            },
            if moved == expected { "works" } else { "FAILED" },
        ),
    );
    if series {
        report.check(
            "the IOMMU's root across memslot changes",
            root_before.is_some() && root_before == root_after,
            format!(
                "{} before the move, {} after (the series' root persists)",
                hex(root_before),
                hex(root_after)
            ),
        );
    } else {
        report.note(format!(
            "the IOMMU's own table: root {} before the move, {} after",
            hex(root_before),
            hex(root_after)
        ));
    }

    // Teardown, as a VMM unplugging the device.
    lab.edu
        .detach()
        .map_err(|e| anyhow::anyhow!("detaching edu: {}", errno_text(e)))?;
    if let Translation::Shared { hwpt } = lab.translation {
        lab.iommu.destroy(hwpt)?;
        let stopped = share::stop(lab.l2.vm_fd());
        lab.log.push(Action::ShareStop);
        report.check(
            "sharing stopped",
            stopped.is_ok(),
            match stopped {
                Ok(()) => "edu detached, its domain freed, KVM_TDP_SHARE_STOP".to_string(),
                Err(e) => format!("KVM_TDP_SHARE_STOP: {}", errno_text(e)),
            },
        );
    }
    lab.translation = Translation::None;

    // What the probes saw.
    let vm_id = u64::from(std::process::id());
    match recorder {
        Some(r) => {
            let recording = r.stop()?;
            probe_checks(&mut report, &lab, &recording, vm_id, &trace_path);
            if series {
                compare_with_model(&mut report, &lab, &recording, vm_id, &opts.out)?;
            }
        }
        None => report.note("no recorder given: the probe and model checks were skipped"),
    }

    let verdict = if report.failed == 0 { "PASS" } else { "FAIL" };
    println!(
        "TDPSHARE-LAB: {verdict} ({} passed, {} failed; {} kernel)",
        report.passed,
        report.failed,
        if series { "series" } else { "stock" }
    );
    Ok(report.failed == 0)
}

fn hex(v: Option<u64>) -> String {
    v.map_or("none".into(), |v| format!("{v:#x}"))
}

/// The checks on the recorded trace: the roots by address, the TDP events of the L2.
fn probe_checks(
    report: &mut Report,
    lab: &Lab,
    recording: &recorder::Recording,
    vm: u64,
    path: &Path,
) {
    let mine: Vec<&Event> = recording.events.iter().filter(|e| e.vm == vm).collect();
    let count = |f: fn(&EventKind) -> bool| mine.iter().filter(|e| f(&e.kind)).count();
    let roots: Vec<u64> = mine
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::RootAlloc(r) if !r.smm => Some(r.root),
            _ => None,
        })
        .collect();
    let switches: Vec<u64> = mine
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::RootSwitch(r) => Some(r.root),
            _ => None,
        })
        .collect();
    let spte = count(|k| matches!(k, EventKind::SpteSet { .. }));
    let faults = count(|k| matches!(k, EventKind::PageFault { .. }));
    let prepops = count(|k| matches!(k, EventKind::PrepopulateEnd { .. }));
    let flushes = count(|k| matches!(k, EventKind::IotlbFlush { .. }));
    let fast_zaps = count(|k| matches!(k, EventKind::FastZap { .. }));
    let memslots = count(|k| {
        matches!(
            k,
            EventKind::MemslotAdd(_) | EventKind::MemslotDelete(_) | EventKind::MemslotMove { .. }
        )
    });
    report.check(
        "probes recorded the L2",
        recording.drops == 0
            && !roots.is_empty()
            && spte > 0
            && memslots > 0
            && (!lab.series || (prepops > 0 && flushes > 0)),
        format!(
            "{} events of this VMM in {}: {} roots, {spte} SPTE changes, {faults} TDP faults, \
             {memslots} memslot calls, {prepops} pre-populations, {flushes} IOTLB flushes; \
             {} records dropped in the kernel",
            mine.len(),
            path.display(),
            roots.len(),
            recording.drops
        ),
    );
    // Real addresses (the CO-RE probe) are page-aligned physical addresses, never the small
    // numbers roots get without it.
    let real = !roots.is_empty() && roots.iter().all(|&r| r % 4096 == 0 && r >= 1 << 20);
    let at_attach = lab
        .iommu_roots
        .iter()
        .find(|(when, _)| *when == "at attach")
        .and_then(|(_, r)| *r);
    let roots_text = roots
        .iter()
        .map(|r| format!("{r:#x}"))
        .collect::<Vec<_>>()
        .join(" ");
    if lab.series {
        let ok = real
            && at_attach.is_some()
            && switches.first().copied() == at_attach
            && roots.contains(&at_attach.unwrap_or(0))
            && roots.len() == 1;
        report.check(
            "the IOMMU walks KVM's root",
            ok,
            format!(
                "VT-d entry {}, tdpshare:root_update {}, kvm_mmu_page.spt (CO-RE) {roots_text}: \
                 one root for the whole run",
                hex(at_attach),
                switches
                    .first()
                    .map_or("none".into(), |r| format!("{r:#x}")),
            ),
        );
    } else {
        report.check(
            "separate tables on the stock kernel",
            real && at_attach.is_some() && !roots.contains(&at_attach.unwrap_or(0)),
            format!(
                "the IOMMU's own table at {}, KVM's roots {roots_text}: {fast_zaps} fast zaps \
                 (each memslot deletion invalidates KVM's roots; a new one comes when the vCPU \
                 next runs), the IOMMU's table stayed",
                hex(at_attach),
            ),
        );
    }
}

/// The same actions in the simulator, and the counts side by side.
fn compare_with_model(
    report: &mut Report,
    lab: &Lab,
    recording: &recorder::Recording,
    vm: u64,
    out: &Path,
) -> anyhow::Result<()> {
    let trace = &recording.events;
    let machine = model::Machine {
        scalable: lab.scalable,
        snoop_control: lab.vtd.1 & (1 << 7) != 0,
        huge_pages: std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| s.contains("[always]")),
        max_huge_level: lab.granted.map_or(1, |g| g.max_huge_level as u8),
    };
    let scenario = model::scenario(&lab.log, machine)?;
    let path = out.join("lab-scenario.toml");
    std::fs::write(&path, scenario.to_toml())
        .with_context(|| format!("writing {}", path.display()))?;
    let model = model::model_counts(&scenario)?;
    let kernel = model::kernel_counts(trace, vm);
    report.note(format!(
        "model vs kernel ({} steps, {}; the simulator: `sharetop --simulate {}`):",
        lab.log.len(),
        path.display(),
        path.display()
    ));
    let mut all_same = true;
    for (name, k, m, why) in model::rows(kernel, model) {
        let verdict = match why {
            _ if k == m => "same",
            None => {
                all_same = false;
                "DIFFER"
            }
            Some(_) => "differ by design (below)",
        };
        report.note(format!(
            "  {name:<24} kernel {k:>8}  model {m:>8}  {verdict}"
        ));
        if let (Some(why), false) = (why, k == m) {
            report.note(format!("    {name}: {why}"));
        }
    }
    report.check(
        "model and kernel agree",
        all_same,
        if all_same {
            "roots, full pre-populations, entries and flushed deletions are the same".to_string()
        } else {
            "see the table above and docs/lab.md".to_string()
        },
    );
    Ok(())
}
