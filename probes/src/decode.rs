//! Ring-buffer records → the one event model.
//!
//! Tracepoint records are decoded field by field, by name, with the running kernel's format
//! files; ioctl records carry the command's argument struct (a stable UAPI layout).

use std::collections::HashMap;

use tdpshare::decision::format::Layout;
use tdpshare::event::{
    Event, EventKind, FlushScope, GpaRange, Memslot, PageSize, PrepopCause, Root, RootCause,
    Source, SpteFlags,
};
use tdpshare::{Gfn, Gpa, Iova, Kind, Level, PteFormat, SlotTracker};
use tdpshare_probes_common::{ProbeId, Record, is_cr_write_exit};

use crate::btf::RoleLayout;
use crate::tracefs::Format;

/// Parses a ring-buffer entry; `None` if it is not a whole record.
pub fn parse_record(bytes: &[u8]) -> Option<Record> {
    Record::from_bytes(bytes)
}

/// Encodes a record as the eBPF side lays it out (for tests and replays of raw captures).
pub fn encode_record(r: &Record) -> Vec<u8> {
    r.to_bytes().to_vec()
}

fn le_u32(d: &[u8], o: usize) -> u64 {
    u64::from(u32::from_le_bytes(d[o..o + 4].try_into().unwrap_or([0; 4])))
}

fn le_u64(d: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(d[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// A level field of a tracepoint; anything but 1..=5 makes the record undecodable.
fn level_of(raw: u64) -> Result<Level, ()> {
    u8::try_from(raw).ok().and_then(Level::new).ok_or(())
}

/// Turns records into events.
#[derive(Debug)]
pub struct Decoder {
    formats: HashMap<ProbeId, Format>,
    role: RoleLayout,
    /// The host's TDP entry format (EPT on Intel, NPT on AMD), for `spte` fields.
    spte: PteFormat,
    /// CLOCK_MONOTONIC at the trace's start: event times are relative to it.
    start_mono_ns: u64,
    slots: HashMap<u32, SlotTracker>,
    roots: HashMap<u32, u64>,
    /// The root level seen for each VM (4 or 5) once a root of that level appeared.
    vm_root_levels: HashMap<u32, u8>,
    /// The vCPU each thread runs, from the records that name it.
    vcpu_of_thread: HashMap<u32, u32>,
    /// Per thread: a CR write seen only as its exit (with the exit's CLOCK_MONOTONIC time),
    /// held until the thread's next record tells whether `kvm_cr` reports the same write with
    /// its value.
    pending_cr: HashMap<u32, (u64, Event)>,
    /// Records that could not be decoded (a field missing from the format, a bad memslot call).
    pub undecodable: u64,
    /// Records decoded into no event on purpose (failed ioctls, non-root page allocations,
    /// invalidation descriptors other than the IOTLB's).
    pub uneventful: u64,
    /// The CO-RE probe is attached: it reports roots (with their addresses), so the
    /// tracepoint's records of the same allocations yield nothing.
    pub core_roots: bool,
    /// The CO-RE entry probe is attached: it reports CR0/CR4 values as vCPUs enter with them,
    /// so CR-write exits yield nothing.
    pub core_cr_values: bool,
    /// Per thread: the mappings `tdpshare:prepopulate` reported since its last
    /// `KVM_PRE_FAULT_MEMORY` returned (entries, largest page), folded into that ioctl's one
    /// event when it returns.
    prefault_maps: HashMap<u32, (u64, PageSize)>,
    /// Per thread, with the series: the VT-d driver's invalidations (descriptors, cache-tag
    /// flushes) held with the CLOCK_MONOTONIC time of the first, until the thread's next
    /// record tells whether they were the implementation of KVM's `tdpshare:iotlb_flush`
    /// (traced after them, with the cost): then only that one stands.
    pending_flush: HashMap<u32, (u64, Vec<Event>)>,
}

impl Decoder {
    pub fn new(
        formats: HashMap<ProbeId, Format>,
        role: RoleLayout,
        spte: PteFormat,
        start_mono_ns: u64,
    ) -> Self {
        Self {
            formats,
            role,
            spte,
            start_mono_ns,
            slots: HashMap::new(),
            roots: HashMap::new(),
            vm_root_levels: HashMap::new(),
            vcpu_of_thread: HashMap::new(),
            pending_cr: HashMap::new(),
            undecodable: 0,
            uneventful: 0,
            core_roots: false,
            core_cr_values: false,
            prefault_maps: HashMap::new(),
            pending_flush: HashMap::new(),
        }
    }

    /// The running kernel's SPTE format: EPT on Intel hosts, NPT on AMD ones, in the sharing
    /// layout when the kernel carries the series (`series`: its tracepoints exist), in 6.12's
    /// own otherwise (the two put KVM's MMU-present marker in different bits).
    pub fn host_spte_format(series: bool) -> PteFormat {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let kind = if cpuinfo.contains("AuthenticAMD") || cpuinfo.contains("HygonGenuine") {
            Kind::Npt
        } else {
            Kind::Ept
        };
        let layout = if series {
            Layout::Sharing
        } else {
            Layout::Stock
        };
        PteFormat::with_layout(kind, 4, layout).unwrap_or(PteFormat::EPT4)
    }

    fn field(&self, id: ProbeId, r: &Record, name: &str) -> Option<u64> {
        self.formats.get(&id)?.read_u64(&r.data, name).ok()?
    }

    /// The events of one record (none, one, or two for a DMA map that also pins). A CR write
    /// seen as a VM exit is held back until the same thread's next record: when that is
    /// `kvm_cr` reporting the write with its value, only that one is kept.
    pub fn decode(&mut self, r: &Record) -> Vec<Event> {
        let kinds = match self.kinds(r) {
            Ok(k) => k,
            Err(()) => {
                self.undecodable += 1;
                return Vec::new();
            }
        };
        if kinds.is_empty() {
            self.uneventful += 1;
        }
        let ts = r.ts_ns.saturating_sub(self.start_mono_ns);
        let mut out = Vec::new();
        if let Some((_, held)) = self.pending_cr.remove(&r.tid) {
            let same_write = kinds.iter().any(|(k, _)| {
                matches!((k, &held.kind),
                    (EventKind::CrWrite { cr, value: Some(_) }, EventKind::CrWrite { cr: c, .. })
                        if cr == c)
            });
            if same_write {
                self.uneventful += 1;
            } else {
                out.push(held);
            }
        }
        let driver_flush = self.formats.contains_key(&ProbeId::TdpshareIotlbFlush)
            && [
                ProbeId::IntelQiSubmit as u32,
                ProbeId::IntelCacheTagFlushRange as u32,
                ProbeId::IntelCacheTagFlushRangeNp as u32,
            ]
            .contains(&r.probe);
        if !driver_flush && let Some((_, held)) = self.pending_flush.remove(&r.tid) {
            if r.probe == ProbeId::TdpshareIotlbFlush as u32 {
                self.uneventful += held.len() as u64;
            } else {
                out.extend(held);
            }
        }
        for (kind, vcpu) in kinds {
            let event = Event {
                ts_ns: ts,
                vm: u64::from(r.tgid),
                vcpu,
                source: Source::Live,
                kind,
            };
            if r.probe == ProbeId::KvmExit as u32 {
                self.pending_cr.insert(r.tid, (r.ts_ns, event));
            } else if driver_flush {
                self.pending_flush
                    .entry(r.tid)
                    .or_insert((r.ts_ns, Vec::new()))
                    .1
                    .push(event);
            } else {
                out.push(event);
            }
        }
        out
    }

    /// The CR writes and driver invalidations held back since before `before_mono_ns`
    /// (CLOCK_MONOTONIC) whose thread said nothing more: no `kvm_cr` reported the writes, no
    /// `tdpshare:iotlb_flush` claimed the invalidations; they stand as they are.
    pub fn flush_pending(&mut self, before_mono_ns: u64) -> Vec<Event> {
        let due: Vec<u32> = self
            .pending_cr
            .iter()
            .filter(|(_, (at, _))| *at < before_mono_ns)
            .map(|(&tid, _)| tid)
            .collect();
        let mut out: Vec<Event> = due
            .into_iter()
            .filter_map(|tid| self.pending_cr.remove(&tid).map(|(_, e)| e))
            .collect();
        let due: Vec<u32> = self
            .pending_flush
            .iter()
            .filter(|(_, (at, _))| *at < before_mono_ns)
            .map(|(&tid, _)| tid)
            .collect();
        for tid in due {
            if let Some((_, held)) = self.pending_flush.remove(&tid) {
                out.extend(held);
            }
        }
        out.sort_by_key(|e| e.ts_ns);
        out
    }

    /// Whether a shadow page of `role` at `gfn` is (the first page of) a root, and the root's
    /// level. KVM traces every shadow page but says nothing of roots, so: a page at level 4 or
    /// 5 is a root (TDP traces only roots; the shadow MMU's children are below their root);
    /// with no such root in the VM, the four direct level-2 pages at 1 GiB-aligned gfns are a
    /// PAE root set (a non-paging or PAE guest), reported once, at its first page, as level 3.
    /// Non-direct PAE roots (shadowing a PAE guest's tables) cannot be told from their children
    /// here: they are counted, not reported.
    fn root_level(&mut self, tgid: u32, gfn: u64, role: u32) -> Option<u8> {
        let level = self.role.level(role);
        if level >= 4 {
            self.vm_root_levels.insert(tgid, level);
            return Some(level);
        }
        (self.is_pae_root_page(tgid, gfn, role) && gfn == 0).then_some(3)
    }

    fn is_pae_root_page(&self, tgid: u32, gfn: u64, role: u32) -> bool {
        self.role.level(role) == 2
            && self.role.direct(role)
            && gfn & ((1 << 18) - 1) == 0
            && gfn < 4 << 18
            && self.vm_root_levels.get(&tgid).is_none_or(|&l| l < 4)
    }

    fn next_root(&mut self, tgid: u32) -> u64 {
        let n = self.roots.entry(tgid).or_insert(0);
        *n += 1;
        *n
    }

    /// The events of record `r`. Every probe of the list has its arm here: the match is
    /// exhaustive, so a probe added to the list does not build until it is decoded.
    fn kinds(&mut self, r: &Record) -> Result<Vec<(EventKind, Option<u32>)>, ()> {
        let id = ProbeId::from_u32(r.probe).ok_or(())?;
        let f = |name: &str| self.field(id, r, name).ok_or(());
        let one = |k: EventKind| Ok(vec![(k, None)]);
        match id {
            ProbeId::KvmMmuGetPage => {
                let (gfn, role, created) = (f("gfn")?, f("role")? as u32, f("created")? != 0);
                if !created || self.role.invalid(role) || self.core_roots {
                    return Ok(vec![]);
                }
                let Some(level) = self.root_level(r.tgid, gfn, role) else {
                    return Ok(vec![]);
                };
                let smm = self.role.smm(role);
                let root = self.next_root(r.tgid);
                one(EventKind::RootAlloc(Root {
                    root,
                    level,
                    smm,
                    cause: RootCause::Unknown,
                }))
            }
            ProbeId::KvmMmuPageCore => {
                // probes/core/mmu_page.bpf.c: role, created, tdp_mmu_page, has a parent entry,
                // address known, gfn, the table's host-physical address.
                let d = &r.data;
                let role = le_u32(d, 0) as u32;
                let (created, tdp, child, known) = (d[4] != 0, d[5] != 0, d[6] != 0, d[7] != 0);
                let (gfn, hpa) = (le_u64(d, 8), le_u64(d, 16));
                if !created || self.role.invalid(role) {
                    return Ok(vec![]);
                }
                // A TDP MMU root is the page with no parent entry; the shadow MMU's roots
                // still have to be told by level.
                let level = if tdp {
                    if child {
                        return Ok(vec![]);
                    }
                    self.role.level(role)
                } else {
                    match self.root_level(r.tgid, gfn, role) {
                        Some(level) => level,
                        None => return Ok(vec![]),
                    }
                };
                let root = if known { hpa } else { self.next_root(r.tgid) };
                one(EventKind::RootAlloc(Root {
                    root,
                    level,
                    smm: self.role.smm(role),
                    cause: RootCause::Unknown,
                }))
            }
            ProbeId::KvmMmuPrepareZapPage => {
                let (gfn, role) = (f("gfn")?, f("role")? as u32);
                if let Some(level) = self.root_level(r.tgid, gfn, role) {
                    return one(EventKind::RootFree(Root {
                        root: 0,
                        level,
                        smm: self.role.smm(role),
                        cause: RootCause::Unknown,
                    }));
                }
                if self.is_pae_root_page(r.tgid, gfn, role) {
                    return Ok(vec![]); // the other three pages of a PAE root set
                }
                let size = level_of(u64::from(self.role.level(role)))?.size();
                one(EventKind::Zap {
                    range: GpaRange::new(Gfn(gfn).gpa().align_down(size), size),
                    tables: true,
                    entries: 1,
                })
            }
            ProbeId::KvmMmuZapAllFast => one(EventKind::FastZap {
                generation: f("mmu_valid_gen")?,
                pages: f("mmu_used_pages")?,
            }),
            ProbeId::KvmMmuSplitHugePage => one(EventKind::HugePageSplit {
                gfn: Gfn(f("gfn")?),
                level: level_of(f("level")?)?.get(),
            }),
            ProbeId::KvmMmuSetSpte => {
                let level = level_of(f("level")?)?;
                one(EventKind::SpteSet {
                    gfn: Gfn(f("gfn")?),
                    level: level.get(),
                    old: SpteFlags::empty(),
                    new: SpteFlags::of_entry(&self.spte, f("spte")?, level),
                })
            }
            ProbeId::KvmTdpMmuSpteChanged => {
                let level = level_of(f("level")?)?;
                one(EventKind::SpteSet {
                    gfn: Gfn(f("gfn")?),
                    level: level.get(),
                    old: SpteFlags::of_entry(&self.spte, f("old_spte")?, level),
                    new: SpteFlags::of_entry(&self.spte, f("new_spte")?, level),
                })
            }
            ProbeId::KvmPageFault => {
                let vcpu = f("vcpu_id")? as u32;
                let kind = EventKind::PageFault {
                    gfn: Gpa(f("fault_address")?).gfn(),
                    error_code: f("error_code")?,
                };
                self.vcpu_of_thread.insert(r.tid, vcpu);
                Ok(vec![(kind, Some(vcpu))])
            }
            ProbeId::KvmSmmTransition => {
                let vcpu = f("vcpu_id")? as u32;
                let enter = f("entering")? != 0;
                self.vcpu_of_thread.insert(r.tid, vcpu);
                Ok(vec![(EventKind::SmmTransition { enter }, Some(vcpu))])
            }
            ProbeId::KvmCr => {
                let (rw, cr) = (f("rw")?, f("cr")?);
                if rw == 0 || (cr != 0 && cr != 4) {
                    return Ok(vec![]);
                }
                let value = Some(f("val")?);
                let vcpu = self.vcpu_of_thread.get(&r.tid).copied();
                Ok(vec![(
                    EventKind::CrWrite {
                        cr: cr as u8,
                        value,
                    },
                    vcpu,
                )])
            }
            ProbeId::KvmExit => {
                let vcpu = f("vcpu_id")? as u32;
                let cr = is_cr_write_exit(f("isa")?, f("exit_reason")?, f("info1")?);
                self.vcpu_of_thread.insert(r.tid, vcpu);
                match cr {
                    // The CO-RE entry probe reports the values the write left: the exit
                    // alone says less.
                    Some(_) if self.core_cr_values => Ok(vec![]),
                    Some(cr) => Ok(vec![(EventKind::CrWrite { cr, value: None }, Some(vcpu))]),
                    None => Ok(vec![]),
                }
            }
            ProbeId::KvmEntryCore => {
                // probes/core/mmu_page.bpf.c: CR0, CR4, vcpu_id, which of the two changed.
                let d = &r.data;
                let (cr0, cr4) = (le_u64(d, 0), le_u64(d, 8));
                let vcpu = le_u32(d, 16) as u32;
                let changed = d[20];
                self.vcpu_of_thread.insert(r.tid, vcpu);
                let mut out = Vec::new();
                for (bit, cr, value) in [(1, 0, cr0), (2, 4, cr4)] {
                    if changed & bit != 0 {
                        let value = Some(value);
                        out.push((EventKind::CrWrite { cr, value }, Some(vcpu)));
                    }
                }
                Ok(out)
            }
            ProbeId::IommuMap => one(EventKind::IommuMap {
                iova: Iova(f("iova")?),
                size: f("size")?,
                ns: 0,
            }),
            ProbeId::IommuUnmap => one(EventKind::IommuUnmap {
                iova: Iova(f("iova")?),
                size: f("unmapped_size").or_else(|_| f("size"))?,
                ns: 0,
            }),
            ProbeId::IommuIoPageFault => one(EventKind::IoPageFault {
                iova: Iova(f("iova")?),
                // IOMMU_FAULT_WRITE
                write: f("flags")? & 0x1 != 0,
                resolved: false,
            }),
            ProbeId::IntelQiSubmit => {
                let (qw0, qw1) = (f("qw0")?, f("qw1")?);
                // VT-d queued-invalidation descriptors: type 2 is an IOTLB invalidation,
                // granularity in bits 4-5, domain in 16-31; PSI address, invalidation hint
                // (bit 6: leaves only) and mask in qw1.
                if qw0 & 0xf != 2 {
                    return Ok(vec![]);
                }
                let domain = Some(((qw0 >> 16) & 0xffff) as u32);
                let (scope, range) = match (qw0 >> 4) & 0x3 {
                    1 => (FlushScope::All, None),
                    2 => (FlushScope::Domain, None),
                    _ => (
                        if qw1 & 0x40 != 0 {
                            FlushScope::RangeLeaves
                        } else {
                            FlushScope::Range
                        },
                        Some(GpaRange::new(
                            Gpa(qw1).align_down(4096),
                            4096u64.checked_shl((qw1 & 0x3f) as u32).unwrap_or(u64::MAX),
                        )),
                    ),
                };
                one(EventKind::IotlbFlush {
                    scope,
                    domain: if scope == FlushScope::All {
                        None
                    } else {
                        domain
                    },
                    range,
                    ns: 0,
                })
            }
            ProbeId::IntelCacheTagFlushRange | ProbeId::IntelCacheTagFlushRangeNp => {
                let (start, end) = (f("start")?, f("end")?);
                one(EventKind::IotlbFlush {
                    scope: FlushScope::Range,
                    domain: f("domain_id").ok().map(|d| d as u32),
                    range: Some(GpaRange::new(
                        Gpa(start),
                        end.saturating_sub(start).saturating_add(1),
                    )),
                    ns: 0,
                })
            }
            ProbeId::TdpsharePrepopulate => {
                // The series traces each mapping KVM_PRE_FAULT_MEMORY makes, inside the ioctl:
                // they are folded into the ioctl's event when it returns (one pre-population
                // of the range the VMM asked for, with the entries and sizes really written).
                let size = level_of(f("level")?)?
                    .page_size()
                    .unwrap_or(PageSize::Size4K);
                let entries = f("entries")?;
                let acc = self
                    .prefault_maps
                    .entry(r.tid)
                    .or_insert((0, PageSize::Size4K));
                // A record's count is the kernel's to write: a corrupt one saturates the sum.
                acc.0 = acc.0.saturating_add(entries);
                if size.bytes() > acc.1.bytes() {
                    acc.1 = size;
                }
                Ok(vec![])
            }
            ProbeId::TdpshareRootUpdate => one(EventKind::RootSwitch(Root {
                root: f("root")?,
                level: f("level")? as u8,
                smm: f("as_id").unwrap_or(0) != 0,
                // TDPSHARE_ROOT_* of the series' tdpshare_trace.h.
                cause: match f("cause") {
                    Ok(0) => RootCause::Initial,
                    Ok(1) => RootCause::MemslotChange,
                    Ok(2) => RootCause::Smm,
                    Ok(3) => RootCause::ContextReset,
                    Ok(4) => RootCause::Released,
                    _ => RootCause::Unknown,
                },
            })),
            ProbeId::TdpshareIotlbFlush => {
                let size = f("size")?;
                one(EventKind::IotlbFlush {
                    scope: if size == 0 {
                        FlushScope::Domain
                    } else {
                        FlushScope::Range
                    },
                    domain: None,
                    range: (size != 0).then(|| GpaRange::new(Gpa(f("start").unwrap_or(0)), size)),
                    ns: f("ns")?,
                })
            }
            // ioctls: the command's argument struct (a stable UAPI layout); a refused call
            // changed nothing.
            // A failed KVM_PRE_FAULT_MEMORY mapped nothing it reports; drop what it traced.
            _ if id.is_ioctl() && r.ret != 0 => {
                self.prefault_maps.remove(&r.tid);
                Ok(vec![])
            }
            ProbeId::IoctlSetUserMemoryRegion | ProbeId::IoctlSetUserMemoryRegion2 => {
                // struct kvm_userspace_memory_region(2): slot, flags, guest_phys_addr,
                // memory_size, userspace_addr.
                let d = &r.data;
                let (as_id, slot) = SlotTracker::split_slot_id(le_u32(d, 0) as u32);
                let call = Memslot {
                    slot,
                    as_id,
                    flags: le_u32(d, 4) as u32,
                    gpa: Gpa(le_u64(d, 8)),
                    size: le_u64(d, 16),
                    ua: le_u64(d, 24),
                };
                let tracker = self.slots.entry(r.tgid).or_default();
                // A slot created before recording began is unknown: a delete of it is still
                // reported, with the call's own (zero) extent.
                match tracker.apply(call) {
                    Ok(k) => one(k),
                    Err(_) => one(EventKind::MemslotDelete(call)),
                }
            }
            ProbeId::IoctlPreFaultMemory => {
                // struct kvm_pre_fault_memory: gpa, size, flags. Without the series' tracepoint
                // the entries are an estimate (4 KiB each); with it, the mappings made.
                let range = GpaRange::new(Gpa(le_u64(&r.data, 0)), le_u64(&r.data, 8));
                let (entries, page_size) = match self.prefault_maps.remove(&r.tid) {
                    Some((n, size)) => (n, size),
                    None => (range.pages_4k(), PageSize::Size4K),
                };
                one(EventKind::PrepopulateEnd {
                    range,
                    page_size,
                    cause: PrepopCause::PreFault,
                    entries,
                    leaves: None,
                    ns: r.latency_ns,
                })
            }
            ProbeId::IoctlVfioMapDma => {
                // struct vfio_iommu_type1_dma_map: argsz, flags, vaddr, iova, size.
                Ok(dma(r, true, Iova(le_u64(&r.data, 16)), le_u64(&r.data, 24)))
            }
            ProbeId::IoctlVfioUnmapDma => {
                // struct vfio_iommu_type1_dma_unmap: argsz, flags, iova, size.
                Ok(dma(r, false, Iova(le_u64(&r.data, 8)), le_u64(&r.data, 16)))
            }
            ProbeId::IoctlIoasMap => {
                // struct iommu_ioas_map: size, flags, ioas_id, reserved, user_va, length, iova.
                Ok(dma(r, true, Iova(le_u64(&r.data, 32)), le_u64(&r.data, 24)))
            }
            ProbeId::IoctlIoasUnmap => {
                // struct iommu_ioas_unmap: size, ioas_id, iova, length.
                Ok(dma(r, false, Iova(le_u64(&r.data, 8)), le_u64(&r.data, 16)))
            }
        }
    }
}

/// A timed DMA map (and the pin it implies) or unmap (and its unpin) of `size` bytes at `iova`.
fn dma(r: &Record, map: bool, iova: Iova, size: u64) -> Vec<(EventKind, Option<u32>)> {
    let (ns, range) = (r.latency_ns, GpaRange::new(iova.gpa(), size));
    let pages = range.pages_4k();
    let kinds = if map {
        [
            EventKind::IommuMap { iova, size, ns },
            EventKind::Pin { range, pages },
        ]
    } else {
        [
            EventKind::IommuUnmap { iova, size, ns },
            EventKind::Unpin { range, pages },
        ]
    };
    kinds.into_iter().map(|k| (k, None)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tdpshare_probes_common::RECORD_DATA;

    fn format(file: &str, system: &str) -> Format {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/tracefs-6.18")
            .join(file);
        Format::parse(system, &std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn decoder() -> Decoder {
        let mut formats = HashMap::new();
        formats.insert(
            ProbeId::KvmMmuGetPage,
            format("kvmmmu_kvm_mmu_get_page.format", "kvmmmu"),
        );
        formats.insert(
            ProbeId::KvmMmuZapAllFast,
            format("kvmmmu_kvm_mmu_zap_all_fast.format", "kvmmmu"),
        );
        formats.insert(
            ProbeId::KvmTdpMmuSpteChanged,
            format("kvmmmu_kvm_tdp_mmu_spte_changed.format", "kvmmmu"),
        );
        formats.insert(
            ProbeId::KvmPageFault,
            format("kvm_kvm_page_fault.format", "kvm"),
        );
        formats.insert(ProbeId::IommuMap, format("iommu_map.format", "iommu"));
        formats.insert(
            ProbeId::KvmSmmTransition,
            format("kvm_kvm_smm_transition.format", "kvm"),
        );
        formats.insert(ProbeId::KvmCr, format("kvm_kvm_cr.format", "kvm"));
        formats.insert(ProbeId::KvmExit, format("kvm_kvm_exit.format", "kvm"));
        Decoder::new(formats, RoleLayout::LINUX_6, PteFormat::EPT4, 1_000)
    }

    /// A kvm_exit record of an SVM exit with `reason` on vCPU 2.
    fn svm_exit(reason: u32) -> Record {
        record(
            ProbeId::KvmExit,
            &[
                (8, &reason.to_le_bytes()),
                (24, &2u32.to_le_bytes()),
                (56, &2u32.to_le_bytes()),
            ],
        )
    }

    /// A kvm_cr write of `cr` = `val`.
    fn cr_write(cr: u32, val: u64) -> Record {
        record(
            ProbeId::KvmCr,
            &[
                (8, &1u32.to_le_bytes()),
                (12, &cr.to_le_bytes()),
                (16, &val.to_le_bytes()),
            ],
        )
    }

    #[test]
    fn smm_transitions_and_cr_writes_are_decoded_once_each() {
        let mut d = decoder();
        let smm = record(
            ProbeId::KvmSmmTransition,
            &[(8, &2u32.to_le_bytes()), (24, &[1])],
        );
        let ev = d.decode(&smm);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].kind.clone(), ev[0].vcpu),
            (EventKind::SmmTransition { enter: true }, Some(2))
        );
        // An exit that also reaches kvm_cr: one event, with the value, on the exit's vCPU.
        assert!(d.decode(&svm_exit(0x65)).is_empty(), "held for kvm_cr");
        let ev = d.decode(&cr_write(0, 0x8005_0033));
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].kind.clone(), ev[0].vcpu),
            (
                EventKind::CrWrite {
                    cr: 0,
                    value: Some(0x8005_0033)
                },
                Some(2)
            )
        );
        // An exit kvm_cr never reports (an emulated write): it stands once the thread moves
        // on, or once it is old enough.
        assert!(d.decode(&svm_exit(0x14)).is_empty());
        let ev = d.decode(&smm);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].kind, EventKind::CrWrite { cr: 4, value: None });
        assert!(d.decode(&svm_exit(0x10)).is_empty());
        assert!(
            d.flush_pending(6_000).is_empty(),
            "not older than the cut-off"
        );
        let ev = d.flush_pending(6_001);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, EventKind::CrWrite { cr: 0, value: None });
        // Reads, CR3, and exits that write no CR0/CR4 are no events.
        let read = record(ProbeId::KvmCr, &[(12, &0u32.to_le_bytes())]);
        assert!(d.decode(&read).is_empty());
        assert!(d.decode(&cr_write(3, 0x1000)).is_empty());
        assert!(d.decode(&svm_exit(0x78)).is_empty());
        assert!(d.flush_pending(u64::MAX).is_empty(), "HLT held nothing");
    }

    #[test]
    fn the_entry_probe_gives_cr_values_and_silences_the_exits() {
        let entry = |cr0: u64, cr4: u64, changed: u8| {
            record(
                ProbeId::KvmEntryCore,
                &[
                    (0, &cr0.to_le_bytes()),
                    (8, &cr4.to_le_bytes()),
                    (16, &1u32.to_le_bytes()),
                    (20, &[changed]),
                ],
            )
        };
        let mut d = decoder();
        d.core_cr_values = true;
        // A vCPU's first entry reports both registers.
        let ev = d.decode(&entry(0x6000_0010, 0, 3));
        let kinds: Vec<_> = ev.iter().map(|e| (e.kind.clone(), e.vcpu)).collect();
        assert_eq!(
            kinds,
            [
                (
                    EventKind::CrWrite {
                        cr: 0,
                        value: Some(0x6000_0010)
                    },
                    Some(1)
                ),
                (
                    EventKind::CrWrite {
                        cr: 4,
                        value: Some(0)
                    },
                    Some(1)
                ),
            ]
        );
        // A CR0 write exit says nothing now, held or flushed: the entry after it does.
        assert!(d.decode(&svm_exit(0x65)).is_empty());
        assert!(d.flush_pending(u64::MAX).is_empty());
        let ev = d.decode(&entry(0x8005_0033, 0, 1));
        assert_eq!(ev.len(), 1);
        assert_eq!(
            ev[0].kind,
            EventKind::CrWrite {
                cr: 0,
                value: Some(0x8005_0033)
            }
        );
        // Without the entry probe the exit still stands (value unknown).
        let mut d = decoder();
        assert!(d.decode(&svm_exit(0x65)).is_empty());
        assert_eq!(
            d.flush_pending(u64::MAX)[0].kind,
            EventKind::CrWrite { cr: 0, value: None }
        );
    }

    /// A record of `probe` whose raw data has `fields` (offset, bytes) set.
    fn record(probe: ProbeId, fields: &[(usize, &[u8])]) -> Record {
        let mut data = [0; RECORD_DATA];
        for (off, bytes) in fields {
            data[*off..*off + bytes.len()].copy_from_slice(bytes);
        }
        Record {
            probe: probe as u32,
            tgid: 4242,
            tid: 4243,
            cpu: 1,
            ts_ns: 6_000,
            latency_ns: 0,
            ret: 0,
            data,
        }
    }

    /// The `intel_iommu:qi_submit` format as drivers/iommu/intel/trace.h lays it out (no
    /// machine here has a VT-d to record it from).
    const QI_SUBMIT_FORMAT: &str = "name: qi_submit
ID: 1500
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:u64 qw0;\toffset:8;\tsize:8;\tsigned:0;
\tfield:u64 qw1;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u64 qw2;\toffset:24;\tsize:8;\tsigned:0;
\tfield:u64 qw3;\toffset:32;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] iommu;\toffset:40;\tsize:4;\tsigned:0;

print fmt: \"%s\", __get_str(iommu)
";

    #[test]
    fn a_page_selective_iotlb_descriptor_tells_leaf_only_from_full() {
        let mut formats = HashMap::new();
        formats.insert(
            ProbeId::IntelQiSubmit,
            Format::parse("intel_iommu", QI_SUBMIT_FORMAT).unwrap(),
        );
        let mut d = Decoder::new(formats, RoleLayout::LINUX_6, PteFormat::EPT4, 1_000);
        // Type 2 (IOTLB), granularity 3 (page-selective), domain 9; 2 MiB at 0x200000.
        let qw0: u64 = 2 | (3 << 4) | (9 << 16);
        for (ih, scope) in [(0u64, FlushScope::Range), (1, FlushScope::RangeLeaves)] {
            let qw1: u64 = 0x20_0000 | (ih << 6) | 9;
            let r = record(
                ProbeId::IntelQiSubmit,
                &[(8, &qw0.to_le_bytes()), (16, &qw1.to_le_bytes())],
            );
            let ev = d.decode(&r);
            assert_eq!(ev.len(), 1);
            assert_eq!(
                ev[0].kind,
                EventKind::IotlbFlush {
                    scope,
                    domain: Some(9),
                    range: Some(GpaRange::new(Gpa(0x20_0000), 2 << 20)),
                    ns: 0,
                }
            );
        }
    }

    /// A decoder with the series' tracepoints, formats as the patched kernel printed them
    /// (fixtures/tracefs-6.12-series, recorded by `cargo xtask kernel boot`).
    fn series_decoder() -> Decoder {
        let fmt = |file: &str| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fixtures/tracefs-6.12-series")
                .join(file);
            Format::parse("tdpshare", &std::fs::read_to_string(path).unwrap()).unwrap()
        };
        let mut formats = HashMap::new();
        formats.insert(
            ProbeId::TdpsharePrepopulate,
            fmt("tdpshare_prepopulate.format"),
        );
        formats.insert(
            ProbeId::TdpshareRootUpdate,
            fmt("tdpshare_root_update.format"),
        );
        formats.insert(
            ProbeId::TdpshareIotlbFlush,
            fmt("tdpshare_iotlb_flush.format"),
        );
        Decoder::new(formats, RoleLayout::LINUX_6, PteFormat::NPT4, 1_000)
    }

    #[test]
    fn the_series_tracepoints_decode_from_the_patched_kernel_s_formats() {
        let mut d = series_decoder();
        // prepopulate: gfn 0x200-0x400, level 2, 1 entry, 1500 ns.
        let r = record(
            ProbeId::TdpsharePrepopulate,
            &[
                (8, &0x200u64.to_le_bytes()),
                (16, &0x400u64.to_le_bytes()),
                (24, &2u32.to_le_bytes()),
                (32, &1u64.to_le_bytes()),
                (40, &1500u64.to_le_bytes()),
            ],
        );
        // Folded into the KVM_PRE_FAULT_MEMORY that made it (same thread), with a 4 KiB
        // mapping made by the same call: one pre-population of the asked range, 2 entries.
        assert!(d.decode(&r).is_empty());
        let small = record(
            ProbeId::TdpsharePrepopulate,
            &[
                (8, &0x400u64.to_le_bytes()),
                (16, &0x401u64.to_le_bytes()),
                (24, &1u32.to_le_bytes()),
                (32, &1u64.to_le_bytes()),
                (40, &700u64.to_le_bytes()),
            ],
        );
        assert!(d.decode(&small).is_empty());
        let mut ioctl = record(
            ProbeId::IoctlPreFaultMemory,
            &[
                (0, &0x20_0000u64.to_le_bytes()),
                (8, &0x20_1000u64.to_le_bytes()),
            ],
        );
        ioctl.latency_ns = 9000;
        let ev = d.decode(&ioctl);
        assert_eq!(
            ev[0].kind,
            EventKind::PrepopulateEnd {
                range: GpaRange::new(Gpa(0x20_0000), 0x20_1000),
                page_size: PageSize::Size2M,
                cause: PrepopCause::PreFault,
                entries: 2,
                leaves: None,
                ns: 9000,
            }
        );
        // The next call without series records is estimated, 4 KiB pages.
        let ev = d.decode(&ioctl);
        assert!(matches!(
            ev[0].kind,
            EventKind::PrepopulateEnd {
                entries: 0x201,
                page_size: PageSize::Size4K,
                ..
            }
        ));
        // root_update with its cause (1: a memslot change).
        let r = record(
            ProbeId::TdpshareRootUpdate,
            &[
                (8, &0x1234_5000u64.to_le_bytes()),
                (16, &4u32.to_le_bytes()),
                (20, &0u32.to_le_bytes()),
                (24, &1u32.to_le_bytes()),
            ],
        );
        let ev = d.decode(&r);
        assert_eq!(
            ev[0].kind,
            EventKind::RootSwitch(Root {
                root: 0x1234_5000,
                level: 4,
                smm: false,
                cause: RootCause::MemslotChange,
            })
        );
        // iotlb_flush of the whole domain (size 0).
        let r = record(
            ProbeId::TdpshareIotlbFlush,
            &[
                (8, &0u64.to_le_bytes()),
                (16, &0u64.to_le_bytes()),
                (24, &900u64.to_le_bytes()),
            ],
        );
        let ev = d.decode(&r);
        assert_eq!(
            ev[0].kind,
            EventKind::IotlbFlush {
                scope: FlushScope::Domain,
                domain: None,
                range: None,
                ns: 900
            }
        );
    }

    /// Found by the record_decoder fuzz target: two prepopulate records whose entry counts
    /// sum past u64 overflowed the fold (a panic with overflow checks, a wrong count without).
    #[test]
    fn absurd_entry_counts_saturate_instead_of_overflowing() {
        let mut d = series_decoder();
        let huge = record(
            ProbeId::TdpsharePrepopulate,
            &[
                (8, &0x200u64.to_le_bytes()),
                (16, &0x400u64.to_le_bytes()),
                (24, &1u32.to_le_bytes()),
                (32, &u64::MAX.to_le_bytes()),
            ],
        );
        assert!(d.decode(&huge).is_empty());
        assert!(d.decode(&huge).is_empty());
        let ev = d.decode(&record(
            ProbeId::IoctlPreFaultMemory,
            &[(8, &0x1000u64.to_le_bytes())],
        ));
        assert!(matches!(
            ev[0].kind,
            EventKind::PrepopulateEnd {
                entries: u64::MAX,
                ..
            }
        ));
    }

    #[test]
    fn driver_invalidations_inside_kvm_s_flush_are_not_counted_twice() {
        let mut d = series_decoder();
        d.formats.insert(
            ProbeId::IntelQiSubmit,
            Format::parse("intel_iommu", QI_SUBMIT_FORMAT).unwrap(),
        );
        // A domain-selective IOTLB descriptor (type 2, granularity 2, domain 9)...
        let qw0: u64 = 2 | (2 << 4) | (9 << 16);
        let qi = record(ProbeId::IntelQiSubmit, &[(8, &qw0.to_le_bytes())]);
        let kvm_flush = record(
            ProbeId::TdpshareIotlbFlush,
            &[
                (8, &0u64.to_le_bytes()),
                (16, &0u64.to_le_bytes()),
                (24, &900u64.to_le_bytes()),
            ],
        );
        // ... inside KVM's flush (same thread, traced after it): one flush, KVM's.
        assert!(d.decode(&qi).is_empty());
        let ev = d.decode(&kvm_flush);
        assert_eq!(ev.len(), 1);
        assert!(matches!(ev[0].kind, EventKind::IotlbFlush { ns: 900, .. }));
        // One the driver issued on its own (an IOAS unmap) stands, released by the thread's
        // next record or by time.
        assert!(d.decode(&qi).is_empty());
        let other = record(
            ProbeId::TdpshareRootUpdate,
            &[(8, &0x5000u64.to_le_bytes()), (16, &4u32.to_le_bytes())],
        );
        let ev = d.decode(&other);
        assert_eq!(ev.len(), 2);
        assert!(matches!(
            ev[0].kind,
            EventKind::IotlbFlush {
                domain: Some(9),
                ..
            }
        ));
        assert!(d.decode(&qi).is_empty());
        assert!(d.flush_pending(5_000).is_empty());
        assert_eq!(d.flush_pending(7_000).len(), 1);
    }

    #[test]
    fn record_bytes_round_trip() {
        let r = record(ProbeId::IommuMap, &[(8, &[1, 2, 3])]);
        let back = parse_record(&encode_record(&r)).unwrap();
        assert_eq!(
            (back.probe, back.tgid, back.ts_ns, back.data),
            (r.probe, r.tgid, r.ts_ns, r.data)
        );
        assert!(parse_record(&[0; 10]).is_none());
    }

    #[test]
    fn a_created_root_page_is_a_root_alloc_of_that_vm() {
        let mut d = decoder();
        // role: level 4, direct, smm 1; created = true (offset 33)
        let role: u32 = 4 | (1 << 7) | (1 << 24);
        let r = record(
            ProbeId::KvmMmuGetPage,
            &[(24, &role.to_le_bytes()), (33, &[1])],
        );
        let ev = d.decode(&r);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].vm, 4242);
        assert_eq!(ev[0].ts_ns, 5_000);
        assert_eq!(ev[0].source, Source::Live);
        assert!(matches!(
            ev[0].kind,
            EventKind::RootAlloc(Root {
                level: 4,
                smm: true,
                root: 1,
                ..
            })
        ));
        // A level-1 page is no root.
        let leaf_role: u32 = 1 | (1 << 7);
        let r = record(
            ProbeId::KvmMmuGetPage,
            &[(24, &leaf_role.to_le_bytes()), (33, &[1])],
        );
        assert!(d.decode(&r).is_empty());
        assert_eq!(d.uneventful, 1);
    }

    /// A record of the CO-RE probe (probes/core/mmu_page.bpf.c's data layout).
    fn core_record(role: u32, tdp: bool, child: bool, gfn: u64, hpa: u64) -> Record {
        record(
            ProbeId::KvmMmuPageCore,
            &[
                (0, &role.to_le_bytes()),
                (4, &[1, u8::from(tdp), u8::from(child), 1]),
                (8, &gfn.to_le_bytes()),
                (16, &hpa.to_le_bytes()),
            ],
        )
    }

    #[test]
    fn the_core_probe_names_tdp_roots_by_their_table_address() {
        let mut d = decoder();
        d.core_roots = true;
        // A TDP MMU root (no parent entry), level 4, SMM address space.
        let role: u32 = 4 | (1 << 7) | (1 << 24);
        let ev = d.decode(&core_record(role, true, false, 0, 0x1_2345_6000));
        assert_eq!(ev.len(), 1);
        assert_eq!(
            ev[0].kind,
            EventKind::RootAlloc(Root {
                root: 0x1_2345_6000,
                level: 4,
                smm: true,
                cause: RootCause::Unknown,
            })
        );
        // A TDP MMU child is no root, whatever its level: under a 5-level root a level-4
        // table is a child (the level heuristic would call it a root).
        assert!(
            d.decode(&core_record(4 | (1 << 7), true, true, 0x8_0000, 0x9000))
                .is_empty()
        );
        // The tracepoint's record of the same allocation yields nothing: no root twice.
        let r = record(
            ProbeId::KvmMmuGetPage,
            &[(24, &role.to_le_bytes()), (33, &[1])],
        );
        assert!(d.decode(&r).is_empty());
        // Shadow-MMU pages are still told by level, but named by address too.
        let ev = d.decode(&core_record(4 | (1 << 7), false, false, 0, 0x7000));
        assert!(matches!(
            ev[0].kind,
            EventKind::RootAlloc(Root {
                root: 0x7000,
                level: 4,
                ..
            })
        ));
    }

    #[test]
    fn a_pae_root_set_is_one_root() {
        // What this machine's KVM does for SeaBIOS (non-paging guest): four direct level-2 pages
        // at gfn 0, 0x40000, 0x80000, 0xc0000 (role 0x1782), created together.
        let mut d = decoder();
        let role: u32 = 0x1782;
        let events: Vec<_> = [0u64, 0x40000, 0x80000, 0xc0000]
            .iter()
            .flat_map(|gfn| {
                let r = record(
                    ProbeId::KvmMmuGetPage,
                    &[
                        (16, &gfn.to_le_bytes()),
                        (24, &role.to_le_bytes()),
                        (33, &[1]),
                    ],
                );
                d.decode(&r)
            })
            .collect();
        assert_eq!(events.len(), 1);
        assert!(matches!(
            events[0].kind,
            EventKind::RootAlloc(Root { level: 3, .. })
        ));
    }

    #[test]
    fn tracepoints_decode_by_field_name() {
        let mut d = decoder();
        let r = record(
            ProbeId::KvmMmuZapAllFast,
            &[(8, &[7]), (12, &9u32.to_le_bytes())],
        );
        assert_eq!(
            d.decode(&r)[0].kind,
            EventKind::FastZap {
                generation: 7,
                pages: 9
            }
        );
        let leaf = PteFormat::EPT4.leaf(
            tdpshare::Hpa(0x1000),
            Level::L1,
            tdpshare::decision::format::Perms::RW,
            Default::default(),
        );
        let r = record(
            ProbeId::KvmTdpMmuSpteChanged,
            &[
                (8, &5u64.to_le_bytes()),
                (24, &leaf.to_le_bytes()),
                (32, &[1]),
            ],
        );
        let EventKind::SpteSet {
            gfn,
            level,
            old,
            new,
        } = d.decode(&r)[0].kind
        else {
            panic!()
        };
        assert_eq!(
            (gfn, level, old.to_string(), new.to_string()),
            (Gfn(5), 1, "---------".into(), "prw------".into())
        );
        let r = record(
            ProbeId::KvmPageFault,
            &[
                (8, &3u32.to_le_bytes()),
                (24, &0x1234_5678u64.to_le_bytes()),
                (32, &2u64.to_le_bytes()),
            ],
        );
        let e = &d.decode(&r)[0];
        assert_eq!(e.vcpu, Some(3));
        assert_eq!(
            e.kind,
            EventKind::PageFault {
                gfn: Gfn(0x12345),
                error_code: 2
            }
        );
        let r = record(
            ProbeId::IommuMap,
            &[
                (8, &0x1000u64.to_le_bytes()),
                (24, &0x2000u64.to_le_bytes()),
            ],
        );
        assert_eq!(
            d.decode(&r)[0].kind,
            EventKind::IommuMap {
                iova: Iova(0x1000),
                size: 0x2000,
                ns: 0
            }
        );
        // A probe whose format is unknown cannot be decoded: counted, not guessed.
        assert!(
            d.decode(&record(ProbeId::KvmMmuSplitHugePage, &[]))
                .is_empty()
        );
        assert_eq!(d.undecodable, 1);
    }

    #[test]
    fn a_stock_kernels_sptes_decode_with_its_own_layout() {
        // kvm_tdp_mmu_spte_changed as the lab recorded it in a 6.12 L1 on NPT: a 4 KiB leaf
        // with MMU-present in bit 11 (stock), writable, accessed and dirty.
        let stock = PteFormat::with_layout(Kind::Npt, 4, Layout::Stock).unwrap();
        let mut d = Decoder::new(decoder().formats, RoleLayout::LINUX_6, stock, 1_000);
        let r = record(
            ProbeId::KvmTdpMmuSpteChanged,
            &[
                (8, &5u64.to_le_bytes()),
                (16, &(1u64 << 63).to_le_bytes()),
                (24, &0x7fde_fe67u64.to_le_bytes()),
                (32, &[1]),
            ],
        );
        let EventKind::SpteSet { old, new, .. } = d.decode(&r)[0].kind else {
            panic!()
        };
        assert_eq!(
            (old.to_string(), new.to_string()),
            ("---------".into(), "prwx-ad--".into())
        );
    }

    #[test]
    fn memslot_ioctls_follow_kvm() {
        let mut d = decoder();
        let region = |slot: u32, gpa: u64, size: u64| {
            let mut r = record(ProbeId::IoctlSetUserMemoryRegion, &[]);
            r.data[0..4].copy_from_slice(&slot.to_le_bytes());
            r.data[8..16].copy_from_slice(&gpa.to_le_bytes());
            r.data[16..24].copy_from_slice(&size.to_le_bytes());
            r.data[24..32].copy_from_slice(&0x7f00_0000_0000u64.to_le_bytes());
            r.latency_ns = 900;
            r
        };
        let kinds: Vec<_> = [
            region(0, 0, 1 << 30),
            region(0, 0, 0),
            region(0x1_0002, 0, 0x1000),
        ]
        .iter()
        .flat_map(|r| d.decode(r))
        .map(|e| e.kind)
        .collect();
        assert!(matches!(
            kinds[0],
            EventKind::MemslotAdd(Memslot {
                size: 0x4000_0000,
                ..
            })
        ));
        assert!(matches!(
            kinds[1],
            EventKind::MemslotDelete(Memslot {
                size: 0x4000_0000,
                ..
            })
        ));
        assert!(matches!(
            kinds[2],
            EventKind::MemslotAdd(Memslot {
                as_id: 1,
                slot: 2,
                ..
            })
        ));
        let mut failed = region(3, 0, 0x1000);
        failed.ret = -17;
        assert!(d.decode(&failed).is_empty());
    }

    #[test]
    fn vfio_map_is_a_timed_map_and_a_pin() {
        let mut d = decoder();
        let mut r = record(ProbeId::IoctlVfioMapDma, &[]);
        r.data[16..24].copy_from_slice(&0x10_0000u64.to_le_bytes());
        r.data[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
        r.latency_ns = 12_345;
        let kinds: Vec<_> = d.decode(&r).into_iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec![
                EventKind::IommuMap {
                    iova: Iova(0x10_0000),
                    size: 0x20_0000,
                    ns: 12_345
                },
                EventKind::Pin {
                    range: GpaRange::new(Gpa(0x10_0000), 0x20_0000),
                    pages: 512
                },
            ]
        );
    }

    /// One record per probe with a format in the fixtures, its fields filled by name with
    /// values a kernel would write, then the memslot ioctls: the seeds of the `record_decoder`
    /// fuzz target (`fuzz/seeds/record_decoder.hex`, one input per line: the entry-format byte
    /// the target reads first, then records). Compared with the committed file, so a change to
    /// the record layout or the formats shows here; `TDPSHARE_BLESS=1` rewrites it.
    #[test]
    fn fuzz_seeds_are_current() {
        let mut formats: Vec<(ProbeId, Format)> = decoder()
            .formats
            .into_iter()
            .chain(series_decoder().formats)
            .collect();
        formats.sort_by_key(|(id, _)| *id);
        let value = |name: &str| -> u64 {
            match name {
                n if n.contains("level") => 4,
                n if n.contains("spte") => 0x0000_0001_2345_6907,
                n if n.contains("gfn") => 0x100,
                n if n.contains("gpa") || n.contains("addr") || n.contains("iova") => 0x10_0000,
                n if n.contains("size") || n.contains("pages") => 0x1000,
                n if n.contains("role") => 0x104,
                n if n.contains("new") || n.contains("old") => 1,
                _ => 2,
            }
        };
        let mut records = Vec::new();
        for (i, (id, format)) in formats.iter().enumerate() {
            let mut r = record(*id, &[]);
            r.ts_ns = 2_000 + i as u64 * 1_000;
            for f in format.fields.iter().filter(|f| !f.common && f.size <= 8) {
                let bytes = value(&f.name).to_le_bytes();
                if let Some(dst) = r.data.get_mut(f.offset..f.offset + f.size) {
                    dst.copy_from_slice(&bytes[..f.size]);
                }
            }
            records.push((id.name().to_owned(), r));
        }
        for (slot, size) in [(0u32, 1u64 << 30), (0, 0), (0x1_0002, 0x1000)] {
            let mut r = record(ProbeId::IoctlSetUserMemoryRegion, &[]);
            r.data[0..4].copy_from_slice(&slot.to_le_bytes());
            r.data[16..24].copy_from_slice(&size.to_le_bytes());
            r.data[24..32].copy_from_slice(&0x7f00_0000_0000u64.to_le_bytes());
            r.latency_ns = 900;
            records.push((format!("set_user_memory_region-{slot:x}-{size:x}"), r));
        }
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut text = String::from(
            "# Seeds of the record_decoder fuzz target: name, then the input in hex (first byte:\n\
             # the entry format; then records). Written by probes/src/decode.rs's\n\
             # fuzz_seeds_are_current test (TDPSHARE_BLESS=1).\n",
        );
        for (name, r) in &records {
            text += &format!("{name} 00{}\n", hex(&r.to_bytes()));
        }
        let all: Vec<u8> = records.iter().flat_map(|(_, r)| r.to_bytes()).collect();
        text += &format!("all-ept4 00{}\n", hex(&all));
        text += &format!("all-npt4-stock 05{}\n", hex(&all));
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/record_decoder.hex");
        if std::env::var("TDPSHARE_BLESS").is_ok_and(|v| v == "1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == text,
            "{} is not current; rerun with TDPSHARE_BLESS=1",
            path.display()
        );
        // Every seed decodes to something: the fuzzer starts from the decoder's paths.
        let mut d = decoder();
        let events: usize = records.iter().map(|(_, r)| d.decode(r).len()).sum();
        assert!(
            events >= records.len() / 2,
            "{events} events from {} seeds",
            records.len()
        );
    }
}
