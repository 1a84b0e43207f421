//! What the eBPF programs and the userspace loader agree on: probe ids, the ring-buffer record,
//! the map keys, the ioctl commands watched. `no_std`, no dependency: it builds for the BPF
//! target and the host alike.
#![no_std]

/// Bytes of the raw tracepoint record (or ioctl argument) copied into a [`Record`]. The
/// largest record decoded here is 40 bytes; the rest is padding read from the trace buffer.
pub const RECORD_DATA: usize = 64;

/// One ring-buffer entry: a tracepoint hit (or a finished ioctl) of one task.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// A `probe::*` id.
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
pub const RECORD_SIZE: usize = core::mem::size_of::<Record>();

/// Probe ids: the index of the probe's counters and histograms.
pub mod probe {
    pub const KVM_MMU_GET_PAGE: u32 = 0;
    pub const KVM_MMU_PREPARE_ZAP_PAGE: u32 = 1;
    pub const KVM_MMU_ZAP_ALL_FAST: u32 = 2;
    pub const KVM_MMU_SPLIT_HUGE_PAGE: u32 = 3;
    pub const KVM_MMU_SET_SPTE: u32 = 4;
    pub const KVM_TDP_MMU_SPTE_CHANGED: u32 = 5;
    pub const KVM_PAGE_FAULT: u32 = 6;
    pub const IOMMU_MAP: u32 = 7;
    pub const IOMMU_UNMAP: u32 = 8;
    pub const IOMMU_IO_PAGE_FAULT: u32 = 9;
    pub const INTEL_QI_SUBMIT: u32 = 10;
    pub const INTEL_CACHE_TAG_FLUSH_RANGE: u32 = 11;
    pub const INTEL_CACHE_TAG_FLUSH_RANGE_NP: u32 = 12;
    /// ioctls, one id per command watched (the ioctl tracepoints themselves have no id).
    pub const IOCTL_SET_USER_MEMORY_REGION: u32 = 16;
    pub const IOCTL_SET_USER_MEMORY_REGION2: u32 = 17;
    pub const IOCTL_PRE_FAULT_MEMORY: u32 = 18;
    pub const IOCTL_VFIO_MAP_DMA: u32 = 19;
    pub const IOCTL_VFIO_UNMAP_DMA: u32 = 20;
    pub const IOCTL_IOAS_MAP: u32 = 21;
    pub const IOCTL_IOAS_UNMAP: u32 = 22;
    /// The patch series' own tracepoints.
    pub const TDPSHARE_PREPOPULATE: u32 = 24;
    pub const TDPSHARE_ROOT_UPDATE: u32 = 25;
    pub const TDPSHARE_IOTLB_FLUSH: u32 = 26;
    /// Ids are below this.
    pub const COUNT: u32 = 32;
}

/// ioctl commands watched, with the probe id each is counted under.
pub mod ioctl {
    /// `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`
    pub const KVM_SET_USER_MEMORY_REGION: u32 = 0x4020_ae46;
    /// `_IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)`
    pub const KVM_SET_USER_MEMORY_REGION2: u32 = 0x40a0_ae49;
    /// `_IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)`
    pub const KVM_PRE_FAULT_MEMORY: u32 = 0xc040_aed5;
    /// `_IO(VFIO_TYPE, VFIO_BASE + 13)`
    pub const VFIO_IOMMU_MAP_DMA: u32 = 0x3b71;
    /// `_IO(VFIO_TYPE, VFIO_BASE + 14)`
    pub const VFIO_IOMMU_UNMAP_DMA: u32 = 0x3b72;
    /// `_IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP)`
    pub const IOMMU_IOAS_MAP: u32 = 0x3b85;
    /// `_IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)`
    pub const IOMMU_IOAS_UNMAP: u32 = 0x3b86;

    /// The probe id of a watched command, `None` for any other ioctl.
    pub const fn probe_of(cmd: u32) -> Option<u32> {
        use super::probe::*;
        match cmd {
            KVM_SET_USER_MEMORY_REGION => Some(IOCTL_SET_USER_MEMORY_REGION),
            KVM_SET_USER_MEMORY_REGION2 => Some(IOCTL_SET_USER_MEMORY_REGION2),
            KVM_PRE_FAULT_MEMORY => Some(IOCTL_PRE_FAULT_MEMORY),
            VFIO_IOMMU_MAP_DMA => Some(IOCTL_VFIO_MAP_DMA),
            VFIO_IOMMU_UNMAP_DMA => Some(IOCTL_VFIO_UNMAP_DMA),
            IOMMU_IOAS_MAP => Some(IOCTL_IOAS_MAP),
            IOMMU_IOAS_UNMAP => Some(IOCTL_IOAS_UNMAP),
            _ => None,
        }
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
    fn keys_round_trip() {
        assert_eq!(split_hist_key(hist_key(4242, 19, 17)), (4242, 19, 17));
        assert_eq!(count_key(7, 3), (7 << 32) | 3);
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1023), 9);
        assert_eq!(log2_bucket(1024), 10);
    }

    #[test]
    fn record_layout_is_fixed() {
        assert_eq!(RECORD_SIZE, 4 * 4 + 8 * 3 + RECORD_DATA);
        assert_eq!(
            ioctl::probe_of(0x4020_ae46),
            Some(probe::IOCTL_SET_USER_MEMORY_REGION)
        );
        assert_eq!(ioctl::probe_of(0x5401), None);
    }
}
