//! The sharing engine: one VM's KVM MMU behaviour (roots per address space, the TDP fault path,
//! fast zaps on memslot removal, SMM, dirty logging) with an IOMMU domain attached, following
//! the [`Policy`] of one [`ShareMode`]. The mechanics live here once; the policies only decide.
//! The engine emits events and answers requests (memslot changes, faults, sharing on/off); the
//! vCPUs and devices that make those requests are not part of it (`crate::sim` plays them).
//!
//! Locking rule: every operation takes `&mut self` — KVM's `slots_lock` and `mmu_lock` held for
//! write; DMA (the IOMMU domain) runs concurrently on other threads against the tables.
//!
//! Each public operation ends with [`SharingVm::finish_op`], which issues the IOTLB flush that
//! a batching mode accumulated during the operation: one range flush instead of many.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::ToString;
use alloc::vec::Vec;
use core::fmt;

use crate::decision::addr::{Gfn, Hpa, Iova, Level};
use crate::decision::caps::{IommuCaps, Shared};
use crate::decision::format::{LeafAttrs, MEMTYPE_WB, Perms};
use crate::decision::policy::{DirtyTracking, Policy, PolicyConflict, ShareMode};
use crate::decision::prereq::Refusal;
use crate::event::clock::Clock;
use crate::event::{
    Event, EventKind, EventSink, FlushScope, PrepopCause, Root as RootEvent, RootCause, Source,
};
use crate::iommu::iotlb::FlushRequest;
use crate::sharing::handshake;
use crate::sharing::pin::{PinError, Pinner};
use crate::sharing::platform::{IommuDriver, Parts, Platform, PlatformMmu};
use crate::sharing::vm::{Memslot, RootRefs, SlotError, SlotKind, Vm};
use crate::table::mmu::{MmuError, RootId, RootRole, TdpMmu};
use crate::table::page_alloc::PageAllocator;

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
    /// IO page faults the TDP fault path resolved.
    pub iopf_resolved: u64,
    /// TDP page faults of vCPUs handled.
    pub cpu_faults: u64,
    /// Times pre-population dropped and retook `mmu_lock` between bounded batches.
    pub prepop_yields: u64,
    /// Most entries one pre-population wrote without yielding the lock.
    pub prepop_max_batch: u64,
}

/// An active sharing session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Session {
    pub(crate) shared: Shared,
}

/// One VM with KVM's MMU, an IOMMU domain, and (once requested) sharing in one mode.
pub struct SharingVm<P: Platform> {
    pub(crate) vm: Vm,
    pub(crate) policy: Policy,
    /// KVM's TDP MMU: the vCPUs' roots (normal and SMM address spaces).
    pub(crate) cpu: PlatformMmu<P>,
    /// The separate, KVM-managed IOMMU table (mode `SeparateTable`).
    pub(crate) separate: Option<(PlatformMmu<P>, RootId)>,
    pub(crate) sink: P::Sink,
    pub(crate) clock: P::Clock,
    /// Measures real work (kernel: `ktime_get_ns`).
    pub(crate) timer: P::Timer,
    pub(crate) iommu: P::Iommu,
    /// The IOMMU's own table, used when not sharing (`None`: none attached).
    fallback_root: Option<Hpa>,
    pub(crate) pinner: P::Pinner,
    /// `mmu_lock` is held (for the engine's work on the tables): nothing that may sleep —
    /// pinning — may run (the kernel's `might_sleep` check).
    pub(crate) lock_held: bool,
    /// The valid root of the normal address space (what a vCPU entering it loads).
    pub(crate) cpu_root: Option<RootId>,
    /// The valid root of the SMM address space.
    pub(crate) smm_root: Option<RootId>,
    /// Every vCPU root that exists, with what holds it.
    pub(crate) root_refs: BTreeMap<RootId, RootRefs>,
    /// The vCPU root the IOMMU walks (sharing the vCPUs' root); it may be invalid, awaiting
    /// its replacement.
    pub(crate) iommu_root: Option<RootId>,
    pub(crate) session: Option<Session>,
    /// User slots whose memory sharing pinned.
    pub(crate) pinned: BTreeMap<(u8, u16), Memslot>,
    /// The range a batching mode will flush at the end of the operation.
    pending_flush: Option<(Iova, Iova)>,
    pub(crate) dirty_tracking: DirtyTracking,
    /// Guest frames written since the last dirty-log harvest (write-protection tracking).
    pub(crate) dirty_frames: BTreeSet<Gfn>,
    pub(crate) fast_zap_generation: u64,
    /// KVM's memslots generation: every memslot change moves it (MMIO SPTEs carry it).
    pub(crate) memslot_generation: u64,
    next_handle: u64,
    pub totals: Totals,
}

impl<P: Platform> fmt::Debug for SharingVm<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharingVm")
            .field("vm", &self.vm.id)
            .field("mode", &self.policy.mode)
            .field("cpu_root", &self.cpu_root)
            .field("sharing", &self.session.is_some())
            .finish_non_exhaustive()
    }
}

impl<P: Platform> SharingVm<P> {
    /// A VM sharing (once requested) in `mode`, whose DMA goes through the platform's IOMMU
    /// domain, initially on the IOMMU's own table at `fallback_root`.
    pub fn new(vm: Vm, mode: ShareMode, fallback_root: Option<Hpa>, parts: Parts<P>) -> Self {
        Self::build(vm, mode.policy(), fallback_root, parts)
    }

    /// A VM sharing under a policy of its own; refused, before anything runs, when the
    /// policy's decisions cannot work together.
    pub fn with_policy(
        vm: Vm,
        policy: Policy,
        fallback_root: Option<Hpa>,
        parts: Parts<P>,
    ) -> Result<Self, PolicyConflict> {
        policy.validate()?;
        Ok(Self::build(vm, policy, fallback_root, parts))
    }

    fn build(vm: Vm, policy: Policy, fallback_root: Option<Hpa>, parts: Parts<P>) -> Self {
        let Parts {
            alloc,
            iommu,
            pinner,
            sink,
            clock,
            timer,
        } = parts;
        let format =
            crate::decision::format::PteFormat::of(vm.config.kvm.kind, vm.config.kvm.levels)
                .unwrap_or(crate::decision::format::PteFormat::EPT4);
        let mut cpu = TdpMmu::new(alloc, format, sink.clone(), clock.clone(), vm.id);
        cpu.set_max_leaf_level(
            Level::new(vm.config.kvm.max_huge_level.clamp(1, 5)).unwrap_or(Level::L1),
        );
        if fallback_root.is_some() {
            iommu.switch_root(fallback_root);
        }
        Self {
            vm,
            policy,
            cpu,
            separate: None,
            sink,
            clock,
            timer,
            iommu,
            fallback_root,
            pinner,
            lock_held: false,
            cpu_root: None,
            smm_root: None,
            root_refs: BTreeMap::new(),
            iommu_root: None,
            session: None,
            pinned: BTreeMap::new(),
            pending_flush: None,
            dirty_tracking: policy.default_dirty_tracking(),
            dirty_frames: BTreeSet::new(),
            fast_zap_generation: 0,
            memslot_generation: 0,
            next_handle: 1,
            totals: Totals::default(),
        }
    }

    /// The VM as the engine keeps it (memslots, vCPUs, MMIO ranges).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The mode and its decisions.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn is_sharing(&self) -> bool {
        self.session.is_some()
    }

    pub fn shared(&self) -> Option<Shared> {
        self.session.map(|s| s.shared)
    }

    pub fn pinner(&self) -> &P::Pinner {
        &self.pinner
    }

    /// The user slots sharing pinned (DMA must reach every page of them).
    pub fn pinned_slots(&self) -> impl Iterator<Item = &Memslot> {
        self.pinned.values()
    }

    pub fn cpu_root(&self) -> Option<RootId> {
        self.cpu_root
    }

    pub fn cpu_mmu(&self) -> &PlatformMmu<P> {
        &self.cpu
    }

    /// The page-table memory every table of this VM lives in.
    pub fn table_memory(&self) -> &P::Alloc {
        self.cpu.allocator()
    }

    /// Selects how dirty pages are found while sharing (see [`DirtyTracking`]).
    pub fn set_dirty_tracking(&mut self, tracking: DirtyTracking) -> Result<(), SharingError> {
        if tracking == DirtyTracking::WriteProtect && self.policy.pins && self.is_sharing() {
            return Err(SharingError::State(
                "write-protection dirty logging needs IO page faults: a pinned device would fault",
            ));
        }
        if tracking == DirtyTracking::DirtyBits
            && self.policy.pins
            && self.shared().is_some_and(|s| !s.iommu_ad)
        {
            return Err(SharingError::State(
                "dirty-bit tracking needs an IOMMU that sets KVM's dirty bits; this one sets none",
            ));
        }
        self.dirty_tracking = tracking;
        Ok(())
    }

    pub(crate) fn emit(&mut self, kind: EventKind) {
        let ev = Event::new(self.clock.now_ns(), self.vm.id, Source::Simulator, kind);
        self.sink.emit(ev);
    }

    /// Reports `kind` as `vcpu`'s.
    pub(crate) fn emit_on(&mut self, vcpu: u32, kind: EventKind) {
        let ev = Event::new(self.clock.now_ns(), self.vm.id, Source::Simulator, kind);
        self.sink.emit(ev.on_vcpu(vcpu));
    }

    /// The IOMMU walks the vCPUs' own root right now.
    pub(crate) fn iommu_on_cpu_root(&self) -> bool {
        self.session.is_some() && self.policy.shares_cpu_root
    }

    /// The root the IOMMU walks while sharing, and the MMU that owns it.
    pub(crate) fn iommu_table(&mut self) -> Option<(&mut PlatformMmu<P>, RootId)> {
        self.session?;
        match &mut self.separate {
            Some((mmu, root)) => Some((mmu, *root)),
            None => self.cpu_root.map(|r| (&mut self.cpu, r)),
        }
    }

    /// Leaf attributes for a mapping in a table the IOMMU walks.
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

    pub(crate) fn flush_now(&mut self, request: FlushRequest) {
        let out = self.iommu.invalidate(request);
        self.clock.charge(out.cost_ns);
        self.totals.flush_ns += out.cost_ns;
        let (scope, domain, range) = request.scope();
        self.emit(EventKind::IotlbFlush {
            scope,
            domain,
            range,
            ns: out.cost_ns,
        });
        // The tables the invalidation dropped every cached pointer to may go now.
        match request {
            FlushRequest::Range {
                leaf_only: true, ..
            } => {}
            FlushRequest::Range { iova, size, .. } => {
                let end = iova.offset(size).gfn();
                self.release_unlinked(Some((iova.gfn(), end)));
            }
            FlushRequest::Domain(_) | FlushRequest::All => self.release_unlinked(None),
        }
    }

    /// The guest frames covered by tables unlinked from a table the IOMMU walks and not yet
    /// released: they need an invalidation of the paging-structure caches first.
    fn tables_awaiting(&self) -> Option<(Gfn, Gfn)> {
        let spans = [
            self.cpu.unlinked_span(),
            self.separate
                .as_ref()
                .and_then(|(mmu, _)| mmu.unlinked_span()),
        ];
        spans
            .into_iter()
            .flatten()
            .reduce(|(a, b), (c, d)| (a.min(c), b.max(d)))
    }

    /// Retires the unlinked tables inside `covered` (all with `None`).
    fn release_unlinked(&mut self, covered: Option<(Gfn, Gfn)>) {
        self.cpu.release_unlinked(covered);
        if let Some((mmu, _)) = self.separate.as_mut() {
            mmu.release_unlinked(covered);
        }
    }

    /// A range flush of `[start, end)`: leaf-only (VT-d's invalidation hint) unless tables
    /// await an invalidation of the paging-structure caches.
    fn range_flush(&self, start: Iova, end: Iova) -> FlushRequest {
        FlushRequest::Range {
            domain: self.iommu.domain_id(),
            iova: start,
            size: end.bytes_since(start),
            leaf_only: self.tables_awaiting().is_none(),
        }
    }

    /// A content update of the IOMMU's table: flush now, or at the end of the operation when
    /// the mode batches.
    pub(crate) fn content_updated(&mut self, gfn: Gfn, frames: u64) {
        if self.session.is_none() || frames == 0 {
            return;
        }
        let (start, end) = (gfn.iova(), (gfn + frames).iova());
        if self.policy.batch_flushes {
            self.pending_flush = Some(match self.pending_flush {
                Some((s, e)) => (s.min(start), e.max(end)),
                None => (start, end),
            });
        } else {
            self.flush_now(self.range_flush(start, end));
        }
    }

    /// Ends an operation: the batched flush, if any — widened to the tables the operation
    /// unlinked and no flush covered yet (they may be reused only after one).
    pub fn finish_op(&mut self) {
        if let Some((start, end)) = self.tables_awaiting().filter(|_| self.session.is_some()) {
            let (start, end) = (start.iova(), end.iova());
            self.pending_flush = Some(match self.pending_flush {
                Some((s, e)) => (s.min(start), e.max(end)),
                None => (start, end),
            });
        }
        if let Some((start, end)) = self.pending_flush.take() {
            self.flush_now(self.range_flush(start, end));
        }
    }

    /// Points the IOMMU at table `pa` and flushes the whole domain (which covers any range
    /// flush pending in this operation).
    fn switch_iommu_table(&mut self, pa: Option<Hpa>) {
        let out = self.iommu.switch_root(pa);
        self.clock.charge(out.cost_ns);
        self.totals.flush_ns += out.cost_ns;
        self.emit(EventKind::IotlbFlush {
            scope: FlushScope::Domain,
            domain: Some(u32::from(self.iommu.domain_id())),
            range: None,
            ns: out.cost_ns,
        });
        self.pending_flush = None;
        self.release_unlinked(None);
    }

    /// The root-update notification: the IOMMU walks `root` from now on.
    pub(crate) fn notify_root(&mut self, root: RootId, pa: Hpa, cause: RootCause) {
        let level = self.iommu.levels().get();
        self.emit(EventKind::RootSwitch(RootEvent {
            root: root.0,
            level,
            smm: false,
            cause,
        }));
        self.switch_iommu_table(Some(pa));
    }

    // ---- sharing on / off ----------------------------------------------------------------

    /// Requests sharing with an IOMMU of capabilities `iommu`: the handshake, then pinning,
    /// pre-population and the switch of the IOMMU to the shared (or separate) table.
    pub fn request_sharing(&mut self, iommu: &IommuCaps) -> Result<u64, SharingError> {
        if self.session.is_some() {
            return Err(SharingError::State("sharing is already on"));
        }
        let mode = self.policy.mode;
        self.emit(EventKind::SharingRequested { mode });
        let shared = match handshake::check(&self.policy, &self.vm, iommu) {
            Ok(s) => s,
            Err(refusal) => {
                self.emit(EventKind::SharingRefused {
                    mode,
                    reason: refusal.to_string(),
                });
                return Err(SharingError::Refused(refusal));
            }
        };
        let handle = self.next_handle;
        self.next_handle += 1;
        self.session = Some(Session { shared });
        if let Err(e) = self.start_session(shared) {
            // Leave nothing half-done: back to the IOMMU's own table, pins released.
            let _ = self.stop_sharing();
            return Err(e);
        }
        self.emit(EventKind::SharingStarted { mode, handle });
        self.finish_op();
        Ok(handle)
    }

    fn start_session(&mut self, shared: Shared) -> Result<(), SharingError> {
        let (root, pa) = if self.policy.shares_cpu_root {
            self.cpu.set_max_leaf_level(shared.max_huge_level);
            // The IOMMU walks the vCPUs' tables from now on: unlinked tables wait for its
            // invalidation before reuse.
            self.cpu.set_defer_free(true);
            // MMIO SPTEs cannot stay in a table an IOMMU walks (the kernel series gives the
            // IOMMU a fresh root instead: the same for the device).
            if !self.cpu.format().layout.mmio_while_walked() {
                let roots: Vec<RootId> = self.cpu.roots().iter().map(|r| r.id).collect();
                for r in roots {
                    self.cpu.zap_mmio(r)?;
                }
            }
            // Leaves larger than the IOMMU accepts cannot stay in a table it walks.
            if let Some(r) = self.cpu_root {
                let big: Vec<_> = self
                    .cpu
                    .leaves(r)?
                    .into_iter()
                    .filter(|l| l.level > shared.max_huge_level)
                    .collect();
                for l in big {
                    self.cpu.zap(r, l.gfn, l.level.frames(), false)?;
                }
            }
            let root = match self.cpu_root {
                Some(r) => r,
                None => {
                    let r = self.alloc_cpu_root(RootRole::NORMAL, RootCause::Initial)?;
                    self.cpu_root = Some(r);
                    r
                }
            };
            self.iommu_root = Some(root);
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
            mmu.set_defer_free(true);
            let root = mmu.alloc_root(RootRole::NORMAL, RootCause::Initial)?;
            let pa = mmu.root(root)?.pa;
            self.separate = Some((mmu, root));
            (root, pa)
        };
        if self.policy.pins {
            let slots: Vec<Memslot> = self
                .vm
                .slots()
                .filter(|s| s.is_user_memory())
                .copied()
                .collect();
            for slot in slots {
                self.pin_slot(&slot)?;
            }
            self.prepopulate_all(PrepopCause::SharingStart)?;
        }
        // A separate table mirrors the private pages its policy lets DMA see.
        let policy = self.policy;
        let private: Vec<Memslot> = self
            .vm
            .slots()
            .filter(|s| matches!(s.kind, SlotKind::Private(k) if k.visible_to_dma(&policy)))
            .copied()
            .collect();
        if let Some((mmu, root)) = self.separate.as_mut() {
            for slot in private {
                mmu.map(*root, &Self::private_mapping(&slot, LeafAttrs::default()))?;
            }
        }
        // The IOMMU's walker starts at the root's level.
        debug_assert_eq!(self.iommu.levels(), shared.format.levels);
        // An IOMMU that sets no dirty bits in KVM's entries cannot report what DMA wrote: every
        // pinned page counts as dirty.
        if self.policy.pins && !shared.iommu_ad && self.dirty_tracking == DirtyTracking::DirtyBits {
            self.dirty_tracking = DirtyTracking::ReportAllPinned;
        }
        self.notify_root(root, pa, RootCause::Initial);
        Ok(())
    }

    /// Stops sharing: the IOMMU goes back to its own table, every pin is released (counted),
    /// the separate table (if any) is freed. Returns the pages unpinned.
    pub fn stop_sharing(&mut self) -> Result<u64, SharingError> {
        if self.session.is_none() {
            return Err(SharingError::State("sharing is not on"));
        }
        self.switch_iommu_table(self.fallback_root);
        self.cpu.set_defer_free(false);
        if let Some(root) = self.iommu_root.take() {
            // A root KVM dropped that only the IOMMU still walked goes now.
            self.put_root(root, RootCause::Released)?;
        }
        if let Some((mut mmu, root)) = self.separate.take() {
            mmu.free_root(root, RootCause::Released)?;
        }
        let before = self.pinner.pinned_pages();
        let slots: Vec<Memslot> = core::mem::take(&mut self.pinned).into_values().collect();
        for slot in slots {
            if let Some(r) = self.cpu_root.filter(|_| self.policy.shares_cpu_root) {
                self.cpu.set_pinned(r, slot.gfn(), slot.frames(), false)?;
            }
            self.release_pins(&slot);
        }
        let unpinned = before - self.pinner.pinned_pages();
        self.session = None;
        self.emit(EventKind::SharingStopped {
            mode: self.policy.mode,
            unpinned,
        });
        Ok(unpinned)
    }

    // ---- pinning -------------------------------------------------------------------------

    /// Pins `slot` for DMA. Pinning faults pages in and may sleep: never under `mmu_lock`.
    pub(crate) fn pin_slot(&mut self, slot: &Memslot) -> Result<(), SharingError> {
        if self.lock_held {
            return Err(SharingError::State(
                "pinning may sleep and must not run under mmu_lock",
            ));
        }
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

    /// Releases the pins of `slot`, which must already be out of `pinned` and out of every
    /// table the IOMMU can reach (flushed).
    pub(crate) fn release_pins(&mut self, slot: &Memslot) {
        let ns = self.pinner.unpin(slot);
        self.clock.charge(ns);
        self.totals.pin_ns += ns;
        self.emit(EventKind::Unpin {
            range: slot.range(),
            pages: slot.frames(),
        });
    }

    /// The tables of every root that exists (both MMUs).
    pub fn live_roots(&self) -> impl Iterator<Item = Hpa> + '_ {
        let separate = self.separate.iter().flat_map(|(mmu, _)| mmu.roots());
        self.cpu.roots().iter().chain(separate).map(|r| r.pa)
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
            census[usize::from(l.level.get()) - 1] += 1;
        }
        Some(census)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::decision::addr::Gpa;
    use crate::event::clock::{ManualClock, MonotonicClock};
    use crate::iommu::{CostModel, DmaWalker, IommuDomain, Iotlb};
    use crate::sharing::pin::{ModelledPinner, PinCostModel};
    use crate::sim::{SharedSink, SimPlatform};
    use crate::table::page_alloc::Arena;
    use alloc::boxed::Box;

    #[test]
    fn pinning_is_refused_under_mmu_lock() {
        let arena = Arena::new(64).unwrap();
        let iotlb = Iotlb::new(16, CostModel::default());
        let domain = IommuDomain::new(1, DmaWalker::native(&crate::PteFormat::EPT4, true), &iotlb);
        let clock = ManualClock::new(0);
        let parts: Parts<SimPlatform<'_>> = Parts {
            alloc: &arena,
            iommu: &domain,
            pinner: Box::new(ModelledPinner::new(PinCostModel::default(), true)),
            sink: SharedSink::default(),
            clock: &clock,
            timer: MonotonicClock::new(),
        };
        let scenario =
            crate::sim::Scenario::parse(std::path::Path::new("t.toml"), "name = \"t\"\n").unwrap();
        let vm = Vm::new(1, scenario.vm.config(), 1);
        let mut engine = SharingVm::new(vm, ShareMode::Optimized, None, parts);
        let slot = Memslot {
            id: 0,
            as_id: 0,
            gpa: Gpa(0),
            size: 2 << 20,
            flags: 0,
            hpa: Hpa(0x40_0000_0000),
            kind: SlotKind::User,
        };
        engine.lock_held = true;
        assert_eq!(
            engine.pin_slot(&slot),
            Err(SharingError::State(
                "pinning may sleep and must not run under mmu_lock"
            ))
        );
        assert_eq!(engine.pinner.pinned_pages(), 0);
        engine.lock_held = false;
        engine.pin_slot(&slot).unwrap();
        assert_eq!(engine.pinner.pinned_pages(), 512);
    }
}
