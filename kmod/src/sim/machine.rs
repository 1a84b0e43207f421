//! The simulated hardware around one VM's sharing engine: vCPUs that touch guest memory through
//! the TDP table as the CPU's page walker would (faulting into the engine where an entry is
//! missing or write-protected), and the assigned device whose DMA goes through the IOMMU domain
//! (reporting its faults to the engine). The engine decides; the machine only plays hardware
//! against it and counts what the device saw.

use crate::decision::addr::{Gpa, Hpa, Iova, PAGE_SIZE};
use crate::iommu::domain::IommuDomain;
use crate::iommu::walker::{Access, DmaFault, DmaWalker};
use crate::sharing::engine::{SharingError, SharingVm};
use crate::sharing::faults::error_code;
use crate::sharing::platform::Platform;
use crate::sharing::vm::Memslot;

/// What the device's DMA met.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceTotals {
    /// DMAs translated to the right host address.
    pub dma_ok: u64,
    /// DMAs blocked (without an IO page fault that resolved them).
    pub dma_faults: u64,
    /// DMAs that translated to the wrong host address (must stay 0).
    pub dma_wrong: u64,
    /// Accesses made by [`Machine::verify_pinned_dma`], and how many of them faulted or went
    /// wrong.
    pub verify_checked: u64,
    pub verify_faults: u64,
}

/// One VM's engine with its vCPUs and its assigned device.
pub struct Machine<'a, P: Platform> {
    /// The sharing engine (KVM's side).
    pub engine: SharingVm<P>,
    domain: &'a IommuDomain<'a>,
    /// What the device's DMA met.
    pub device: DeviceTotals,
}

impl<P: Platform> core::fmt::Debug for Machine<'_, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Machine")
            .field("engine", &self.engine)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl<'a, P: Platform> Machine<'a, P> {
    /// The engine, with the device's DMA going through `domain` (the domain the engine's
    /// platform notifies).
    pub fn new(engine: SharingVm<P>, domain: &'a IommuDomain<'a>) -> Self {
        Self {
            engine,
            domain,
            device: DeviceTotals::default(),
        }
    }

    /// vCPU `vcpu` reads or writes `[gpa, gpa + size)`: every page goes through the CPU's walk,
    /// faulting into the engine where an entry is missing (or write-protected).
    pub fn touch(
        &mut self,
        vcpu: u32,
        gpa: Gpa,
        size: u64,
        write: bool,
    ) -> Result<(), SharingError> {
        let root = self.engine.vcpu_root(vcpu)?;
        // The CPU's walk, as the IOMMU that natively walks KVM's format would do it.
        let walker = DmaWalker::native(&self.engine.cpu_mmu().format(), true);
        let access = Access::of(write);
        let end = gpa.0.saturating_add(size);
        let mut at = gpa.align_down(PAGE_SIZE);
        while at.0 < end {
            let root_pa = self.engine.cpu_mmu().root(root)?.pa;
            let walk = walker.translate(self.engine.table_memory(), root_pa, at.iova(), access);
            let mapped = match walk {
                Ok(t) => {
                    at = at.align_down(t.page_size.bytes()) + t.page_size.bytes();
                    continue;
                }
                Err(DmaFault::NotPresent { .. }) => {
                    let code = if write { error_code::WRITE } else { 0 };
                    self.engine.tdp_page_fault(vcpu, at.gfn(), code)?
                }
                Err(DmaFault::Permission { .. }) => {
                    let code = error_code::PRESENT | error_code::WRITE;
                    self.engine.tdp_page_fault(vcpu, at.gfn(), code)?
                }
                Err(_) => false,
            };
            if !mapped {
                at = at + PAGE_SIZE; // emulated MMIO or a write to ROM: KVM emulates it
            }
        }
        self.engine.finish_op();
        Ok(())
    }

    /// The device does DMA over `[iova, iova + size)`, one access per `stride` bytes. Pinning
    /// modes must never fault on guest memory; the IOPF mode resolves faults through the
    /// engine's TDP fault path.
    pub fn dma(
        &mut self,
        iova: Iova,
        size: u64,
        write: bool,
        stride: u64,
    ) -> Result<(), SharingError> {
        let access = Access::of(write);
        let stride = stride.max(PAGE_SIZE);
        let end = iova.0.saturating_add(size);
        let mut at = iova;
        while at.0 < end {
            self.dma_one(at, access)?;
            at = at + stride;
        }
        self.engine.finish_op();
        Ok(())
    }

    /// Where `iova` must land: the slot or P2P range the VM has there.
    fn expected_hpa(&self, iova: Iova) -> Option<Hpa> {
        let vm = self.engine.vm();
        let gfn = iova.gfn();
        if let Some(s) = vm.slot_of(0, gfn) {
            return Some(s.hpa_of(gfn) + iova.page_offset());
        }
        vm.mmio_of(gfn)
            .map(|m| m.hpa + iova.gpa().bytes_since(m.gpa))
    }

    fn dma_one(&mut self, iova: Iova, access: Access) -> Result<bool, SharingError> {
        match self.domain.dma(self.engine.table_memory(), iova, access) {
            Ok(t) => {
                if self.engine.is_sharing() && Some(t.hpa) != self.expected_hpa(iova) {
                    self.device.dma_wrong += 1;
                } else {
                    self.device.dma_ok += 1;
                }
                Ok(true)
            }
            Err(_) => {
                let resolved = self.engine.iommu_fault(iova, access == Access::Write)?;
                if resolved
                    && self
                        .domain
                        .dma(self.engine.table_memory(), iova, access)
                        .is_ok()
                {
                    self.device.dma_ok += 1;
                    return Ok(true);
                }
                self.device.dma_faults += 1;
                Ok(false)
            }
        }
    }

    /// DMA-checks every pinned slot (first, last and evenly spread pages, reads and writes
    /// where allowed): each must translate, to the right host address. Returns the faults
    /// found; also added to [`DeviceTotals`].
    pub fn verify_pinned_dma(&mut self) -> u64 {
        if !self.engine.is_sharing() || !self.engine.policy().pins {
            return 0;
        }
        let slots: Vec<Memslot> = self.engine.pinned_slots().copied().collect();
        let mut faults = 0;
        // The IOMMU must walk a live root: a freed one still reads as it was until its pages
        // are reused, so translations alone would not tell.
        let live = self
            .domain
            .root()
            .is_some_and(|pa| self.engine.live_roots().any(|r| r == pa));
        if !live {
            self.device.verify_checked += 1;
            faults += 1;
        }
        for s in slots {
            let n = s.frames();
            let step = (n / 64).max(1);
            let mut pages: Vec<u64> = (0..n).step_by(step as usize).collect();
            pages.push(n - 1);
            for p in pages {
                let gfn = s.gfn() + p;
                let iova = gfn.iova() + 0x10;
                let mut accesses = vec![Access::Read];
                if !s.readonly() {
                    accesses.push(Access::Write);
                }
                for access in accesses {
                    self.device.verify_checked += 1;
                    match self.domain.dma(self.engine.table_memory(), iova, access) {
                        Ok(t) if t.hpa == s.hpa_of(gfn) + 0x10 => {}
                        _ => faults += 1,
                    }
                }
            }
        }
        self.device.verify_faults += faults;
        faults
    }

    /// Is `gpa` readable by DMA right now (without resolving faults)?
    pub fn dma_reaches(&self, gpa: Gpa) -> bool {
        self.domain.root().is_some_and(|root| {
            self.domain
                .walker()
                .translate(self.engine.table_memory(), root, gpa.iova(), Access::Read)
                .is_ok()
        })
    }
}
