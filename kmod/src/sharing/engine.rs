//! The sharing engine: one VM's KVM MMU behaviour (roots per address space, the TDP fault path,
//! fast zaps on memslot removal, SMM, dirty logging) with an IOMMU domain attached, following
//! the policy of one [`Mode`]. The mechanics live here once; the modes only decide.
//!
//! Locking rule: every operation takes `&mut self` — KVM's `slots_lock` and `mmu_lock` held for
//! write; DMA (the IOMMU domain) runs concurrently on other threads against the tables.
//!
//! Each public operation ends with [`SharingVm::finish_op`], which issues the IOTLB flush that
//! a batching mode accumulated during the operation: one range flush instead of many.

use alloc::collections::BTreeMap;
use alloc::string::ToString;
use alloc::vec::Vec;
use core::fmt;

use crate::decision::caps::{IommuCaps, Shared};
use crate::decision::format::{LeafAttrs, MEMTYPE_WB, Perms, PteFormat};
use crate::decision::policy::{Mode, Removal};
use crate::event::clock::Clock;
use crate::event::{Event, EventKind, EventSink, Root as RootEvent, RootCause, Source};
use crate::iommu::iotlb::FlushRequest;
use crate::iommu::walker::{Access, DmaFault, DmaWalker, IommuDomain};
use crate::sharing::dirty::DirtyTracking;
use crate::sharing::handshake::{self, Refusal};
use crate::sharing::pin::{PinError, Pinner};
use crate::sharing::vm::{Memslot, MmioRange, PrivateKind, SlotError, SlotKind, Vm};
use crate::table::mmu::{MmuError, RootId, TdpMmu};
use crate::table::page_alloc::{PageAllocator, PhysAddr};

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharingError {
    Slot(SlotError),
    Mmu(MmuError),
    Pin(PinError),
    Refused(Refusal),
    /// The operation needs sharing to be on (or off).
    State(&'static str),
    NoVcpu(u32),
}

impl fmt::Display for SharingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SharingError::Slot(e) => write!(f, "memslot: {e}"),
            SharingError::Mmu(e) => write!(f, "TDP MMU: {e}"),
            SharingError::Pin(e) => write!(f, "pinning: {e}"),
            SharingError::Refused(e) => write!(f, "{e}"),
            SharingError::State(what) => f.write_str(what),
            SharingError::NoVcpu(id) => write!(f, "no vCPU {id}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for SharingError {}

impl From<SlotError> for SharingError {
    fn from(e: SlotError) -> Self {
        SharingError::Slot(e)
    }
}
impl From<MmuError> for SharingError {
    fn from(e: MmuError) -> Self {
        SharingError::Mmu(e)
    }
}
impl From<PinError> for SharingError {
    fn from(e: PinError) -> Self {
        SharingError::Pin(e)
    }
}

/// Figures that no event carries, and how they were obtained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Time pinning and unpinning (see the pinner's cost source).
    pub pin_ns: u64,
    /// Time building tables in pre-population (measured).
    pub prepop_ns: u64,
    /// Modelled IOTLB flush cost.
    pub flush_ns: u64,
    /// The IOMMU was pointed at a new root after sharing began (root-update notifications).
    pub iommu_root_updates: u64,
    pub dma_ok: u64,
    /// DMAs blocked without an IO page fault to resolve them.
    pub dma_faults: u64,
    /// DMAs that translated to the wrong host address (must stay 0).
    pub dma_wrong: u64,
    pub iopf_resolved: u64,
    pub cpu_faults: u64,
    /// Pages checked by [`SharingVm::verify_pinned_dma`] and how many of them faulted.
    pub verify_checked: u64,
    pub verify_faults: u64,
}

/// An active sharing session.
#[derive(Debug, Clone, Copy)]
struct Session {
    handle: u64,
    shared: Shared,
}

/// One VM with KVM's MMU, an IOMMU domain, and (once requested) sharing in one mode.
pub struct SharingVm<'a, A: PageAllocator, S, C, T, P> {
    pub vm: Vm,
    pub(crate) mode: &'static dyn Mode,
    /// KVM's TDP MMU: the vCPUs' roots (normal and SMM address spaces).
    pub(crate) cpu: TdpMmu<&'a A, S, C>,
    /// The separate, KVM-managed IOMMU table (mode `SeparateTable`).
    pub(crate) separate: Option<(TdpMmu<&'a A, S, C>, RootId)>,
    pub(crate) sink: S,
    pub(crate) clock: C,
    /// Measures real work (kernel: `ktime_get_ns`).
    pub(crate) timer: T,
    pub(crate) domain: &'a IommuDomain<'a>,
    /// The IOMMU's own table, used when not sharing (0: none attached).
    fallback_root: PhysAddr,
    pub(crate) pinner: P,
    pub(crate) cpu_root: Option<RootId>,
    smm_root: Option<RootId>,
    session: Option<Session>,
    /// User slots whose memory sharing pinned.
    pub(crate) pinned: BTreeMap<(u8, u16), Memslot>,
    /// The range a batching mode will flush at the end of the operation.
    pending_flush: Option<(u64, u64)>,
    pub(crate) dirty_tracking: DirtyTracking,
    /// Guest frames written since the last dirty-log harvest (write-protection tracking).
    pub(crate) dirty_frames: alloc::collections::BTreeSet<u64>,
    fast_zap_generation: u64,
    next_handle: u64,
    pub totals: Totals,
}

impl<A: PageAllocator, S, C, T, P> fmt::Debug for SharingVm<'_, A, S, C, T, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharingVm")
            .field("vm", &self.vm.id)
            .field("mode", &self.mode.kind())
            .field("cpu_root", &self.cpu_root)
            .field("sharing", &self.session.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a, A, S, C, T, P> SharingVm<'a, A, S, C, T, P>
where
    A: PageAllocator,
    S: EventSink + Clone,
    C: Clock + Clone,
    T: Clock,
    P: Pinner,
{
    /// A VM whose DMA goes through `domain`, initially on the IOMMU's own table at
    /// `fallback_root`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: Vm,
        mode: &'static dyn Mode,
        alloc: &'a A,
        domain: &'a IommuDomain<'a>,
        fallback_root: PhysAddr,
        pinner: P,
        sink: S,
        clock: C,
        timer: T,
    ) -> Self {
        let format =
            PteFormat::of(vm.config.kvm.kind, vm.config.kvm.levels).unwrap_or(PteFormat::EPT4);
        let mut cpu = TdpMmu::new(alloc, format, sink.clone(), clock.clone(), vm.id);
        cpu.set_max_leaf_level(vm.config.kvm.max_huge_level);
        if fallback_root != 0 {
            domain.set_root(fallback_root);
        }
        let dirty_tracking = if mode.pins() {
            DirtyTracking::DirtyBits
        } else {
            DirtyTracking::WriteProtect
        };
        Self {
            vm,
            mode,
            cpu,
            separate: None,
            sink,
            clock,
            timer,
            domain,
            fallback_root,
            pinner,
            cpu_root: None,
            smm_root: None,
            session: None,
            pinned: BTreeMap::new(),
            pending_flush: None,
            dirty_tracking,
            dirty_frames: alloc::collections::BTreeSet::new(),
            fast_zap_generation: 0,
            next_handle: 1,
            totals: Totals::default(),
        }
    }

    pub fn mode(&self) -> &'static dyn Mode {
        self.mode
    }

    pub fn is_sharing(&self) -> bool {
        self.session.is_some()
    }

    pub fn shared(&self) -> Option<Shared> {
        self.session.map(|s| s.shared)
    }

    pub fn pinner(&self) -> &P {
        &self.pinner
    }

    pub fn cpu_root(&self) -> Option<RootId> {
        self.cpu_root
    }

    pub fn cpu_mmu(&self) -> &TdpMmu<&'a A, S, C> {
        &self.cpu
    }

    /// Selects how dirty pages are found while sharing (see [`DirtyTracking`]).
    pub fn set_dirty_tracking(&mut self, tracking: DirtyTracking) -> Result<(), SharingError> {
        if tracking == DirtyTracking::WriteProtect && self.mode.pins() && self.is_sharing() {
            return Err(SharingError::State(
                "write-protection dirty logging needs IO page faults: a pinned device would fault",
            ));
        }
        self.dirty_tracking = tracking;
        Ok(())
    }

    pub(crate) fn emit(&mut self, kind: EventKind) {
        let ev = Event::new(self.clock.now_ns(), self.vm.id, Source::Simulator, kind);
        self.sink.emit(ev);
    }

    /// The root the IOMMU walks while sharing, and the MMU that owns it.
    pub(crate) fn iommu_table(&mut self) -> Option<(&mut TdpMmu<&'a A, S, C>, RootId)> {
        self.session?;
        match &mut self.separate {
            Some((mmu, root)) => Some((mmu, *root)),
            None => self.cpu_root.map(|r| (&mut self.cpu, r)),
        }
    }

    /// Leaf attributes for a mapping of `slot` in a table the IOMMU walks.
    pub(crate) fn leaf_attrs(&self, pinned: bool) -> LeafAttrs {
        LeafAttrs {
            memtype: MEMTYPE_WB,
            ipat: false,
            snoop: self.session.is_some_and(|s| s.shared.snoop),
            pinned,
        }
    }

    pub(crate) fn slot_perms(slot: &Memslot) -> Perms {
        if slot.readonly() {
            Perms::RX
        } else {
            Perms::RWX
        }
    }

    // ---- notifications -------------------------------------------------------------------

    fn flush_now(&mut self, request: FlushRequest) {
        let out = self.domain.flush(request);
        self.clock.charge(out.cost_ns);
        self.totals.flush_ns += out.cost_ns;
        let (scope, domain, range) = request.scope();
        self.emit(EventKind::IotlbFlush {
            scope,
            domain,
            range,
            ns: out.cost_ns,
        });
    }

    /// A content update of the IOMMU's table: flush now, or at the end of the operation when
    /// the mode batches.
    pub(crate) fn content_updated(&mut self, gfn: u64, frames: u64) {
        if self.session.is_none() || frames == 0 {
            return;
        }
        let (start, end) = (gfn << 12, (gfn + frames) << 12);
        if self.mode.batch_flushes() {
            self.pending_flush = Some(match self.pending_flush {
                Some((s, e)) => (s.min(start), e.max(end)),
                None => (start, end),
            });
        } else {
            self.flush_now(FlushRequest::Range {
                domain: self.domain.id,
                iova: start,
                size: end - start,
            });
        }
    }

    /// Ends an operation: the batched flush, if any.
    pub fn finish_op(&mut self) {
        if let Some((start, end)) = self.pending_flush.take() {
            self.flush_now(FlushRequest::Range {
                domain: self.domain.id,
                iova: start,
                size: end - start,
            });
        }
    }

    /// Points the IOMMU at table `pa` and flushes the whole domain (which covers any range
    /// flush pending in this operation).
    fn switch_iommu_table(&mut self, pa: PhysAddr) {
        let out = self.domain.set_root(pa);
        self.clock.charge(out.cost_ns);
        self.totals.flush_ns += out.cost_ns;
        self.emit(EventKind::IotlbFlush {
            scope: crate::event::FlushScope::Domain,
            domain: Some(u32::from(self.domain.id)),
            range: None,
            ns: out.cost_ns,
        });
        self.pending_flush = None;
    }

    /// The root-update notification: the IOMMU walks `root` from now on.
    fn notify_root(&mut self, root: RootId, pa: PhysAddr, cause: RootCause) {
        let level = self.domain.walker().format.levels;
        self.emit(EventKind::RootSwitch(RootEvent {
            root: root.0,
            level,
            smm: false,
            cause,
        }));
        self.switch_iommu_table(pa);
    }

    // ---- roots ---------------------------------------------------------------------------

    /// Makes sure the normal address space has a root; a new one while sharing the vCPUs' root
    /// is pre-populated (if the mode says so) and handed to the IOMMU.
    fn ensure_cpu_root(&mut self, cause: RootCause) -> Result<RootId, SharingError> {
        if let Some(r) = self.cpu_root {
            return Ok(r);
        }
        let root = self.cpu.alloc_root(false, cause)?;
        self.cpu_root = Some(root);
        if self.session.is_some() && self.mode.shares_cpu_root() {
            if self.mode.pins() && self.mode.prepopulate_new_roots() {
                self.prepopulate_all(crate::event::PrepopCause::NewRoot)?;
            }
            let pa = self.cpu.root(root)?.pa;
            self.notify_root(root, pa, cause);
            self.totals.iommu_root_updates += 1;
        }
        Ok(root)
    }

    fn ensure_smm_root(&mut self) -> Result<RootId, SharingError> {
        if let Some(r) = self.smm_root {
            return Ok(r);
        }
        let root = self.cpu.alloc_root(true, RootCause::Smm)?;
        self.smm_root = Some(root);
        Ok(root)
    }

    /// The root `vcpu` runs on now (allocating it as KVM does on VM entry).
    pub fn vcpu_root(&mut self, vcpu: u32) -> Result<RootId, SharingError> {
        let v = *self
            .vm
            .vcpus
            .iter()
            .find(|v| v.id == vcpu)
            .ok_or(SharingError::NoVcpu(vcpu))?;
        if v.in_smm {
            self.ensure_smm_root()
        } else {
            self.ensure_cpu_root(RootCause::Initial)
        }
    }

    /// KVM's fast zap: every root invalidated; the vCPUs get a new root (a root update when
    /// the IOMMU walks it), the old ones are freed once unused.
    fn fast_zap(&mut self) -> Result<(), SharingError> {
        self.fast_zap_generation += 1;
        let pages = self.cpu.allocator().pages_in_use();
        self.emit(EventKind::FastZap {
            generation: self.fast_zap_generation,
            pages,
        });
        let old = self.cpu_root.take();
        let old_smm = self.smm_root.take();
        if !self.vm.vcpus.is_empty() || self.session.is_some() {
            self.ensure_cpu_root(RootCause::MemslotChange)?;
        }
        if self.vm.vcpus_in_smm() > 0 {
            self.ensure_smm_root()?;
        }
        for r in [old, old_smm].into_iter().flatten() {
            self.cpu.free_root(r, RootCause::MemslotChange)?;
        }
        Ok(())
    }

    // ---- sharing on / off ----------------------------------------------------------------

    /// Requests sharing with an IOMMU of capabilities `iommu`: the handshake, then pinning,
    /// pre-population and the switch of the IOMMU to the shared (or separate) table.
    pub fn request_sharing(&mut self, iommu: &IommuCaps) -> Result<u64, SharingError> {
        if self.session.is_some() {
            return Err(SharingError::State("sharing is already on"));
        }
        let kind = self.mode.kind();
        self.emit(EventKind::SharingRequested { mode: kind });
        let shared = match handshake::check(self.mode, &self.vm, iommu) {
            Ok(s) => s,
            Err(refusal) => {
                self.emit(EventKind::SharingRefused {
                    mode: kind,
                    reason: refusal.to_string(),
                });
                return Err(SharingError::Refused(refusal));
            }
        };
        let handle = self.next_handle;
        self.next_handle += 1;
        self.session = Some(Session { handle, shared });
        if let Err(e) = self.start_session(shared) {
            // Leave nothing half-done: back to the IOMMU's own table, pins released.
            let _ = self.stop_sharing();
            return Err(e);
        }
        self.emit(EventKind::SharingStarted { mode: kind, handle });
        self.finish_op();
        Ok(handle)
    }

    fn start_session(&mut self, shared: Shared) -> Result<(), SharingError> {
        let (root, pa) = if self.mode.shares_cpu_root() {
            self.cpu.set_max_leaf_level(shared.max_huge_level);
            // Leaves larger than the IOMMU accepts cannot stay in a table it walks.
            if let Some(r) = self.cpu_root {
                let big: Vec<_> = self
                    .cpu
                    .leaves(r)?
                    .into_iter()
                    .filter(|l| l.level > shared.max_huge_level)
                    .collect();
                for l in big {
                    self.cpu.zap(r, l.gfn, PteFormat::frames(l.level), false)?;
                }
            }
            let root = match self.cpu_root {
                Some(r) => r,
                None => {
                    let r = self.cpu.alloc_root(false, RootCause::Initial)?;
                    self.cpu_root = Some(r);
                    r
                }
            };
            (root, self.cpu.root(root)?.pa)
        } else {
            let mut mmu = TdpMmu::new(
                *self.cpu.allocator(),
                shared.format,
                self.sink.clone(),
                self.clock.clone(),
                self.vm.id,
            );
            mmu.set_max_leaf_level(shared.max_huge_level);
            let root = mmu.alloc_root(false, RootCause::Initial)?;
            let pa = mmu.root(root)?.pa;
            self.separate = Some((mmu, root));
            (root, pa)
        };
        if self.mode.pins() {
            let slots: Vec<Memslot> = self
                .vm
                .slots()
                .filter(|s| s.kind == SlotKind::User && s.as_id == 0)
                .copied()
                .collect();
            for slot in slots {
                self.pin_slot(&slot)?;
            }
            self.prepopulate_all(crate::event::PrepopCause::SharingStart)?;
        }
        // A separate table mirrors the private pages its policy lets DMA see.
        let private: Vec<(Memslot, PrivateKind)> = self
            .vm
            .slots()
            .filter_map(|s| match s.kind {
                SlotKind::Private(k) => Some((*s, k)),
                SlotKind::User => None,
            })
            .collect();
        if let Some((mmu, root)) = self.separate.as_mut() {
            for (slot, kind) in private {
                if self.mode.dma_sees_private(kind) {
                    mmu.map(*root, &Self::private_mapping(&slot, LeafAttrs::default()))?;
                }
            }
        }
        // The IOMMU's walker must use the negotiated format and superpages.
        debug_assert_eq!(self.domain.walker().format, shared.format);
        self.notify_root(root, pa, RootCause::Initial);
        Ok(())
    }

    /// Stops sharing: the IOMMU goes back to its own table, every pin is released (counted),
    /// the separate table (if any) is freed. Returns the pages unpinned.
    pub fn stop_sharing(&mut self) -> Result<u64, SharingError> {
        let Some(session) = self.session else {
            return Err(SharingError::State("sharing is not on"));
        };
        self.switch_iommu_table(self.fallback_root);
        if let Some((mut mmu, root)) = self.separate.take() {
            mmu.free_root(root, RootCause::Released)?;
        }
        let before = self.pinner.pinned_pages();
        let slots: Vec<Memslot> = core::mem::take(&mut self.pinned).into_values().collect();
        for slot in slots {
            if let Some(r) = self.cpu_root
                && self.mode.shares_cpu_root()
            {
                self.cpu.set_pinned(r, slot.gfn(), slot.frames(), false)?;
            }
            self.release_pins(&slot);
        }
        let unpinned = before - self.pinner.pinned_pages();
        self.session = None;
        self.emit(EventKind::SharingStopped {
            mode: self.mode.kind(),
            unpinned,
        });
        let _ = session.handle;
        Ok(unpinned)
    }

    // ---- pinning -------------------------------------------------------------------------

    fn pin_slot(&mut self, slot: &Memslot) -> Result<(), SharingError> {
        let ns = self.pinner.pin(slot)?;
        self.clock.charge(ns);
        self.totals.pin_ns += ns;
        self.pinned.insert((slot.as_id, slot.id), *slot);
        self.emit(EventKind::Pin {
            range: slot.range(),
            pages: slot.frames(),
        });
        Ok(())
    }

    /// Releases the pins of `slot`, which must already be out of [`SharingVm::pinned`] and out
    /// of every table the IOMMU can reach (flushed).
    fn release_pins(&mut self, slot: &Memslot) {
        let ns = self.pinner.unpin(slot);
        self.clock.charge(ns);
        self.totals.pin_ns += ns;
        self.emit(EventKind::Unpin {
            range: slot.range(),
            pages: slot.frames(),
        });
    }

    // ---- memslots ------------------------------------------------------------------------

    /// `KVM_SET_USER_MEMORY_REGION` creating `slot`.
    pub fn add_slot(&mut self, slot: Memslot) -> Result<(), SharingError> {
        self.vm.add_slot(slot)?;
        self.emit(EventKind::MemslotAdd(slot.event()));
        let user = slot.kind == SlotKind::User && slot.as_id == 0;
        if self.session.is_some() && self.mode.pins() && user {
            self.pin_slot(&slot)?;
            self.populate_slot(&slot, crate::event::PrepopCause::MemslotAdd)?;
        }
        if let SlotKind::Private(kind) = slot.kind {
            self.map_private(&slot, kind)?;
        }
        self.finish_op();
        Ok(())
    }

    /// KVM creates one of its private slots (`__x86_set_memory_region`).
    pub fn add_private_slot(
        &mut self,
        kind: PrivateKind,
        gpa: u64,
        hpa: u64,
    ) -> Result<(), SharingError> {
        let (id, pages) = match kind {
            PrivateKind::Tss => (509, 3),
            PrivateKind::IdentityMap => (510, 1),
            PrivateKind::ApicAccess => (511, 1),
        };
        self.add_slot(Memslot {
            id,
            as_id: 0,
            gpa,
            size: pages << 12,
            flags: 0,
            hpa,
            kind: SlotKind::Private(kind),
        })
    }

    /// KVM maps its private pages in the vCPUs' table; a separate IOMMU table mirrors them
    /// only where its policy lets DMA see them.
    fn map_private(&mut self, slot: &Memslot, kind: PrivateKind) -> Result<(), SharingError> {
        let root = self.ensure_cpu_root(RootCause::Initial)?;
        let m = Self::private_mapping(slot, self.leaf_attrs(false));
        self.cpu.map(root, &m)?;
        if self.mode.dma_sees_private(kind)
            && let Some((mmu, root)) = self.separate.as_mut()
        {
            mmu.map(*root, &m)?;
        }
        Ok(())
    }

    fn private_mapping(slot: &Memslot, attrs: LeafAttrs) -> crate::table::mmu::Mapping {
        crate::table::mmu::Mapping {
            gfn: slot.gfn(),
            frames: slot.frames(),
            hpa: slot.hpa,
            level: 1,
            perms: Perms::RW,
            attrs,
        }
    }

    /// `KVM_SET_USER_MEMORY_REGION` deleting a slot.
    pub fn delete_slot(&mut self, as_id: u8, id: u16) -> Result<(), SharingError> {
        let slot = self.vm.remove_slot(as_id, id)?;
        self.emit(EventKind::MemslotDelete(slot.event()));
        self.slot_removed(&slot)?;
        self.finish_op();
        Ok(())
    }

    /// `KVM_SET_USER_MEMORY_REGION` moving a slot to `gpa` (KVM zaps as for a deletion).
    pub fn move_slot(&mut self, as_id: u8, id: u16, gpa: u64) -> Result<(), SharingError> {
        let old = self.vm.remove_slot(as_id, id)?;
        let moved = Memslot { gpa, ..old };
        if let Err(e) = self.vm.add_slot(moved) {
            self.vm.add_slot(old)?;
            return Err(e.into());
        }
        self.emit(EventKind::MemslotMove {
            old_gpa: old.gpa,
            slot: moved.event(),
        });
        self.slot_removed(&old)?;
        let user = moved.kind == SlotKind::User && moved.as_id == 0;
        if self.session.is_some() && self.mode.pins() && user {
            self.pin_slot(&moved)?;
            self.populate_slot(&moved, crate::event::PrepopCause::MemslotAdd)?;
        }
        self.finish_op();
        Ok(())
    }

    /// What removing `slot`'s mapping does, per mode. The slot leaves the pinned set first (a
    /// new root must not be pre-populated with it); its pins are released last, after the
    /// IOMMU can no longer reach the memory.
    fn slot_removed(&mut self, slot: &Memslot) -> Result<(), SharingError> {
        let was_pinned = self.pinned.remove(&(slot.as_id, slot.id)).is_some();
        let sharing = self.session.is_some();
        let removal = if sharing {
            self.mode.removal()
        } else {
            Removal::FastZapAllRoots
        };
        // The vCPUs' side: KVM's own behaviour unless the shared root must persist.
        let cpu_persists =
            sharing && self.mode.shares_cpu_root() && removal != Removal::FastZapAllRoots;
        if cpu_persists {
            let root = self.ensure_cpu_root(RootCause::Initial)?;
            match removal {
                Removal::ZapAllLeaves => {
                    // The exported root stays; the fast zap empties it instead.
                    self.fast_zap_generation += 1;
                    let pages = self.cpu.allocator().pages_in_use();
                    self.emit(EventKind::FastZap {
                        generation: self.fast_zap_generation,
                        pages,
                    });
                    let limit = self.cpu.format().gfn_limit();
                    self.cpu.zap_released(root, 0, limit, false)?;
                    self.flush_now(FlushRequest::Domain(self.domain.id));
                }
                _ => {
                    self.cpu
                        .zap_released(root, slot.gfn(), slot.frames(), true)?;
                    self.content_updated(slot.gfn(), slot.frames());
                }
            }
            if let Some(smm) = self.smm_root {
                self.cpu.zap(smm, slot.gfn(), slot.frames(), true)?;
            }
        } else {
            self.fast_zap()?;
        }
        // A separate IOMMU table: only the slot's range.
        if let Some((mmu, root)) = self.separate.as_mut() {
            mmu.zap_released(*root, slot.gfn(), slot.frames(), true)?;
            self.content_updated(slot.gfn(), slot.frames());
        }
        // Flush before unpinning: the device must not reach memory that is no longer pinned.
        self.finish_op();
        if was_pinned {
            self.release_pins(slot);
        }
        Ok(())
    }

    /// A flags-only change (dirty logging on/off).
    pub fn set_slot_flags(&mut self, as_id: u8, id: u16, flags: u32) -> Result<(), SharingError> {
        let old = *self
            .vm
            .slot(as_id, id)
            .ok_or(SlotError::NoSuchSlot { as_id, slot: id })?;
        let slot = self.vm.set_slot_flags(as_id, id, flags)?;
        self.emit(EventKind::MemslotFlags {
            old_flags: old.flags,
            slot: slot.event(),
        });
        if self.pinned.contains_key(&(as_id, id)) {
            self.pinned.insert((as_id, id), slot);
        }
        match (old.dirty_logging(), slot.dirty_logging()) {
            (false, true) => self.dirty_log_started(&slot)?,
            (true, false) => self.dirty_log_stopped(&slot)?,
            _ => {}
        }
        self.finish_op();
        Ok(())
    }

    /// A peer device's MMIO range (P2P target) appears in the guest.
    pub fn add_mmio(&mut self, range: MmioRange) -> Result<(), SharingError> {
        self.vm.mmio.push(range);
        if self.session.is_some() && self.mode.pins() {
            self.populate_mmio(&range, crate::event::PrepopCause::MemslotAdd)?;
        }
        self.finish_op();
        Ok(())
    }

    // ---- SMM -----------------------------------------------------------------------------

    /// `vcpu` enters (or leaves) SMM. SMM has its own root, never shared; while every vCPU is
    /// in SMM the normal root stays alive if the IOMMU walks it, and is freed otherwise.
    pub fn smm(&mut self, vcpu: u32, enter: bool) -> Result<(), SharingError> {
        let v = self
            .vm
            .vcpus
            .iter_mut()
            .find(|v| v.id == vcpu)
            .ok_or(SharingError::NoVcpu(vcpu))?;
        v.in_smm = enter;
        let in_smm = self.vm.vcpus_in_smm();
        let outside = self.vm.vcpus.len() - in_smm;
        let iommu_holds = self.session.is_some() && self.mode.shares_cpu_root();
        if enter {
            self.ensure_smm_root()?;
            if outside == 0
                && !iommu_holds
                && let Some(r) = self.cpu_root.take()
            {
                self.cpu.free_root(r, RootCause::Smm)?;
            }
        } else {
            if in_smm == 0
                && let Some(r) = self.smm_root.take()
            {
                self.cpu.free_root(r, RootCause::Smm)?;
            }
            self.ensure_cpu_root(RootCause::Smm)?;
        }
        self.finish_op();
        Ok(())
    }

    // ---- the fault paths -----------------------------------------------------------------

    /// The TDP fault path for `gfn` on `root` of the vCPUs' MMU: maps the largest leaf the slot
    /// allows. Returns false when no slot or MMIO range backs `gfn` (emulated MMIO).
    fn fault_in(&mut self, root: RootId, gfn: u64, smm: bool) -> Result<bool, SharingError> {
        let as_id = u8::from(smm);
        let slot = self
            .vm
            .slot_of(as_id, gfn)
            .or_else(|| self.vm.slot_of(0, gfn))
            .copied();
        let (base_gfn, frames, hpa, max_level, perms, pinned) = if let Some(s) = slot {
            let pinned = self.pinned.contains_key(&(s.as_id, s.id)) && self.mode.shares_cpu_root();
            (
                s.gfn(),
                s.frames(),
                s.hpa,
                self.max_level_for_slot(&s),
                Self::slot_perms(&s),
                pinned,
            )
        } else if let Some(m) = self
            .vm
            .mmio
            .iter()
            .find(|m| gfn >= m.gpa >> 12 && gfn < (m.gpa + m.size) >> 12)
            .copied()
        {
            let pinned = false;
            (
                m.gpa >> 12,
                m.size >> 12,
                m.hpa,
                self.max_level_for_mmio(),
                Perms::RW,
                pinned,
            )
        } else {
            return Ok(false);
        };
        let attrs = self.leaf_attrs(pinned);
        let mut level = max_level;
        loop {
            let f = PteFormat::frames(level);
            // The leaf of this level holding `gfn`, if it lies inside the backing and the host
            // address is aligned like the guest one.
            let start = gfn & !(f - 1);
            let inside = start >= base_gfn && start + f <= base_gfn + frames;
            let hpa_at = if inside {
                hpa + ((start - base_gfn) << 12)
            } else {
                hpa + ((gfn - base_gfn) << 12)
            };
            let fits = inside && (hpa_at >> 12) & (f - 1) == 0;
            if level == 1 || fits {
                let (start, hpa_at) = if fits { (start, hpa_at) } else { (gfn, hpa_at) };
                let m = crate::table::mmu::Mapping {
                    gfn: start,
                    frames: f,
                    hpa: hpa_at,
                    level,
                    perms,
                    attrs,
                };
                match self.cpu.map(root, &m) {
                    Ok(_) => return Ok(true),
                    Err(MmuError::Occupied { level: l, .. }) if l > level => return Ok(true),
                    Err(MmuError::Occupied { .. }) if level > 1 => level -= 1,
                    Err(e) => return Err(e.into()),
                }
            } else {
                level -= 1;
            }
        }
    }

    /// A vCPU touches `[gpa, gpa + size)`: every page goes through the CPU's walk, faulting in
    /// what is missing (and, under write-protection dirty logging, recording writes).
    pub fn touch(
        &mut self,
        vcpu: u32,
        gpa: u64,
        size: u64,
        write: bool,
    ) -> Result<(), SharingError> {
        let root = self.vcpu_root(vcpu)?;
        let smm = self.vm.vcpus.iter().any(|v| v.id == vcpu && v.in_smm);
        let walker = DmaWalker {
            format: self.cpu.format(),
            max_leaf_level: 3,
            set_ad: true,
        };
        let access = if write { Access::Write } else { Access::Read };
        let end = gpa.saturating_add(size);
        let mut at = gpa & !0xfff;
        while at < end {
            let root_pa = self.cpu.root(root)?.pa;
            match walker.translate(self.cpu.allocator(), root_pa, at, access) {
                Ok(t) => {
                    at = (at & !(t.page_size.bytes() - 1)) + t.page_size.bytes();
                }
                Err(DmaFault::NotPresent { .. }) => {
                    self.totals.cpu_faults += 1;
                    let gfn = at >> 12;
                    self.emit(EventKind::PageFault {
                        gfn,
                        error_code: if write { 0x2 } else { 0x0 },
                    });
                    if !self.fault_in(root, gfn, smm)? {
                        at += 0x1000; // emulated MMIO: nothing to map
                    }
                }
                Err(DmaFault::Permission { .. }) => {
                    let gfn = at >> 12;
                    self.totals.cpu_faults += 1;
                    self.emit(EventKind::PageFault {
                        gfn,
                        error_code: 0x3,
                    });
                    if !self.write_fault(root, gfn)? {
                        at += 0x1000; // a write to ROM: emulated
                    }
                }
                Err(_) => at += 0x1000,
            }
        }
        self.finish_op();
        Ok(())
    }

    /// A write to a write-protected page: dirty logging records it and restores write access.
    /// Returns false for read-only memory.
    fn write_fault(&mut self, root: RootId, gfn: u64) -> Result<bool, SharingError> {
        let Some(slot) = self.vm.slot_of(0, gfn).copied() else {
            return Ok(false);
        };
        if slot.readonly() {
            return Ok(false);
        }
        self.dirty_frames.insert(gfn);
        self.cpu.set_perms(root, gfn, 1, Self::slot_perms(&slot))?;
        Ok(true)
    }

    /// The device does DMA over `[iova, iova + size)`, one access per `stride` bytes.
    /// Pinning modes must never fault on guest memory; the IOPF mode resolves faults through
    /// the TDP fault path.
    pub fn dma(
        &mut self,
        iova: u64,
        size: u64,
        write: bool,
        stride: u64,
    ) -> Result<(), SharingError> {
        let access = if write { Access::Write } else { Access::Read };
        let stride = stride.max(0x1000);
        let mut at = iova;
        while at < iova.saturating_add(size) {
            self.dma_one(at, access)?;
            at += stride;
        }
        self.finish_op();
        Ok(())
    }

    fn expected_hpa(&self, iova: u64) -> Option<u64> {
        let gfn = iova >> 12;
        if let Some(s) = self.vm.slot_of(0, gfn) {
            return Some(s.hpa_of(gfn) + (iova & 0xfff));
        }
        self.vm
            .mmio
            .iter()
            .find(|m| iova >= m.gpa && iova < m.gpa + m.size)
            .map(|m| m.hpa + (iova - m.gpa))
    }

    fn dma_one(&mut self, iova: u64, access: Access) -> Result<bool, SharingError> {
        let alloc = self.cpu.allocator();
        match self.domain.dma(alloc, iova, access) {
            Ok(t) => {
                if self.session.is_some() && Some(t.hpa) != self.expected_hpa(iova) {
                    self.totals.dma_wrong += 1;
                } else {
                    self.totals.dma_ok += 1;
                }
                Ok(true)
            }
            Err(_) if self.session.is_some() && !self.mode.pins() => {
                // An IO page fault: resolved by the TDP fault path on the exported root.
                let root = self.ensure_cpu_root(RootCause::Initial)?;
                let gfn = iova >> 12;
                let resolved = match access {
                    Access::Write
                        if self
                            .cpu
                            .lookup(root, gfn)?
                            .is_some_and(|l| !l.perms.contains(Perms::W)) =>
                    {
                        self.write_fault(root, gfn)?
                    }
                    _ => self.fault_in(root, gfn, false)?,
                };
                self.emit(EventKind::IoPageFault {
                    iova,
                    write: access == Access::Write,
                    resolved,
                });
                if resolved {
                    self.totals.iopf_resolved += 1;
                    let alloc = self.cpu.allocator();
                    if self.domain.dma(alloc, iova, access).is_ok() {
                        self.totals.dma_ok += 1;
                        return Ok(true);
                    }
                }
                self.totals.dma_faults += 1;
                Ok(false)
            }
            Err(_) => {
                self.totals.dma_faults += 1;
                self.emit(EventKind::IoPageFault {
                    iova,
                    write: access == Access::Write,
                    resolved: false,
                });
                Ok(false)
            }
        }
    }

    /// DMA-checks every pinned slot (first, last and evenly spread pages, reads and writes
    /// where allowed): each must translate, to the right host address. Returns the faults
    /// found; also added to [`Totals`].
    pub fn verify_pinned_dma(&mut self) -> u64 {
        if self.session.is_none() || !self.mode.pins() {
            return 0;
        }
        let slots: Vec<Memslot> = self.pinned.values().copied().collect();
        let mut faults = 0;
        for s in slots {
            let n = s.frames();
            let step = (n / 64).max(1);
            let mut pages: Vec<u64> = (0..n).step_by(step as usize).collect();
            pages.push(n - 1);
            for p in pages {
                let iova = s.gpa + (p << 12) + 0x10;
                let mut accesses = alloc::vec![Access::Read];
                if !s.readonly() {
                    accesses.push(Access::Write);
                }
                for access in accesses {
                    self.totals.verify_checked += 1;
                    let alloc = self.cpu.allocator();
                    match self.domain.dma(alloc, iova, access) {
                        Ok(t) if t.hpa == s.hpa_of(s.gfn() + p) + 0x10 => {}
                        _ => faults += 1,
                    }
                }
            }
        }
        self.totals.verify_faults += faults;
        faults
    }

    /// Is `gpa` readable by DMA right now (without resolving faults)?
    pub fn dma_reaches(&self, gpa: u64) -> bool {
        self.domain
            .walker()
            .translate(self.cpu.allocator(), self.domain.root(), gpa, Access::Read)
            .is_ok()
    }

    /// Table pages in use by this VM's tables (all roots, both MMUs).
    pub fn table_pages(&self) -> u64 {
        self.cpu.allocator().pages_in_use()
    }

    /// Frames covered by leaves of each size in the table the IOMMU walks: (4K, 2M, 1G).
    pub fn iommu_leaf_census(&mut self) -> Option<[u64; 3]> {
        let (mmu, root) = self.iommu_table()?;
        let mut census = [0; 3];
        for l in mmu.leaves(root).ok()? {
            census[l.level as usize - 1] += 1;
        }
        Some(census)
    }
}
