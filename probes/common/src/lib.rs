//! What the eBPF programs and the userspace loader agree on: **the one list of probes**
//! ([`with_probes!`]), the ring-buffer record, the map keys, the ioctl commands watched.
//! `no_std`, no dependency: it builds for the BPF target and the host alike.
//!
//! Adding a probe is one line in [`with_probes!`] plus its arm in the userspace decoder (which
//! matches [`ProbeId`] exhaustively, so the compiler asks for it): the id, the eBPF program,
//! the catalog entry and, for an ioctl, the command dispatch all come from that line.
#![no_std]

use core::mem::{offset_of, size_of};

/// The probes, one line each. Invoke with the name of a macro that takes this shape:
///
/// ```text
/// tracepoints { Variant = id, program_fn, "system", "event", Path, Kernel, "yields"; … }
/// ioctls { Variant = id, COMMAND_NUMBER, "NAME", "yields"; … }
/// own_programs { program_fn, "system", "event", Path, Kernel, "yields"; … }
/// core_programs { Variant = id, program_fn, "system", "event", Path, Kernel, "yields"; … }
/// ```
///
/// `tracepoints` get a generated eBPF program that ships the raw record; `ioctls` are watched by
/// the ioctl pair, which `own_programs` lists with the other hand-written programs;
/// `core_programs` are C programs (`probes/core/`, CO-RE, loaded with libbpf) that read kernel
/// structures a tracepoint record leaves out, shipping [`Record`]s of their own id. `Path` is
/// a [`Watches`] variant, `Kernel` a [`Kernel`] variant.
#[macro_export]
macro_rules! with_probes {
    ($m:ident) => {
        $m! {
            tracepoints {
                KvmMmuGetPage = 0, kvm_mmu_get_page, "kvmmmu", "kvm_mmu_get_page",
                    RootUpdate, Stock, "root_alloc (new page with root level)";
                KvmMmuPrepareZapPage = 1, kvm_mmu_prepare_zap_page, "kvmmmu",
                    "kvm_mmu_prepare_zap_page", RootUpdate, Stock,
                    "root_free (roots), zap (other pages)";
                KvmMmuZapAllFast = 2, kvm_mmu_zap_all_fast, "kvmmmu", "kvm_mmu_zap_all_fast",
                    RootUpdate, Stock, "fast_zap";
                KvmMmuSplitHugePage = 3, kvm_mmu_split_huge_page, "kvmmmu",
                    "kvm_mmu_split_huge_page", Prepopulation, Stock, "huge_page_split";
                KvmMmuSetSpte = 4, kvm_mmu_set_spte, "kvmmmu", "kvm_mmu_set_spte",
                    Prepopulation, Stock, "spte_set";
                KvmTdpMmuSpteChanged = 5, kvm_tdp_mmu_spte_changed, "kvmmmu",
                    "kvm_tdp_mmu_spte_changed", Prepopulation, Stock, "spte_set (old and new)";
                KvmPageFault = 6, kvm_page_fault, "kvm", "kvm_page_fault",
                    Prepopulation, Stock, "page_fault";
                IommuMap = 7, iommu_map, "iommu", "map", Iommu, Stock, "iommu_map";
                IommuUnmap = 8, iommu_unmap, "iommu", "unmap", Iommu, Stock, "iommu_unmap";
                IommuIoPageFault = 9, iommu_io_page_fault, "iommu", "io_page_fault",
                    Iommu, Stock, "io_page_fault";
                IntelQiSubmit = 10, intel_qi_submit, "intel_iommu", "qi_submit",
                    Iommu, Stock, "iotlb_flush (IOTLB invalidation descriptors)";
                IntelCacheTagFlushRange = 11, intel_cache_tag_flush_range, "intel_iommu",
                    "cache_tag_flush_range", Iommu, Stock, "iotlb_flush (range)";
                IntelCacheTagFlushRangeNp = 12, intel_cache_tag_flush_range_np, "intel_iommu",
                    "cache_tag_flush_range_np", Iommu, Stock, "iotlb_flush (range, non-present)";
                KvmSmmTransition = 13, kvm_smm_transition, "kvm", "kvm_smm_transition",
                    RootUpdate, Stock, "smm_transition";
                KvmCr = 14, kvm_cr, "kvm", "kvm_cr", RootUpdate, Stock,
                    "cr_write (CR0/CR4, with the value)";
                // Filtered in the kernel to CR0/CR4 write exits ([`is_cr_write_exit`]); where
                // kvm_cr does not fire (emulated CR writes, e.g. SVM without decode assists)
                // these are the only record of the write.
                KvmExit = 15, kvm_exit, "kvm", "kvm_exit", RootUpdate, Stock,
                    "cr_write (CR0/CR4 write exits, without the value)";
                TdpsharePrepopulate = 24, tdpshare_prepopulate, "tdpshare", "prepopulate",
                    Prepopulation, Series, "prepopulate_end";
                TdpshareRootUpdate = 25, tdpshare_root_update, "tdpshare", "root_update",
                    RootUpdate, Series, "root_switch";
                TdpshareIotlbFlush = 26, tdpshare_iotlb_flush, "tdpshare", "iotlb_flush",
                    Iommu, Series, "iotlb_flush (with its cost)";
            }
            ioctls {
                // _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)
                IoctlSetUserMemoryRegion = 16, 0x4020_ae46, "KVM_SET_USER_MEMORY_REGION",
                    "memslot_*";
                // _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
                IoctlSetUserMemoryRegion2 = 17, 0x40a0_ae49, "KVM_SET_USER_MEMORY_REGION2",
                    "memslot_*";
                // _IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)
                IoctlPreFaultMemory = 18, 0xc040_aed5, "KVM_PRE_FAULT_MEMORY",
                    "prepopulate_end";
                // _IO(VFIO_TYPE, VFIO_BASE + 13)
                IoctlVfioMapDma = 19, 0x3b71, "VFIO_IOMMU_MAP_DMA", "iommu_map + pin";
                // _IO(VFIO_TYPE, VFIO_BASE + 14)
                IoctlVfioUnmapDma = 20, 0x3b72, "VFIO_IOMMU_UNMAP_DMA", "iommu_unmap + unpin";
                // _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP)
                IoctlIoasMap = 21, 0x3b85, "IOMMU_IOAS_MAP", "iommu_map + pin";
                // _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)
                IoctlIoasUnmap = 22, 0x3b86, "IOMMU_IOAS_UNMAP", "iommu_unmap + unpin";
            }
            own_programs {
                sys_enter_ioctl, "syscalls", "sys_enter_ioctl", Memslot, Stock,
                    "(start of the watched ioctls)";
                sys_exit_ioctl, "syscalls", "sys_exit_ioctl", Memslot, Stock,
                    "the watched ioctls with latency: memslot_* (KVM_SET_USER_MEMORY_REGION[2]), prepopulate_end (KVM_PRE_FAULT_MEMORY), iommu_map/unmap + pin/unpin (VFIO_IOMMU_MAP/UNMAP_DMA, IOMMU_IOAS_MAP/UNMAP)";
            }
            core_programs {
                // tp_btf on the same tracepoint: struct kvm_mmu_page itself, so a TDP root is
                // known by having no parent entry and carries its table's physical address.
                KvmMmuPageCore = 27, mmu_get_page, "kvmmmu", "kvm_mmu_get_page", RootUpdate,
                    Stock, "root_alloc with the root table's host-physical address (CO-RE)";
                // tp_btf on kvm_entry: the CR0/CR4 a vCPU runs with, read from struct kvm_vcpu
                // when they changed — the values kvm_exit cannot give where kvm_cr is silent.
                KvmEntryCore = 28, kvm_entry_cr, "kvm", "kvm_entry", RootUpdate, Stock,
                    "cr_write with the value (CR0/CR4 a vCPU enters with, when changed; CO-RE)";
            }
        }
    };
}

/// Which of the seed design's paths a probe watches (the event model's paths, restated here
/// because this crate has no dependency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Watches {
    /// TDP pre-population (and page faults, SPTE writes, splits).
    Prepopulation,
    /// Root updates (roots allocated and freed, fast zaps).
    RootUpdate,
    /// The IOMMU: maps, IO page faults, IOTLB flushes.
    Iommu,
    /// Memslot changes (and the other watched ioctls).
    Memslot,
}

/// Which kernels have a probe's tracepoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Every kernel with the subsystem.
    Stock,
    /// Only a kernel carrying the tdpshare patch series.
    Series,
}

/// One eBPF program and its tracepoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Program {
    /// The program's name in the eBPF object.
    pub program: &'static str,
    pub system: &'static str,
    pub event: &'static str,
    /// The probe its records carry (`None` for the ioctl pair, whose records carry the
    /// command's).
    pub id: Option<ProbeId>,
    pub watches: Watches,
    pub kernel: Kernel,
    /// The events it yields.
    pub yields: &'static str,
    /// A CO-RE C program (`probes/core/`), not one of the Rust eBPF object's.
    pub core: bool,
}

/// One ioctl command the ioctl pair watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ioctl {
    pub id: ProbeId,
    /// The command number.
    pub cmd: u32,
    /// The command's name.
    pub name: &'static str,
    /// The events it yields.
    pub yields: &'static str,
}

macro_rules! declare {
    (
        tracepoints {
            $($tv:ident = $tid:literal, $prog:ident, $sys:literal, $ev:literal,
                $path:ident, $kernel:ident, $yields:literal;)*
        }
        ioctls {
            $($iv:ident = $iid:literal, $cmd:literal, $iname:literal, $iyields:literal;)*
        }
        own_programs {
            $($oprog:ident, $osys:literal, $oev:literal, $opath:ident, $okernel:ident,
                $oyields:literal;)*
        }
        core_programs {
            $($cv:ident = $cid:literal, $cprog:ident, $csys:literal, $cev:literal,
                $cpath:ident, $ckernel:ident, $cyields:literal;)*
        }
    ) => {
        /// A probe: the id its records, counters and histograms carry.
        #[repr(u32)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ProbeId {
            $($tv = $tid,)*
            $($iv = $iid,)*
            $($cv = $cid,)*
        }

        impl ProbeId {
            /// Every probe.
            pub const ALL: &'static [ProbeId] =
                &[$(ProbeId::$tv,)* $(ProbeId::$iv,)* $(ProbeId::$cv,)*];

            /// The probe with id `id`.
            pub const fn from_u32(id: u32) -> Option<ProbeId> {
                match id {
                    $($tid => Some(ProbeId::$tv),)*
                    $($iid => Some(ProbeId::$iv),)*
                    $($cid => Some(ProbeId::$cv),)*
                    _ => None,
                }
            }

            /// The short name tables show: the tracepoint's event, or the ioctl's name.
            pub const fn name(self) -> &'static str {
                match self {
                    $(ProbeId::$tv => $ev,)*
                    $(ProbeId::$iv => $iname,)*
                    $(ProbeId::$cv => concat!($cev, " (CO-RE)"),)*
                }
            }

            /// Its records come from the ioctl pair.
            pub const fn is_ioctl(self) -> bool {
                match self {
                    $(ProbeId::$iv => true,)*
                    _ => false,
                }
            }
        }

        /// Every eBPF program, in the order status tables show them.
        pub const PROGRAMS: &[Program] = &[
            $(Program {
                program: stringify!($prog),
                system: $sys,
                event: $ev,
                id: Some(ProbeId::$tv),
                watches: Watches::$path,
                kernel: Kernel::$kernel,
                yields: $yields,
                core: false,
            },)*
            $(Program {
                program: stringify!($oprog),
                system: $osys,
                event: $oev,
                id: None,
                watches: Watches::$opath,
                kernel: Kernel::$okernel,
                yields: $oyields,
                core: false,
            },)*
            $(Program {
                program: stringify!($cprog),
                system: $csys,
                event: $cev,
                id: Some(ProbeId::$cv),
                watches: Watches::$cpath,
                kernel: Kernel::$ckernel,
                yields: $cyields,
                core: true,
            },)*
        ];

        /// Every ioctl command watched.
        pub const IOCTLS: &[Ioctl] = &[
            $(Ioctl { id: ProbeId::$iv, cmd: $cmd, name: $iname, yields: $iyields },)*
        ];

        /// The probe of a watched ioctl command, `None` for any other ioctl.
        pub const fn ioctl_probe(cmd: u32) -> Option<ProbeId> {
            match cmd {
                $($cmd => Some(ProbeId::$iv),)*
                _ => None,
            }
        }
    };
}

with_probes!(declare);

/// `kvm:kvm_exit`'s `isa` of a VMX exit (`KVM_ISA_VMX`); SVM's is 2.
pub const KVM_ISA_VMX: u64 = 1;
/// `kvm:kvm_exit`'s `isa` of an SVM exit (`KVM_ISA_SVM`).
pub const KVM_ISA_SVM: u64 = 2;

/// The control register a VM exit wrote, when it is a write of CR0 or CR4 — the MMU-role
/// registers. `isa`, `reason` and `info1` are `kvm:kvm_exit`'s fields: on VMX a CR access
/// (reason 28) whose exit qualification (`info1`) names the register in bits 3:0 and the access
/// in bits 5:4 (0 MOV to CR, 2 CLTS, 3 LMSW — CLTS and LMSW write CR0); on SVM the exit codes
/// `write_cr0` 0x10, `write_cr4` 0x14, `cr0_sel_write` 0x65 and their SEV-ES trap forms 0x90,
/// 0x94.
pub const fn is_cr_write_exit(isa: u64, reason: u64, info1: u64) -> Option<u8> {
    if isa == KVM_ISA_VMX {
        if reason & 0xffff != 28 {
            return None;
        }
        let cr = (info1 & 0xf) as u8;
        match ((info1 >> 4) & 3, cr) {
            (0, 0 | 4) => Some(cr),
            (2 | 3, _) => Some(0),
            _ => None,
        }
    } else if isa == KVM_ISA_SVM {
        match reason {
            0x10 | 0x65 | 0x90 => Some(0),
            0x14 | 0x94 => Some(4),
            _ => None,
        }
    } else {
        None
    }
}

/// Ids are below this (the per-VM counters are indexed by it).
pub const PROBE_ID_LIMIT: u32 = 32;

/// Bytes of the raw tracepoint record (or ioctl argument) copied into a [`Record`]. The
/// largest record decoded here is 40 bytes; the rest is padding read from the trace buffer.
pub const RECORD_DATA: usize = 64;

/// One ring-buffer entry: a tracepoint hit (or a finished ioctl) of one task.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// A [`ProbeId`].
    pub probe: u32,
    /// Thread group (the VMM's pid) and thread (the vCPU or I/O thread).
    pub tgid: u32,
    pub tid: u32,
    pub cpu: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// ioctl probes: latency in ns; tracepoints: 0.
    pub latency_ns: u64,
    /// ioctl probes: the return value; tracepoints: 0.
    pub ret: i64,
    /// Tracepoints: the raw record (decode with the tracefs format); ioctls: the argument struct.
    pub data: [u8; RECORD_DATA],
}

/// Size of [`Record`] in bytes.
pub const RECORD_SIZE: usize = size_of::<Record>();

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(offset..offset + 8)?.try_into().ok()?,
    ))
}

impl Record {
    /// The record a ring-buffer entry holds (the eBPF side writes it little-endian, as laid out
    /// here); `None` if it is not a whole record.
    pub fn from_bytes(bytes: &[u8]) -> Option<Record> {
        if bytes.len() < RECORD_SIZE {
            return None;
        }
        let d = offset_of!(Record, data);
        Some(Record {
            probe: u32_at(bytes, offset_of!(Record, probe))?,
            tgid: u32_at(bytes, offset_of!(Record, tgid))?,
            tid: u32_at(bytes, offset_of!(Record, tid))?,
            cpu: u32_at(bytes, offset_of!(Record, cpu))?,
            ts_ns: u64_at(bytes, offset_of!(Record, ts_ns))?,
            latency_ns: u64_at(bytes, offset_of!(Record, latency_ns))?,
            ret: u64_at(bytes, offset_of!(Record, ret))? as i64,
            data: bytes.get(d..d + RECORD_DATA)?.try_into().ok()?,
        })
    }

    /// The record as the eBPF side lays it out (for tests and replays of raw captures).
    pub fn to_bytes(&self) -> [u8; RECORD_SIZE] {
        let mut out = [0; RECORD_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            out[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(offset_of!(Record, probe), &self.probe.to_le_bytes());
        put(offset_of!(Record, tgid), &self.tgid.to_le_bytes());
        put(offset_of!(Record, tid), &self.tid.to_le_bytes());
        put(offset_of!(Record, cpu), &self.cpu.to_le_bytes());
        put(offset_of!(Record, ts_ns), &self.ts_ns.to_le_bytes());
        put(
            offset_of!(Record, latency_ns),
            &self.latency_ns.to_le_bytes(),
        );
        put(offset_of!(Record, ret), &self.ret.to_le_bytes());
        put(offset_of!(Record, data), &self.data);
        out
    }
}

/// Key of the per-VM counters: `tgid << 32 | probe`.
pub const fn count_key(tgid: u32, probe: u32) -> u64 {
    ((tgid as u64) << 32) | probe as u64
}

/// Key of the per-VM log2 latency histograms: `tgid << 32 | probe << 8 | bucket`.
pub const fn hist_key(tgid: u32, probe: u32, bucket: u32) -> u64 {
    ((tgid as u64) << 32) | ((probe as u64) << 8) | (bucket as u64 & 0xff)
}

/// Splits a [`hist_key`] into (tgid, probe, bucket).
pub const fn split_hist_key(key: u64) -> (u32, u32, u32) {
    (
        (key >> 32) as u32,
        ((key >> 8) & 0xff_ffff) as u32,
        (key & 0xff) as u32,
    )
}

/// The log2 bucket of `ns`: bucket `b` holds `[2^b, 2^(b+1))`, bucket 0 also 0.
pub const fn log2_bucket(ns: u64) -> u32 {
    63 - (ns | 1).leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cr_write_exits_of_both_isas() {
        // VMX: MOV to CR0, MOV to CR4, MOV to CR3 (no), MOV from CR0 (no), LMSW, CLTS.
        assert_eq!(is_cr_write_exit(KVM_ISA_VMX, 28, 0x00), Some(0));
        assert_eq!(is_cr_write_exit(KVM_ISA_VMX, 28, 0x04), Some(4));
        assert_eq!(is_cr_write_exit(KVM_ISA_VMX, 28, 0x03), None);
        assert_eq!(is_cr_write_exit(KVM_ISA_VMX, 28, 0x10), None);
        assert_eq!(is_cr_write_exit(KVM_ISA_VMX, 28, 0x30), Some(0));
        assert_eq!(is_cr_write_exit(KVM_ISA_VMX, 28, 0x20), Some(0));
        assert_eq!(is_cr_write_exit(KVM_ISA_VMX, 12, 0x00), None, "HLT");
        // SVM.
        assert_eq!(is_cr_write_exit(KVM_ISA_SVM, 0x65, 0), Some(0));
        assert_eq!(is_cr_write_exit(KVM_ISA_SVM, 0x14, 0), Some(4));
        assert_eq!(is_cr_write_exit(KVM_ISA_SVM, 0x13, 0), None, "CR3");
        assert_eq!(is_cr_write_exit(KVM_ISA_SVM, 0x400, 0), None, "npf");
        assert_eq!(is_cr_write_exit(3, 0x10, 0), None);
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(split_hist_key(hist_key(4242, 19, 17)), (4242, 19, 17));
        assert_eq!(count_key(7, 3), (7 << 32) | 3);
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1023), 9);
        assert_eq!(log2_bucket(1024), 10);
    }

    #[test]
    fn record_layout_is_fixed_and_round_trips() {
        assert_eq!(RECORD_SIZE, 4 * 4 + 8 * 3 + RECORD_DATA);
        let r = Record {
            probe: ProbeId::IommuMap as u32,
            tgid: 4242,
            tid: 4243,
            cpu: 1,
            ts_ns: 6_000,
            latency_ns: 7,
            ret: -17,
            data: [9; RECORD_DATA],
        };
        let back = Record::from_bytes(&r.to_bytes()).unwrap();
        assert_eq!(
            (
                back.probe,
                back.tgid,
                back.tid,
                back.cpu,
                back.ts_ns,
                back.latency_ns,
                back.ret
            ),
            (r.probe, r.tgid, r.tid, r.cpu, r.ts_ns, r.latency_ns, r.ret)
        );
        assert_eq!(back.data, r.data);
        assert!(Record::from_bytes(&[0; 10]).is_none());
    }

    #[test]
    fn the_list_is_consistent() {
        for (i, a) in ProbeId::ALL.iter().enumerate() {
            assert!((*a as u32) < PROBE_ID_LIMIT);
            assert_eq!(ProbeId::from_u32(*a as u32), Some(*a));
            assert!(ProbeId::ALL[i + 1..].iter().all(|b| b != a));
        }
        for (i, p) in PROGRAMS.iter().enumerate() {
            assert!(PROGRAMS[i + 1..].iter().all(|q| q.program != p.program));
        }
        assert_eq!(
            ioctl_probe(0x4020_ae46),
            Some(ProbeId::IoctlSetUserMemoryRegion)
        );
        assert_eq!(ioctl_probe(0x5401), None);
        assert!(ProbeId::IoctlPreFaultMemory.is_ioctl());
        assert!(!ProbeId::KvmPageFault.is_ioctl());
        assert_eq!(ProbeId::IoctlPreFaultMemory.name(), "KVM_PRE_FAULT_MEMORY");
        assert_eq!(IOCTLS.len() + PROGRAMS.len() - 2, ProbeId::ALL.len());
    }
}
