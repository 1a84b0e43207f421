//! KVM's roots and their lifecycle, per kernel generation ([`KvmKernel`]), and what it means
//! for an IOMMU that walks the vCPUs' root.
//!
//! Linux 6.12 (`arch/x86/kvm/mmu/tdp_mmu.c`, `kvm_tdp_mmu_get_vcpu_root_hpa`): a vCPU entering
//! the guest loads the valid root of its role — address space (SMM or not) and guest mode —
//! allocating it if none exists. The TDP MMU holds a reference on every root until the root is
//! invalidated, so a root outlives every vCPU unloading it (`kvm_mmu_unload`, on each MMU
//! context reset: SMI, RSM, CR0.PG and CR4 role-bit changes — not CR0.WP alone with TDP). A
//! memslot deletion or move invalidates every root (`kvm_mmu_zap_all_fast`) unless
//! `KVM_X86_QUIRK_SLOT_ZAP_ALL` is disabled; each vCPU drops its obsolete root before its next
//! entry (`KVM_REQ_MMU_FREE_OBSOLETE_ROOTS`) and loads a new one; an invalid root goes when its
//! last reference does.
//!
//! Before 6.4 there was no such reference: the last vCPU to unload a root freed it, and every
//! context reset — CR0.WP toggles included — unloaded. With one vCPU (early boot), each SMI,
//! RSM or CR0.WP toggle freed the root, and the next entry allocated a new one.
//!
//! The IOMMU: the designs that keep the shared root hold their own reference on it
//! ([`Policy::iommu_holds_root`](crate::decision::policy::Policy)); the 2021 design holds none
//! and is told of each new root. When KVM drops the root it walks, the IOMMU keeps walking it
//! until the next root of that role is handed over (a root update with a full
//! pre-population) — the model defers the free to that switch, where the design had to for
//! DMA to stay safe. A fast zap with the IOMMU on the vCPUs' root replaces that root at once.
//!
//! Locking rule: like the rest of the engine, every function here runs with the VM's lock
//! held (`&mut self`); the MMU calls inside follow the MMU's own rules.

use crate::decision::kvm::KvmKernel;
use crate::event::{EventKind, PrepopCause, RootCause};
use crate::sharing::engine::{SharingError, SharingVm};
use crate::sharing::platform::Platform;
use crate::sharing::vm::RootRefs;
use crate::table::mmu::{RootId, RootRole};
use crate::table::page_alloc::PageAllocator;

impl<P: Platform> SharingVm<P> {
    /// The host's KVM generation.
    pub fn kernel(&self) -> KvmKernel {
        self.vm.config.kernel
    }

    /// The vCPUs' roots that exist, with their references.
    pub fn root_refs(&self) -> impl Iterator<Item = (RootId, RootRefs)> + '_ {
        self.root_refs.iter().map(|(&id, &r)| (id, r))
    }

    /// Allocates a vCPU root of `role`.
    pub(crate) fn alloc_cpu_root(
        &mut self,
        role: RootRole,
        cause: RootCause,
    ) -> Result<RootId, SharingError> {
        let root = self.cpu.alloc_root(role, cause)?;
        self.root_refs.insert(
            root,
            RootRefs {
                role,
                valid: true,
                vcpus: 0,
            },
        );
        Ok(root)
    }

    /// Frees a vCPU root (no vCPU and no IOMMU may use it any more).
    fn free_cpu_root(&mut self, root: RootId, cause: RootCause) -> Result<(), SharingError> {
        self.root_refs.remove(&root);
        for r in [&mut self.cpu_root, &mut self.smm_root] {
            if *r == Some(root) {
                *r = None;
            }
        }
        self.cpu.free_root(root, cause)?;
        Ok(())
    }

    /// The IOMMU walks `root` (a vCPU root) now.
    fn iommu_walks(&self, root: RootId) -> bool {
        self.iommu_on_cpu_root() && self.iommu_root == Some(root)
    }

    /// Frees `root` if nothing holds it: no vCPU has it loaded, the TDP MMU keeps no reference
    /// (it is invalid, or this kernel keeps none), the IOMMU does not walk it.
    pub(crate) fn put_root(&mut self, root: RootId, cause: RootCause) -> Result<(), SharingError> {
        let Some(&refs) = self.root_refs.get(&root) else {
            return Ok(());
        };
        if refs.vcpus > 0 || (refs.valid && self.kernel().persistent_roots()) {
            return Ok(());
        }
        if self.iommu_walks(root) {
            if refs.valid && self.policy.iommu_holds_root {
                return Ok(());
            }
            // KVM drops it; the IOMMU keeps walking it until its replacement is handed over.
            self.invalidate(root);
            return Ok(());
        }
        self.free_cpu_root(root, cause)
    }

    /// Marks `root` invalid: no vCPU loads it any more.
    fn invalidate(&mut self, root: RootId) {
        if let Some(r) = self.root_refs.get_mut(&root) {
            r.valid = false;
        }
        for r in [&mut self.cpu_root, &mut self.smm_root] {
            if *r == Some(root) {
                *r = None;
            }
        }
    }

    /// Makes sure the normal address space has a valid root; a new one while sharing the
    /// vCPUs' root is pre-populated (if the mode says so) and handed to the IOMMU, and the root
    /// the IOMMU walked before goes if nothing else holds it.
    pub(crate) fn ensure_cpu_root(&mut self, cause: RootCause) -> Result<RootId, SharingError> {
        if let Some(r) = self.cpu_root {
            return Ok(r);
        }
        let root = self.alloc_cpu_root(RootRole::NORMAL, cause)?;
        self.cpu_root = Some(root);
        if self.iommu_on_cpu_root() {
            if self.policy.pins && self.policy.prepopulate_new_roots {
                self.prepopulate_all(PrepopCause::NewRoot)?;
            }
            let pa = self.cpu.root(root)?.pa;
            let old = self.iommu_root.replace(root);
            self.notify_root(root, pa, cause);
            self.totals.iommu_root_updates += 1;
            if let Some(old) = old {
                self.put_root(old, cause)?;
            }
        }
        Ok(root)
    }

    /// Makes sure the SMM address space has a valid root (never handed to the IOMMU).
    pub(crate) fn ensure_smm_root(&mut self) -> Result<RootId, SharingError> {
        if let Some(r) = self.smm_root {
            return Ok(r);
        }
        let root = self.alloc_cpu_root(RootRole::SMM, RootCause::Smm)?;
        self.smm_root = Some(root);
        Ok(root)
    }

    /// The root `vcpu` runs on now: its loaded root if still valid for its role, else the
    /// obsolete one is dropped and the valid root of its role loaded (allocated if there is
    /// none) — KVM's `kvm_mmu_load` on VM entry.
    pub fn vcpu_root(&mut self, vcpu: u32) -> Result<RootId, SharingError> {
        self.enter(vcpu, RootCause::Initial)
    }

    fn enter(&mut self, vcpu: u32, cause: RootCause) -> Result<RootId, SharingError> {
        let v = *self.vm.vcpu(vcpu).ok_or(SharingError::NoVcpu(vcpu))?;
        if let Some(r) = v.loaded {
            let current = self
                .root_refs
                .get(&r)
                .is_some_and(|refs| refs.valid && refs.role == v.role());
            if current {
                return Ok(r);
            }
            self.unload(vcpu, RootCause::MemslotChange)?;
        }
        let root = if v.in_smm {
            self.ensure_smm_root()?
        } else {
            self.ensure_cpu_root(cause)?
        };
        if let Some(refs) = self.root_refs.get_mut(&root) {
            refs.vcpus += 1;
        }
        if let Some(v) = self.vm.vcpu_mut(vcpu) {
            v.loaded = Some(root);
        }
        Ok(root)
    }

    /// `kvm_mmu_unload`: `vcpu` drops its root; the root goes if that was its last holder.
    fn unload(&mut self, vcpu: u32, cause: RootCause) -> Result<(), SharingError> {
        let Some(root) = self.vm.vcpu_mut(vcpu).and_then(|v| v.loaded.take()) else {
            return Ok(());
        };
        if let Some(refs) = self.root_refs.get_mut(&root) {
            refs.vcpus = refs.vcpus.saturating_sub(1);
        }
        self.put_root(root, cause)
    }

    /// `kvm_mmu_reset_context` of `vcpu` (SMM change, MMU-role bits of CR0/CR4), then its next
    /// entry: it unloads its root and loads the one of its (new) role.
    fn reset_context(&mut self, vcpu: u32, cause: RootCause) -> Result<RootId, SharingError> {
        self.unload(vcpu, cause)?;
        self.enter(vcpu, cause)
    }

    /// KVM's fast zap: every root invalidated; each vCPU drops its obsolete root and loads a
    /// new one on its next entry. When the IOMMU walks the vCPUs' root, the new root is made
    /// and handed over now — the IOMMU cannot wait for a vCPU.
    pub(crate) fn fast_zap(&mut self) -> Result<(), SharingError> {
        self.emit_fast_zap();
        let roots: alloc::vec::Vec<RootId> = self.root_refs.keys().copied().collect();
        for &r in &roots {
            self.invalidate(r);
        }
        // KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: every vCPU drops its invalid root before its next
        // entry.
        let vcpus: alloc::vec::Vec<u32> = self.vm.vcpus.iter().map(|v| v.id).collect();
        for v in vcpus {
            self.unload(v, RootCause::MemslotChange)?;
        }
        if self.iommu_on_cpu_root() {
            self.ensure_cpu_root(RootCause::MemslotChange)?;
        }
        for r in roots {
            self.put_root(r, RootCause::MemslotChange)?;
        }
        Ok(())
    }

    /// The `fast_zap` event of the next generation.
    pub(crate) fn emit_fast_zap(&mut self) {
        self.fast_zap_generation += 1;
        let pages = self.cpu.allocator().pages_in_use();
        self.emit(EventKind::FastZap {
            generation: self.fast_zap_generation,
            pages,
        });
    }

    /// `vcpu` enters (SMI) or leaves (RSM) SMM: an MMU context reset, then it runs on the root
    /// of the other address space.
    pub fn smm(&mut self, vcpu: u32, enter: bool) -> Result<(), SharingError> {
        let v = self.vm.vcpu_mut(vcpu).ok_or(SharingError::NoVcpu(vcpu))?;
        v.in_smm = enter;
        self.emit_on(vcpu, EventKind::SmmTransition { enter });
        self.reset_context(vcpu, RootCause::Smm)?;
        self.finish_op();
        Ok(())
    }

    /// `vcpu` writes control register `cr` (0 or 4); `value` `None` is a write whose value was
    /// not recorded, taken as a change of the MMU-role bits. A role change resets the vCPU's
    /// MMU context ([`KvmKernel::cr0_resets`]).
    pub fn cr_write(&mut self, vcpu: u32, cr: u8, value: Option<u64>) -> Result<(), SharingError> {
        let kernel = self.kernel();
        let v = self.vm.vcpu_mut(vcpu).ok_or(SharingError::NoVcpu(vcpu))?;
        let resets = match (cr, value) {
            (0, Some(new)) => kernel.cr0_resets(core::mem::replace(&mut v.cr0, new), new),
            (4, Some(new)) => KvmKernel::cr4_resets(core::mem::replace(&mut v.cr4, new), new),
            (0 | 4, None) => true,
            _ => return Err(SharingError::State("only CR0 and CR4 writes are modelled")),
        };
        self.emit_on(vcpu, EventKind::CrWrite { cr, value });
        if resets {
            self.reset_context(vcpu, RootCause::ContextReset)?;
        }
        self.finish_op();
        Ok(())
    }
}
