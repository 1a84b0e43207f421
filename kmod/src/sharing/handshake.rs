//! The sharing handshake: the VM's facts handed to the decision layer's checks
//! ([`crate::decision::prereq::check`]), which name every unmet prerequisite at once.

use crate::decision::caps::{IommuCaps, Shared};
use crate::decision::policy::Policy;
use crate::decision::prereq::{self, Refusal};
use crate::sharing::vm::Vm;

/// Checks every prerequisite of `policy` for `vm` behind `iommu`.
pub fn check(policy: &Policy, vm: &Vm, iommu: &IommuCaps) -> Result<Shared, Refusal> {
    prereq::check(policy, &vm.facts(), iommu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::addr::{Gpa, Hpa};
    use crate::decision::policy::ShareMode;
    use crate::decision::prereq::Unmet;
    use crate::sharing::vm::tests::config;
    use crate::sharing::vm::{Memslot, SlotKind};

    #[test]
    fn the_vms_slots_and_vcpus_reach_the_checks() {
        let mut vm = Vm::new(1, config(), 0);
        vm.config.device_iopf = true;
        vm.add_slot(Memslot {
            id: 3,
            as_id: 0,
            gpa: Gpa(0),
            size: 4096,
            flags: crate::event::Memslot::FLAG_GUEST_MEMFD,
            hpa: Hpa(0),
            kind: SlotKind::User,
        })
        .unwrap();
        let iommu = IommuCaps::vtd(&[4], true);
        let err = check(&ShareMode::PinPrepopulate.policy(), &vm, &iommu).unwrap_err();
        assert_eq!(
            err.unmet().next(),
            Some(Unmet::GuestMemfd { slot: 3, count: 1 })
        );
        let err = check(&ShareMode::ExportedIopf.policy(), &vm, &iommu).unwrap_err();
        assert_eq!(err.unmet().next(), Some(Unmet::NoVcpu));
    }
}
