//! The probe catalog: every program, where it attaches, what it yields, and which of the seed
//! design's three paths it watches. The list itself is `tdpshare_probes_common::with_probes!`,
//! shared with the eBPF programs; this module adds the event model's view of it.

use tdpshare::event::Path as SeedPath;
pub use tdpshare_probes_common::{Kernel, PROGRAMS as CATALOG, ProbeId, Program as Probe, Watches};

/// The event model's path of what a probe watches.
pub fn seed_path(watches: Watches) -> SeedPath {
    match watches {
        Watches::Prepopulation => SeedPath::Prepopulation,
        Watches::RootUpdate => SeedPath::RootUpdate,
        Watches::Iommu => SeedPath::Iommu,
        Watches::Memslot => SeedPath::Memslot,
    }
}

/// The catalog entry whose records carry `id` (the ioctl ids: `sys_exit_ioctl`).
pub fn by_id(id: ProbeId) -> Option<&'static Probe> {
    let program = if id.is_ioctl() {
        Some("sys_exit_ioctl")
    } else {
        None
    };
    CATALOG
        .iter()
        .find(|p| p.id == Some(id) || Some(p.program) == program)
}

/// A short name for a probe id, for tables.
pub fn id_name(id: u32) -> &'static str {
    ProbeId::from_u32(id).map_or("?", ProbeId::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_probe_has_its_program() {
        for &id in ProbeId::ALL {
            assert!(by_id(id).is_some(), "{id:?}");
        }
        assert_eq!(
            by_id(ProbeId::IoctlVfioMapDma).unwrap().program,
            "sys_exit_ioctl"
        );
        assert_eq!(
            id_name(ProbeId::IoctlPreFaultMemory as u32),
            "KVM_PRE_FAULT_MEMORY"
        );
        assert_eq!(id_name(31), "?");
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
                    .any(|p| seed_path(p.watches) == path && p.kernel == Kernel::Stock)
            );
        }
    }
}
