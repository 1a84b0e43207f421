//! The probe catalog: every program, where it attaches, what it yields, and which of the seed
//! design's three paths it watches.

use tdpshare::event::Path as SeedPath;
use tdpshare_probes_common::probe;

/// One eBPF program and its tracepoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The program's name in the eBPF object.
    pub program: &'static str,
    pub system: &'static str,
    pub event: &'static str,
    /// The probe id its records carry (`None` for the ioctl pair, which carries the command's).
    pub id: Option<u32>,
    pub path: SeedPath,
    /// The events it yields.
    pub yields: &'static str,
    /// Only on a kernel carrying the tdpshare patch series.
    pub patched_kernel_only: bool,
}

const fn tp(
    program: &'static str,
    system: &'static str,
    event: &'static str,
    id: u32,
    path: SeedPath,
    yields: &'static str,
) -> Probe {
    Probe {
        program,
        system,
        event,
        id: Some(id),
        path,
        yields,
        patched_kernel_only: false,
    }
}

/// Every probe, in the order the status table shows them.
pub const CATALOG: &[Probe] = &[
    tp(
        "kvm_mmu_get_page",
        "kvmmmu",
        "kvm_mmu_get_page",
        probe::KVM_MMU_GET_PAGE,
        SeedPath::RootUpdate,
        "root_alloc (new page with root level)",
    ),
    tp(
        "kvm_mmu_prepare_zap_page",
        "kvmmmu",
        "kvm_mmu_prepare_zap_page",
        probe::KVM_MMU_PREPARE_ZAP_PAGE,
        SeedPath::RootUpdate,
        "root_free (roots), zap (other pages)",
    ),
    tp(
        "kvm_mmu_zap_all_fast",
        "kvmmmu",
        "kvm_mmu_zap_all_fast",
        probe::KVM_MMU_ZAP_ALL_FAST,
        SeedPath::RootUpdate,
        "fast_zap",
    ),
    tp(
        "kvm_mmu_split_huge_page",
        "kvmmmu",
        "kvm_mmu_split_huge_page",
        probe::KVM_MMU_SPLIT_HUGE_PAGE,
        SeedPath::Prepopulation,
        "huge_page_split",
    ),
    tp(
        "kvm_mmu_set_spte",
        "kvmmmu",
        "kvm_mmu_set_spte",
        probe::KVM_MMU_SET_SPTE,
        SeedPath::Prepopulation,
        "spte_set",
    ),
    tp(
        "kvm_tdp_mmu_spte_changed",
        "kvmmmu",
        "kvm_tdp_mmu_spte_changed",
        probe::KVM_TDP_MMU_SPTE_CHANGED,
        SeedPath::Prepopulation,
        "spte_set (old and new)",
    ),
    tp(
        "kvm_page_fault",
        "kvm",
        "kvm_page_fault",
        probe::KVM_PAGE_FAULT,
        SeedPath::Prepopulation,
        "page_fault",
    ),
    tp(
        "iommu_map",
        "iommu",
        "map",
        probe::IOMMU_MAP,
        SeedPath::Iommu,
        "iommu_map",
    ),
    tp(
        "iommu_unmap",
        "iommu",
        "unmap",
        probe::IOMMU_UNMAP,
        SeedPath::Iommu,
        "iommu_unmap",
    ),
    tp(
        "iommu_io_page_fault",
        "iommu",
        "io_page_fault",
        probe::IOMMU_IO_PAGE_FAULT,
        SeedPath::Iommu,
        "io_page_fault",
    ),
    tp(
        "intel_qi_submit",
        "intel_iommu",
        "qi_submit",
        probe::INTEL_QI_SUBMIT,
        SeedPath::Iommu,
        "iotlb_flush (IOTLB invalidation descriptors)",
    ),
    tp(
        "intel_cache_tag_flush_range",
        "intel_iommu",
        "cache_tag_flush_range",
        probe::INTEL_CACHE_TAG_FLUSH_RANGE,
        SeedPath::Iommu,
        "iotlb_flush (range)",
    ),
    tp(
        "intel_cache_tag_flush_range_np",
        "intel_iommu",
        "cache_tag_flush_range_np",
        probe::INTEL_CACHE_TAG_FLUSH_RANGE_NP,
        SeedPath::Iommu,
        "iotlb_flush (range, non-present)",
    ),
    Probe {
        program: "sys_enter_ioctl",
        system: "syscalls",
        event: "sys_enter_ioctl",
        id: None,
        path: SeedPath::Memslot,
        yields: "(start of the watched ioctls)",
        patched_kernel_only: false,
    },
    Probe {
        program: "sys_exit_ioctl",
        system: "syscalls",
        event: "sys_exit_ioctl",
        id: None,
        path: SeedPath::Memslot,
        yields: "memslot_* (KVM_SET_USER_MEMORY_REGION[2]), prepopulate_end (KVM_PRE_FAULT_MEMORY), iommu_map/unmap + pin/unpin with latency (VFIO_IOMMU_MAP/UNMAP_DMA, IOMMU_IOAS_MAP/UNMAP)",
        patched_kernel_only: false,
    },
    Probe {
        patched_kernel_only: true,
        ..tp(
            "tdpshare_prepopulate",
            "tdpshare",
            "prepopulate",
            probe::TDPSHARE_PREPOPULATE,
            SeedPath::Prepopulation,
            "prepopulate_end",
        )
    },
    Probe {
        patched_kernel_only: true,
        ..tp(
            "tdpshare_root_update",
            "tdpshare",
            "root_update",
            probe::TDPSHARE_ROOT_UPDATE,
            SeedPath::RootUpdate,
            "root_switch",
        )
    },
    Probe {
        patched_kernel_only: true,
        ..tp(
            "tdpshare_iotlb_flush",
            "tdpshare",
            "iotlb_flush",
            probe::TDPSHARE_IOTLB_FLUSH,
            SeedPath::Iommu,
            "iotlb_flush (with its cost)",
        )
    },
];

/// The catalog entry whose records carry `id` (ioctl ids map to `sys_exit_ioctl`).
pub fn by_id(id: u32) -> Option<&'static Probe> {
    CATALOG
        .iter()
        .find(|p| p.id == Some(id))
        .or_else(|| (16..24).contains(&id).then(|| &CATALOG[14]))
}

/// A short name for a probe id, for tables.
pub fn id_name(id: u32) -> &'static str {
    match id {
        probe::IOCTL_SET_USER_MEMORY_REGION => "KVM_SET_USER_MEMORY_REGION",
        probe::IOCTL_SET_USER_MEMORY_REGION2 => "KVM_SET_USER_MEMORY_REGION2",
        probe::IOCTL_PRE_FAULT_MEMORY => "KVM_PRE_FAULT_MEMORY",
        probe::IOCTL_VFIO_MAP_DMA => "VFIO_IOMMU_MAP_DMA",
        probe::IOCTL_VFIO_UNMAP_DMA => "VFIO_IOMMU_UNMAP_DMA",
        probe::IOCTL_IOAS_MAP => "IOMMU_IOAS_MAP",
        probe::IOCTL_IOAS_UNMAP => "IOMMU_IOAS_UNMAP",
        _ => by_id(id).map_or("?", |p| p.event),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn programs_and_ids_are_unique() {
        let programs: HashSet<_> = CATALOG.iter().map(|p| p.program).collect();
        assert_eq!(programs.len(), CATALOG.len());
        let ids: Vec<_> = CATALOG.iter().filter_map(|p| p.id).collect();
        let unique: HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        assert!(ids.iter().all(|&i| i < probe::COUNT));
        assert_eq!(
            by_id(probe::IOCTL_VFIO_MAP_DMA).unwrap().program,
            "sys_exit_ioctl"
        );
        assert_eq!(
            id_name(probe::IOCTL_PRE_FAULT_MEMORY),
            "KVM_PRE_FAULT_MEMORY"
        );
    }

    #[test]
    fn every_three_seed_paths_are_covered() {
        for path in [
            SeedPath::Prepopulation,
            SeedPath::RootUpdate,
            SeedPath::Iommu,
        ] {
            assert!(
                CATALOG
                    .iter()
                    .any(|p| p.path == path && !p.patched_kernel_only)
            );
        }
    }
}
