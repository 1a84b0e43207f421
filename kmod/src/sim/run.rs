//! Running a scenario in one mode.

use crate::decision::addr::Level;
use crate::decision::caps::IommuCaps;
use crate::decision::policy::{DirtyTracking, ShareMode};
use crate::event::clock::{Clock, ManualClock, MonotonicClock};
use crate::event::stats::VmStats;
use crate::event::{Event, VmId};
use crate::iommu::domain::IommuDomain;
use crate::iommu::iotlb::{CostModel, Iotlb};
use crate::iommu::walker::DmaWalker;
use crate::sharing::engine::{SharingError, SharingVm, Totals};
use crate::sharing::handshake;
use crate::sharing::pin::{CostSource, ModelledPinner, PinCostModel, Pinner, RealMemoryPinner};
use crate::sharing::platform::{Parts, Platform};
use crate::sharing::vm::{Memslot, MmioRange, SlotKind, Vm};
use crate::sim::machine::{DeviceTotals, Machine};
use crate::sim::platform::{SharedSink, SimPlatform};
use crate::sim::scenario::{Action, Scenario, Step};
use crate::table::page_alloc::{Arena, PageAllocator};

/// How to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Back guest memory with a real anonymous mapping and pin with `mlock` (measured costs).
    pub real_memory: bool,
    /// After every step, DMA-check every pinned slot (zero faults required).
    pub verify_dma: bool,
    /// Override the scenario's dirty tracking.
    pub dirty_tracking: Option<DirtyTracking>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("scenario {scenario}: {what}")]
    Setup { scenario: String, what: String },
    #[error("scenario {scenario}, mode {mode}, timeline step {step} at {at_us} us ({action})")]
    Step {
        scenario: String,
        mode: ShareMode,
        step: usize,
        at_us: u64,
        action: &'static str,
        #[source]
        source: Box<SharingError>,
    },
}

/// The result of one mode's run.
#[derive(Debug, Clone)]
pub struct ModeRun {
    pub mode: ShareMode,
    pub vm: VmId,
    pub events: Vec<Event>,
    pub stats: VmStats,
    /// The engine's figures.
    pub totals: Totals,
    /// What the simulated device's DMA met.
    pub device: DeviceTotals,
    /// Page-table pages: most at once, and at the end.
    pub table_pages_peak: u64,
    pub table_pages_end: u64,
    pub pinned_pages_peak: u64,
    /// Pinned when the scenario ended (0 after a `share_stop`).
    pub pinned_pages_end: u64,
    pub pin_cost: CostSource,
    /// Why sharing was refused, when it was.
    pub refusals: Vec<String>,
    /// Leaves of the IOMMU's table by size (4K, 2M, 1G) at the last moment sharing was on.
    pub iommu_leaves: Option<[u64; 3]>,
    /// Simulated duration: the last step's time plus the costs charged.
    pub duration_ns: u64,
}

/// Table pages the arena can hold: enough for 4 KiB leaves over 64 GiB twice.
const ARENA_PAGES: usize = 1 << 16;

/// Runs `scenario` in `mode`; events carry VM id `vm`.
pub fn run_mode(
    scenario: &Scenario,
    share_mode: ShareMode,
    vm_id: VmId,
    opts: RunOptions,
) -> Result<ModeRun, SimError> {
    let setup = |what: String| SimError::Setup {
        scenario: scenario.name.clone(),
        what,
    };
    let config = scenario.vm.config();
    let caps = scenario.iommu.caps();
    let arena =
        Arena::new(ARENA_PAGES).ok_or_else(|| setup("cannot reserve table memory".into()))?;
    let iotlb = Iotlb::new(scenario.iommu.iotlb_entries, CostModel::default());
    // The IOMMU walks KVM's root by its own rules; its A/D tracking stays off where its bits
    // are not KVM's (the handshake says).
    let probe = Vm::new(vm_id, config, scenario.vm.vcpus);
    let (levels, iommu_ad) = match handshake::check(&share_mode.policy(), &probe, &caps) {
        Ok(s) => (s.format.levels, s.iommu_ad),
        Err(_) => (Level::new(config.kvm.levels).unwrap_or(Level::L4), false),
    };
    let walker = DmaWalker {
        rules: IommuCaps {
            dirty_tracking: iommu_ad,
            ..caps
        }
        .format(),
        levels,
        max_leaf_level: caps.max_leaf_level(),
    };
    let domain = IommuDomain::new(1, walker, &iotlb);
    // The IOMMU's own (empty) table before sharing and after it stops.
    let fallback = arena
        .alloc_table(0)
        .ok_or_else(|| setup("cannot allocate the fallback table".into()))?;
    let pinner: Box<dyn Pinner> = if opts.real_memory {
        Box::new(RealMemoryPinner::new())
    } else {
        Box::new(ModelledPinner::new(
            PinCostModel::default(),
            config.huge_pages,
        ))
    };
    let pin_cost = pinner.cost_source();
    let sink = SharedSink::default();
    let clock = ManualClock::new(0);
    let parts: Parts<SimPlatform<'_>> = Parts {
        alloc: &arena,
        iommu: &domain,
        pinner,
        sink: sink.clone(),
        clock: &clock,
        timer: MonotonicClock::new(),
    };
    let vm = Vm::new(vm_id, config, scenario.vm.vcpus);
    let engine = SharingVm::new(vm, share_mode, Some(fallback), parts);
    let mut machine = Machine::new(engine, &domain);
    let dirty = opts.dirty_tracking.or(scenario.sharing.dirty_tracking);
    let mut refusals = Vec::new();
    let mut pinned_peak = 0;
    let mut pages_peak = 0;
    let mut iommu_leaves = None;
    for (i, step) in scenario.timeline.iter().enumerate() {
        if clock.now_ns() < step.at_us * 1000 {
            clock.set(step.at_us * 1000);
        }
        let result = match step.action {
            // Stopping what a refusal never started changes nothing.
            Action::ShareStop if !machine.engine.is_sharing() && !refusals.is_empty() => Ok(()),
            _ => apply(&mut machine, step, &caps, dirty),
        };
        match result {
            Ok(()) => {}
            Err(SharingError::Refused(refusal)) => refusals.push(refusal.to_string()),
            Err(source) => {
                return Err(SimError::Step {
                    scenario: scenario.name.clone(),
                    mode: share_mode,
                    step: i + 1,
                    at_us: step.at_us,
                    action: step.action.name(),
                    source: Box::new(source),
                });
            }
        }
        if opts.verify_dma {
            machine.verify_pinned_dma();
        }
        pinned_peak = pinned_peak.max(machine.engine.pinner().pinned_pages());
        pages_peak = pages_peak.max(arena.pages_in_use());
        if machine.engine.is_sharing() {
            iommu_leaves = machine.engine.iommu_leaf_census();
        }
    }
    let events = sink.take();
    let mut stats = VmStats::default();
    for e in &events {
        stats.record(e);
    }
    Ok(ModeRun {
        mode: share_mode,
        vm: vm_id,
        events,
        stats,
        totals: machine.engine.totals,
        device: machine.device,
        table_pages_peak: pages_peak.max(arena.peak_pages()),
        table_pages_end: arena.pages_in_use(),
        pinned_pages_peak: pinned_peak,
        pinned_pages_end: machine.engine.pinner().pinned_pages(),
        pin_cost,
        refusals,
        iommu_leaves,
        duration_ns: clock.now_ns(),
    })
}

fn apply<P: Platform>(
    m: &mut Machine<'_, P>,
    step: &Step,
    caps: &IommuCaps,
    dirty: Option<DirtyTracking>,
) -> Result<(), SharingError> {
    let engine = &mut m.engine;
    match step.action {
        Action::ShareStart => {
            engine.request_sharing(caps)?;
            if let Some(d) = dirty {
                engine.set_dirty_tracking(d)?;
            }
            Ok(())
        }
        Action::ShareStop => engine.stop_sharing().map(|_| ()),
        Action::MemslotAdd {
            slot,
            as_id,
            gpa,
            size,
            flags,
            hpa,
        } => engine.add_slot(Memslot {
            id: slot,
            as_id,
            gpa,
            size,
            flags,
            hpa,
            kind: SlotKind::User,
        }),
        Action::MemslotDelete { slot, as_id } => engine.delete_slot(as_id, slot),
        Action::MemslotMove { slot, as_id, gpa } => engine.move_slot(as_id, slot, gpa),
        Action::MemslotFlags { slot, as_id, flags } => engine.set_slot_flags(as_id, slot, flags),
        Action::PrivateSlot { kind, gpa, hpa } => engine.add_private_slot(kind, gpa, hpa),
        Action::Mmio { gpa, size, hpa } => engine.add_mmio(MmioRange { gpa, size, hpa }),
        Action::Smm { vcpu, enter } => engine.smm(vcpu, enter),
        Action::Cr { vcpu, cr, value } => engine.cr_write(vcpu, cr, value),
        Action::DirtyHarvest { slot, as_id } => engine.get_dirty_log(as_id, slot).map(|_| ()),
        Action::Touch {
            vcpu,
            gpa,
            size,
            write,
        } => m.touch(vcpu, gpa, size, write),
        Action::Dma {
            iova,
            size,
            write,
            stride,
        } => m.dma(iova, size, write, stride),
    }
}
