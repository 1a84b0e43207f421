//! Model and kernel side by side: what the lab did becomes a simulator scenario (the same
//! memslot calls, the same start of sharing, touches and DMA), the simulator runs it in the mode
//! the kernel implements, and the counts that matter are compared with the ones the probes
//! recorded from the kernel.

use std::path::Path;

use anyhow::Context;
use tdpshare::decision::format::Layout;
use tdpshare::decision::kvm::KvmKernel;
use tdpshare::event::{Event, EventKind};
use tdpshare::sim::scenario::{IommuSpec, SharingSpec, VmSpec};
use tdpshare::sim::{Action, IommuKind, RunOptions, Scenario, Step, run_mode};
use tdpshare::{Kind, ShareMode, VmId};

/// The lab's actions in order, as scenario steps 1 ms apart (the order is what matters).
#[derive(Debug, Default, Clone)]
pub struct ActionLog {
    steps: Vec<Step>,
}

impl ActionLog {
    pub fn push(&mut self, action: Action) {
        let at_us = (self.steps.len() as u64 + 1) * 1000;
        self.steps.push(Step { at_us, action });
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// What the scenario says about the machine.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    /// The VT-d runs in scalable mode.
    pub scalable: bool,
    pub snoop_control: bool,
    /// Host memory comes in huge pages (THP on in the L1).
    pub huge_pages: bool,
    /// The largest leaf KVM may use while an IOMMU walks (the grant's).
    pub max_huge_level: u8,
}

/// The scenario of `log` on `machine`, in the mode KVM implements (pinned, persistent root:
/// `optimized`), on 6.12's KVM with the sharing SPTE layout.
pub fn scenario(log: &ActionLog, machine: Machine) -> anyhow::Result<Scenario> {
    let s = Scenario {
        name: "lab".into(),
        description: "what tdpshare-lab did in the L1, step by step".into(),
        vm: VmSpec {
            vcpus: 1,
            huge_pages: machine.huge_pages,
            format: Kind::Npt,
            levels: 4,
            max_huge_level: machine.max_huge_level.max(1),
            spte_layout: Layout::Sharing,
            kernel: KvmKernel::V6_12,
            ..VmSpec::default()
        },
        iommu: IommuSpec {
            kind: IommuKind::QemuVtd,
            levels: vec![4],
            scalable: machine.scalable,
            snoop_control: machine.snoop_control,
            ..IommuSpec::default()
        },
        sharing: SharingSpec {
            modes: vec![ShareMode::Optimized],
            dirty_tracking: None,
        },
        timeline: log.steps.clone(),
    };
    // Through the text, so the scenario is checked as a file would be (and is one).
    Scenario::parse(Path::new("lab-scenario.toml"), &s.to_toml()).context("the lab's scenario")
}

/// The figures compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Roots allocated for address space 0.
    pub roots: u64,
    /// Pre-populations of all pinned memory.
    pub full_prepopulations: u64,
    /// Leaf entries written by pre-population (all causes).
    pub prepop_entries: u64,
    /// Memslot deletions and moves followed by an IOTLB invalidation.
    pub flushed_deletions: u64,
    /// IOTLB invalidations, all of them.
    pub iotlb_flushes: u64,
}

/// Memslot deletions and moves in `events` that an IOTLB flush followed before the next
/// memslot call: whether each invalidation reached the IOMMU, however many flushes it took.
fn flushed_deletions<'a>(events: impl Iterator<Item = &'a Event>) -> u64 {
    let mut pending = false;
    let mut n = 0;
    for e in events {
        match &e.kind {
            EventKind::MemslotDelete(_) | EventKind::MemslotMove { .. } => pending = true,
            EventKind::MemslotAdd(_) | EventKind::MemslotFlags { .. } => pending = false,
            EventKind::IotlbFlush { .. } if pending => {
                n += 1;
                pending = false;
            }
            _ => {}
        }
    }
    n
}

/// The kernel's counts from the recorded events of `vm`. The kernel has no notion of a
/// "full" pre-population: each root the IOMMU is pointed at (`tdpshare:root_update`) is one,
/// since the VMM then pre-faults all pinned memory into it.
pub fn kernel_counts(events: &[Event], vm: VmId) -> Counts {
    // A memslot call's event is stamped with the ioctl's start but recorded at its end, after
    // the flushes it caused: in time order each deletion precedes its own flushes.
    let mut in_time: Vec<&Event> = events.iter().filter(|e| e.vm == vm).collect();
    in_time.sort_by_key(|e| e.ts_ns);
    let mut c = Counts {
        flushed_deletions: flushed_deletions(in_time.into_iter()),
        ..Counts::default()
    };
    for e in events.iter().filter(|e| e.vm == vm) {
        match &e.kind {
            EventKind::RootAlloc(r) if !r.smm => c.roots += 1,
            EventKind::RootSwitch(_) => c.full_prepopulations += 1,
            EventKind::PrepopulateEnd { entries, .. } => c.prepop_entries += entries,
            EventKind::IotlbFlush { .. } => c.iotlb_flushes += 1,
            _ => {}
        }
    }
    c
}

/// The simulator's counts for `scenario` in its (one) mode.
pub fn model_counts(scenario: &Scenario) -> anyhow::Result<Counts> {
    let run = run_mode(scenario, ShareMode::Optimized, 1, RunOptions::default())
        .context("the simulator on the lab's scenario")?;
    let roots = run
        .events
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::RootAlloc(r) if !r.smm))
        .count() as u64;
    Ok(Counts {
        roots,
        full_prepopulations: run.stats.full_prepopulations,
        prepop_entries: run.stats.prepop_entries,
        flushed_deletions: flushed_deletions(run.events.iter()),
        iotlb_flushes: run.stats.iotlb_flushes,
    })
}

/// One figure: name, kernel, model, and — for a figure the two count differently by design —
/// why they may differ (`None`: they must agree).
pub type Row = (&'static str, u64, u64, Option<&'static str>);

/// The figures side by side.
pub fn rows(kernel: Counts, model: Counts) -> [Row; 5] {
    [
        ("roots", kernel.roots, model.roots, None),
        (
            "full pre-populations",
            kernel.full_prepopulations,
            model.full_prepopulations,
            None,
        ),
        (
            "pre-populated entries",
            kernel.prepop_entries,
            model.prepop_entries,
            None,
        ),
        (
            "deletions flushed",
            kernel.flushed_deletions,
            model.flushed_deletions,
            None,
        ),
        (
            "IOTLB flushes",
            kernel.iotlb_flushes,
            model.iotlb_flushes,
            Some(
                "KVM's slot zap flushes the whole domain each time it yields the CPU \
                 (tdp_mmu_iter_cond_resched), so a deletion costs one flush or hundreds \
                 depending on scheduling; the model flushes once per deletion, and once when \
                 the device leaves the IOMMU's own table at sharing start",
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdpshare::event::{GpaRange, PageSize, PrepopCause, Root, RootCause, Source};
    use tdpshare::{Gpa, Hpa};

    fn log() -> ActionLog {
        let mut log = ActionLog::default();
        log.push(Action::MemslotAdd {
            slot: 0,
            as_id: 0,
            gpa: Gpa(0),
            size: 4 << 20,
            flags: 0,
            hpa: Hpa(0x7f00_0000_0000),
        });
        log.push(Action::ShareStart);
        log.push(Action::MemslotAdd {
            slot: 1,
            as_id: 0,
            gpa: Gpa(0x1000_0000),
            size: 2 << 20,
            flags: 0,
            hpa: Hpa(0x7e00_0000_0000),
        });
        log.push(Action::MemslotDelete { slot: 1, as_id: 0 });
        log.push(Action::Dma {
            iova: tdpshare::Iova(0x10_0000),
            size: 4000,
            write: true,
            stride: 4096,
        });
        log.push(Action::ShareStop);
        log
    }

    #[test]
    fn the_model_keeps_one_root_and_prepopulates_once_in_full() {
        let machine = Machine {
            scalable: true,
            snoop_control: true,
            huge_pages: false,
            max_huge_level: 3,
        };
        let s = scenario(&log(), machine).unwrap();
        assert_eq!(s.timeline.len(), 6);
        let m = model_counts(&s).unwrap();
        assert_eq!(m.roots, 1, "{m:?}");
        assert_eq!(m.full_prepopulations, 1);
        // 4 MiB at sharing start and 2 MiB for the added slot, in 4 KiB leaves.
        assert_eq!(m.prepop_entries, 1024 + 512);
        assert!(
            m.iotlb_flushes >= 1,
            "the slot's deletion is flushed: {m:?}"
        );
        assert_eq!(m.flushed_deletions, 1, "{m:?}");
    }

    #[test]
    fn kernel_counts_come_from_the_vm_s_events() {
        let ev = |vm, kind| Event::new(0, vm, Source::Live, kind);
        let root = Root {
            root: 0x1000,
            level: 4,
            smm: false,
            cause: RootCause::Unknown,
        };
        let events = vec![
            ev(7, EventKind::RootAlloc(root)),
            ev(7, EventKind::RootAlloc(Root { smm: true, ..root })),
            ev(8, EventKind::RootAlloc(root)),
            ev(
                7,
                EventKind::RootSwitch(Root {
                    cause: RootCause::Initial,
                    ..root
                }),
            ),
            ev(
                7,
                EventKind::PrepopulateEnd {
                    range: GpaRange::new(Gpa(0), 8192),
                    page_size: PageSize::Size4K,
                    cause: PrepopCause::PreFault,
                    entries: 2,
                    leaves: None,
                    ns: 1,
                },
            ),
        ];
        assert_eq!(
            kernel_counts(&events, 7),
            Counts {
                roots: 1,
                full_prepopulations: 1,
                prepop_entries: 2,
                flushed_deletions: 0,
                iotlb_flushes: 0,
            }
        );
    }

    #[test]
    fn a_deletion_s_flushes_count_though_recorded_before_it() {
        use tdpshare::event::{FlushScope, Memslot};
        let at = |ts, kind| Event::new(ts, 7, Source::Live, kind);
        let slot = Memslot {
            slot: 1,
            as_id: 0,
            gpa: Gpa(0),
            size: 4096,
            flags: 0,
            ua: 0,
        };
        let flush = EventKind::IotlbFlush {
            scope: FlushScope::Domain,
            domain: None,
            range: None,
            ns: 1,
        };
        // The ioctl (100..200) is recorded when it returns, after the flush (150) it caused.
        let events = vec![
            at(150, flush),
            at(100, EventKind::MemslotDelete(slot)),
            at(300, EventKind::MemslotAdd(slot)),
        ];
        assert_eq!(kernel_counts(&events, 7).flushed_deletions, 1);
    }
}
