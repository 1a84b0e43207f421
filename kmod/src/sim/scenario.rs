//! Scenario files: a VM, its IOMMU, the modes to compare, and a timeline.
//!
//! ```toml
//! name = "small"
//! [vm]
//! vcpus = 2
//! huge_pages = true
//! [iommu]
//! kind = "vtd"
//! [[timeline]]
//! at_us = 0
//! do = "share_start"
//! [[timeline]]
//! at_us = 10
//! do = "memslot_add"
//! slot = 0
//! gpa = 0x0
//! size = 0x40000000
//! hpa = 0x7f0000000000
//! ```
//!
//! Every field but `name` has a default (the `Default` impls below are the one place they are
//! written); unknown fields and unknown names are errors. A scenario that could not run — steps
//! out of order, a vCPU the VM does not have, a slot deleted before it was added, an unaligned
//! slot — is refused when it is loaded, with the file's line and column, not when the engine
//! meets it. A scenario can also be made from a recorded trace ([`Scenario::from_events`]).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::decision::addr::{Gpa, Hpa, Iova, PAGE_MASK};
use crate::decision::caps::{IommuCaps, KvmCaps};
use crate::decision::format::{Kind, Layout};
use crate::decision::iommu::IommuMode;
use crate::decision::kvm::KvmKernel;
use crate::decision::policy::{DirtyTracking, ShareMode};
use crate::decision::prereq::VIommu;
use crate::event::{Event, EventKind, VmId};
use crate::sharing::vm::{PrivateKind, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("scenario {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("scenario {path}{at}: {what}")]
    Invalid {
        path: PathBuf,
        /// `:LINE:COLUMN` of the offending step, when the scenario came from a file.
        at: Location,
        what: String,
    },
    #[error("cannot read trace {path}")]
    Trace {
        path: PathBuf,
        #[source]
        source: crate::event::trace::TraceError,
    },
}

/// A place in a scenario file (1-based), or nowhere (a scenario made from a trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Location(pub Option<(usize, usize)>);

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, ":{line}:{column}"),
            None => Ok(()),
        }
    }
}

/// The VM and what KVM uses for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmSpec {
    pub vcpus: u32,
    /// Host memory in huge pages (THP / hugetlbfs).
    pub huge_pages: bool,
    pub tdp: bool,
    pub nested_tdp_exposed: bool,
    pub viommu: VIommu,
    pub format: Kind,
    pub levels: u8,
    pub max_huge_level: u8,
    /// KVM's SPTE layout: `sharing` (a kernel with the series) or `stock` (6.12 as shipped).
    pub spte_layout: Layout,
    /// The host's KVM generation: `6.12` (default) or `pre-6.4` (roots freed when the last vCPU
    /// unloads them; `--kernel` of the simulator overrides it).
    pub kernel: KvmKernel,
    pub device_iopf: bool,
    pub noncoherent_dma: bool,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            vcpus: 2,
            huge_pages: true,
            tdp: true,
            nested_tdp_exposed: false,
            viommu: VIommu::None,
            format: Kind::Ept,
            levels: 4,
            max_huge_level: 3,
            spte_layout: Layout::Sharing,
            kernel: KvmKernel::V6_12,
            device_iopf: false,
            noncoherent_dma: false,
        }
    }
}

impl VmSpec {
    pub fn config(&self) -> VmConfig {
        VmConfig {
            tdp: self.tdp,
            nested_tdp_exposed: self.nested_tdp_exposed,
            viommu: self.viommu,
            kvm: KvmCaps {
                kind: self.format,
                levels: self.levels,
                max_huge_level: self.max_huge_level,
                layout: self.spte_layout,
            },
            huge_pages: self.huge_pages,
            device_iopf: self.device_iopf,
            noncoherent_dma: self.noncoherent_dma,
            kernel: self.kernel,
        }
    }
}

/// The IOMMU hardware a scenario has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IommuKind {
    /// Intel VT-d, second-level (EPT-format) translation.
    Vtd,
    /// AMD IOMMU walking x86-64 (NPT-format) tables (v2).
    Amd,
    /// QEMU 7.2's emulated VT-d (the lab): 4 levels, no A/D, no page requests; walks NPT too.
    QemuVtd,
}

/// The IOMMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IommuSpec {
    pub kind: IommuKind,
    pub levels: Vec<u8>,
    /// VT-d: scalable mode (else legacy mode).
    pub scalable: bool,
    /// Host address width in bits (default: the kind's own).
    pub address_width: Option<u8>,
    pub superpage_2m: bool,
    pub superpage_1g: bool,
    pub snoop_control: bool,
    pub coherent_walk: bool,
    /// It sets A/D bits (VT-d: scalable mode only).
    pub dirty_tracking: bool,
    /// It takes page requests (VT-d: scalable mode only).
    pub page_requests: bool,
    pub iotlb_entries: usize,
}

impl Default for IommuSpec {
    fn default() -> Self {
        Self {
            kind: IommuKind::Vtd,
            levels: vec![4, 5],
            scalable: true,
            address_width: None,
            superpage_2m: true,
            superpage_1g: true,
            snoop_control: true,
            coherent_walk: true,
            dirty_tracking: true,
            page_requests: true,
            iotlb_entries: 4096,
        }
    }
}

impl IommuSpec {
    pub fn caps(&self) -> IommuCaps {
        let mut caps = match self.kind {
            IommuKind::Vtd => IommuCaps::vtd(&self.levels, self.superpage_1g),
            IommuKind::Amd => IommuCaps::amd_v2(&self.levels),
            IommuKind::QemuVtd => IommuCaps::qemu_vtd(self.scalable, self.snoop_control),
        };
        if caps.mode.is_vtd() {
            caps.mode = if self.scalable {
                IommuMode::VtdScalable
            } else {
                IommuMode::VtdLegacy
            };
        }
        if let Some(aw) = self.address_width {
            caps.address_width = aw;
        }
        caps.superpage_2m = self.superpage_2m;
        caps.superpage_1g = self.superpage_1g;
        caps.snoop_control = self.snoop_control;
        caps.coherent_walk = self.coherent_walk;
        if self.kind != IommuKind::QemuVtd {
            caps.dirty_tracking = self.dirty_tracking;
            caps.page_requests = self.page_requests;
        }
        caps
    }
}

/// Which modes to run and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SharingSpec {
    pub modes: Vec<ShareMode>,
    /// Dirty tracking while sharing; default: dirty bits for pinning modes, write-protection
    /// with IO page faults.
    pub dirty_tracking: Option<DirtyTracking>,
}

impl Default for SharingSpec {
    fn default() -> Self {
        Self {
            modes: ShareMode::ALL.to_vec(),
            dirty_tracking: None,
        }
    }
}

/// Something that happens at a point of the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// The VMM asks for sharing (the device is assigned).
    ShareStart,
    ShareStop,
    MemslotAdd {
        slot: u16,
        #[serde(default)]
        as_id: u8,
        gpa: Gpa,
        size: u64,
        #[serde(default)]
        flags: u32,
        /// The host memory behind the slot (the VMM's userspace address).
        hpa: Hpa,
    },
    MemslotDelete {
        slot: u16,
        #[serde(default)]
        as_id: u8,
    },
    MemslotMove {
        slot: u16,
        #[serde(default)]
        as_id: u8,
        gpa: Gpa,
    },
    MemslotFlags {
        slot: u16,
        #[serde(default)]
        as_id: u8,
        flags: u32,
    },
    /// KVM creates one of its private slots.
    PrivateSlot {
        kind: PrivateKind,
        gpa: Gpa,
        hpa: Hpa,
    },
    /// A peer device's BAR appears in the guest (P2P DMA target).
    Mmio {
        gpa: Gpa,
        size: u64,
        hpa: Hpa,
    },
    /// A vCPU reads or writes guest memory.
    Touch {
        #[serde(default)]
        vcpu: u32,
        gpa: Gpa,
        size: u64,
        #[serde(default)]
        write: bool,
    },
    /// A vCPU enters (SMI) or leaves (RSM) SMM.
    Smm {
        #[serde(default)]
        vcpu: u32,
        enter: bool,
    },
    /// A vCPU writes CR0 or CR4 (`cr` = 0 or 4); without `value`, a write whose value the
    /// recording did not see, taken as a change of the MMU-role bits (an upper bound).
    Cr {
        #[serde(default)]
        vcpu: u32,
        cr: u8,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<u64>,
    },
    /// The device does DMA, one access per `stride` bytes.
    Dma {
        iova: Iova,
        size: u64,
        #[serde(default)]
        write: bool,
        #[serde(default = "Action::page")]
        stride: u64,
    },
    /// `KVM_GET_DIRTY_LOG` of a slot.
    DirtyHarvest {
        slot: u16,
        #[serde(default)]
        as_id: u8,
    },
}

impl Action {
    /// The default DMA stride: one access per 4 KiB page.
    const fn page() -> u64 {
        crate::decision::addr::PAGE_SIZE
    }

    /// The step's name, as its `do` field spells it.
    pub const fn name(&self) -> &'static str {
        match self {
            Action::ShareStart => "share_start",
            Action::ShareStop => "share_stop",
            Action::MemslotAdd { .. } => "memslot_add",
            Action::MemslotDelete { .. } => "memslot_delete",
            Action::MemslotMove { .. } => "memslot_move",
            Action::MemslotFlags { .. } => "memslot_flags",
            Action::PrivateSlot { .. } => "private_slot",
            Action::Mmio { .. } => "mmio",
            Action::Touch { .. } => "touch",
            Action::Smm { .. } => "smm",
            Action::Cr { .. } => "cr",
            Action::Dma { .. } => "dma",
            Action::DirtyHarvest { .. } => "dirty_harvest",
        }
    }
}

/// One timeline entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Microseconds since the scenario's start.
    pub at_us: u64,
    #[serde(flatten)]
    pub action: Action,
}

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub vm: VmSpec,
    #[serde(default)]
    pub iommu: IommuSpec,
    #[serde(default)]
    pub sharing: SharingSpec,
    #[serde(default)]
    pub timeline: Vec<Step>,
}

/// Where each timeline step of a scenario file starts (byte offsets), read only when a step
/// turns out to be invalid.
#[derive(Deserialize)]
struct StepSpans {
    #[serde(default)]
    timeline: Vec<toml::Spanned<toml::Table>>,
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// A mistake in step `index` (0-based) of the timeline.
#[derive(Debug)]
struct StepMistake {
    index: Option<usize>,
    what: String,
}

impl Scenario {
    /// Parses the text of a scenario file named `path` (for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|source| ScenarioError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        s.validate().map_err(|m| {
            let at = m.index.and_then(|i| {
                let spans: StepSpans = toml::from_str(text).ok()?;
                spans
                    .timeline
                    .get(i)
                    .map(|t| line_column(text, t.span().start))
            });
            ScenarioError::Invalid {
                path: path.to_path_buf(),
                at: Location(at),
                what: m.what,
            }
        })?;
        Ok(s)
    }

    /// Reads a scenario: a `.toml` file, or a recorded trace (`.jsonl`) turned into one.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        if path.extension().is_some_and(|e| e == "jsonl") {
            let trace = |source| ScenarioError::Trace {
                path: path.to_path_buf(),
                source,
            };
            let reader = crate::event::trace::TraceReader::open(path).map_err(trace)?;
            let events = reader.collect::<Result<Vec<_>, _>>().map_err(trace)?;
            let name = path
                .file_stem()
                .map_or_else(|| "trace".to_owned(), |s| s.to_string_lossy().into_owned());
            let s = Self::from_events(&name, None, &events);
            s.validate().map_err(|m| ScenarioError::Invalid {
                path: path.to_path_buf(),
                at: Location(None),
                what: m.what,
            })?;
            return Ok(s);
        }
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Checks that the scenario can run: every mistake a run would otherwise meet midway.
    fn validate(&self) -> Result<(), StepMistake> {
        let whole = |what: String| StepMistake { index: None, what };
        if self.sharing.modes.is_empty() {
            return Err(whole("sharing.modes is empty".into()));
        }
        if self.vm.max_huge_level == 0 {
            return Err(whole(
                "vm.max_huge_level is 0 (4 KiB leaves are level 1)".into(),
            ));
        }
        let mut last = 0;
        // The slots that exist before each step, as (as_id, slot).
        let mut slots = BTreeSet::new();
        for (i, step) in self.timeline.iter().enumerate() {
            let bad = |what: String| StepMistake {
                index: Some(i),
                what: format!("timeline step {} ({}): {what}", i + 1, step.action.name()),
            };
            if step.at_us < last {
                return Err(bad(format!(
                    "at {} us it comes before the previous step at {last} us",
                    step.at_us
                )));
            }
            last = step.at_us;
            let aligned = |what: &str, value: u64| {
                if value & PAGE_MASK == 0 {
                    Ok(())
                } else {
                    Err(bad(format!("{what} {value:#x} is not 4 KiB-aligned")))
                }
            };
            let exists = |slots: &BTreeSet<(u8, u16)>, as_id: u8, slot: u16| {
                if slots.contains(&(as_id, slot)) {
                    Ok(())
                } else {
                    Err(bad(format!(
                        "memslot {slot} of address space {as_id} does not exist at this point"
                    )))
                }
            };
            let vcpu_exists = |vcpu: u32| {
                if vcpu < self.vm.vcpus {
                    Ok(())
                } else {
                    Err(bad(format!(
                        "vCPU {vcpu} does not exist (the VM has {})",
                        self.vm.vcpus
                    )))
                }
            };
            match step.action {
                Action::MemslotAdd {
                    slot,
                    as_id,
                    gpa,
                    size,
                    hpa,
                    ..
                } => {
                    aligned("gpa", gpa.0)?;
                    aligned("hpa", hpa.0)?;
                    aligned("size", size)?;
                    if size == 0 {
                        return Err(bad("size is 0 (a deletion is memslot_delete)".into()));
                    }
                    if !slots.insert((as_id, slot)) {
                        return Err(bad(format!(
                            "memslot {slot} of address space {as_id} already exists"
                        )));
                    }
                }
                Action::MemslotDelete { slot, as_id } => {
                    exists(&slots, as_id, slot)?;
                    slots.remove(&(as_id, slot));
                }
                Action::MemslotMove { slot, as_id, gpa } => {
                    exists(&slots, as_id, slot)?;
                    aligned("gpa", gpa.0)?;
                }
                Action::MemslotFlags { slot, as_id, .. } | Action::DirtyHarvest { slot, as_id } => {
                    exists(&slots, as_id, slot)?
                }
                Action::PrivateSlot { kind, gpa, hpa } => {
                    aligned("gpa", gpa.0)?;
                    aligned("hpa", hpa.0)?;
                    slots.insert((0, kind.slot_and_pages().0));
                }
                Action::Mmio { gpa, size, hpa } => {
                    aligned("gpa", gpa.0)?;
                    aligned("hpa", hpa.0)?;
                    aligned("size", size)?;
                }
                Action::Touch { vcpu, .. } | Action::Smm { vcpu, .. } => vcpu_exists(vcpu)?,
                Action::Cr { vcpu, cr, .. } => {
                    vcpu_exists(vcpu)?;
                    if cr != 0 && cr != 4 {
                        return Err(bad(format!("cr{cr}: only CR0 and CR4 writes are modelled")));
                    }
                }
                Action::ShareStart | Action::ShareStop | Action::Dma { .. } => {}
            }
        }
        Ok(())
    }

    /// A scenario replaying what a trace recorded for VM `vm` (default: the first VM seen):
    /// memslot changes, vCPU page faults as touches, DMA mappings and IO page faults as DMA,
    /// sharing requests and stops. Sharing starts at the beginning when the trace never asked.
    /// Sharing the scenario started itself also stops at the end, as when the VMM exits and its
    /// VM is destroyed. Changes to slots the trace never saw added (made before recording
    /// began) are left out: they cannot be replayed.
    pub fn from_events(name: &str, vm: Option<VmId>, events: &[Event]) -> Self {
        let vm = vm.or_else(|| events.first().map(|e| e.vm));
        let mut timeline = Vec::new();
        let mut share_asked = false;
        let mut share_stopped = false;
        let mut slots = BTreeSet::new();
        for e in events.iter().filter(|e| Some(e.vm) == vm) {
            let at_us = e.ts_ns / 1000;
            let vcpu = e.vcpu.unwrap_or(0);
            let known = |slots: &BTreeSet<(u8, u16)>, s: &crate::event::Memslot| {
                slots.contains(&(s.as_id, s.slot))
            };
            let action = match &e.kind {
                EventKind::MemslotAdd(s) => {
                    slots.insert((s.as_id, s.slot));
                    Action::MemslotAdd {
                        slot: s.slot,
                        as_id: s.as_id,
                        gpa: s.gpa,
                        size: s.size,
                        flags: s.flags,
                        hpa: Hpa(if s.ua != 0 { s.ua } else { s.gpa.0 }),
                    }
                }
                EventKind::MemslotDelete(s) if known(&slots, s) => {
                    slots.remove(&(s.as_id, s.slot));
                    Action::MemslotDelete {
                        slot: s.slot,
                        as_id: s.as_id,
                    }
                }
                EventKind::MemslotMove { slot, .. } if known(&slots, slot) => Action::MemslotMove {
                    slot: slot.slot,
                    as_id: slot.as_id,
                    gpa: slot.gpa,
                },
                EventKind::MemslotFlags { slot, .. } if known(&slots, slot) => {
                    Action::MemslotFlags {
                        slot: slot.slot,
                        as_id: slot.as_id,
                        flags: slot.flags,
                    }
                }
                EventKind::PageFault { gfn, error_code } => Action::Touch {
                    vcpu,
                    gpa: gfn.gpa(),
                    size: 4096,
                    write: error_code & crate::sharing::faults::error_code::WRITE != 0,
                },
                EventKind::IommuMap { iova, size, .. } => Action::Dma {
                    iova: *iova,
                    size: *size,
                    write: true,
                    stride: 4096,
                },
                EventKind::IoPageFault { iova, write, .. } => Action::Dma {
                    iova: *iova,
                    size: 4096,
                    write: *write,
                    stride: 4096,
                },
                EventKind::SharingRequested { .. } => {
                    share_asked = true;
                    Action::ShareStart
                }
                EventKind::SharingStopped { .. } => {
                    share_stopped = true;
                    Action::ShareStop
                }
                EventKind::SmmTransition { enter } => Action::Smm {
                    vcpu,
                    enter: *enter,
                },
                EventKind::CrWrite { cr, value } if *cr == 0 || *cr == 4 => Action::Cr {
                    vcpu,
                    cr: *cr,
                    value: *value,
                },
                _ => continue,
            };
            timeline.push(Step { at_us, action });
        }
        // Traces from several sources may interleave: keep the timeline ordered.
        timeline.sort_by_key(|s| s.at_us);
        if !share_asked {
            timeline.insert(
                0,
                Step {
                    at_us: 0,
                    action: Action::ShareStart,
                },
            );
            if !share_stopped {
                let at_us = timeline.last().map_or(0, |s| s.at_us);
                timeline.push(Step {
                    at_us,
                    action: Action::ShareStop,
                });
            }
        }
        let mut vm_spec = VmSpec::default();
        // A recorded vCPU id the default VM lacks gets its vCPUs.
        if let Some(max) = timeline
            .iter()
            .filter_map(|s| match s.action {
                Action::Touch { vcpu, .. } | Action::Smm { vcpu, .. } | Action::Cr { vcpu, .. } => {
                    Some(vcpu)
                }
                _ => None,
            })
            .max()
        {
            vm_spec.vcpus = vm_spec.vcpus.max(max.saturating_add(1));
        }
        Scenario {
            name: name.to_owned(),
            description: format!("generated from a recorded trace ({} steps)", timeline.len()),
            vm: vm_spec,
            iommu: IommuSpec::default(),
            sharing: SharingSpec::default(),
            timeline,
        }
    }

    /// The scenario as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot serialise: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::addr::Gfn;
    use crate::event::{Memslot, Source};

    #[test]
    fn parses_with_defaults_and_hex_numbers() {
        let s = Scenario::parse(
            Path::new("t.toml"),
            r#"
name = "t"
[[timeline]]
at_us = 0
do = "share_start"
[[timeline]]
at_us = 5
do = "memslot_add"
slot = 1
gpa = 0x100000
size = 0x200000
hpa = 0x7f0000100000
[[timeline]]
at_us = 7
do = "dma"
iova = 0x100000
size = 0x1000
"#,
        )
        .unwrap();
        assert_eq!(s.vm.vcpus, 2);
        assert_eq!(s.sharing.modes.len(), 4);
        assert_eq!(
            s.timeline[1].action,
            Action::MemslotAdd {
                slot: 1,
                as_id: 0,
                gpa: Gpa(0x100000),
                size: 0x200000,
                flags: 0,
                hpa: Hpa(0x7f00_0010_0000)
            }
        );
        assert!(matches!(
            s.timeline[2].action,
            Action::Dma {
                stride: 4096,
                write: false,
                ..
            }
        ));
        assert_eq!(s.timeline[2].action.name(), "dma");
        // Round trip through TOML.
        assert_eq!(
            Scenario::parse(Path::new("u.toml"), &s.to_toml()).unwrap(),
            s
        );
    }

    fn full_error(err: &ScenarioError) -> String {
        let mut text = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    }

    #[test]
    fn errors_name_the_cause() {
        let err =
            Scenario::parse(Path::new("bad.toml"), "name = \"x\"\n[vm]\nvcpu = 2\n").unwrap_err();
        let text = full_error(&err);
        assert!(text.contains("bad.toml") && text.contains("vcpu"), "{text}");
        assert!(text.contains("line 3"), "{text}");
        let err = Scenario::parse(
            Path::new("order.toml"),
            "name = \"x\"\n[[timeline]]\nat_us = 5\ndo = \"share_start\"\n[[timeline]]\nat_us = 1\ndo = \"share_stop\"\n",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "scenario order.toml:5:1: timeline step 2 (share_stop): at 1 us it comes before the previous step at 5 us"
        );
        let err = Scenario::parse(
            Path::new("k.toml"),
            "name = \"x\"\n[iommu]\nkind = \"arm\"\n",
        )
        .unwrap_err();
        let text = full_error(&err);
        assert!(
            text.contains("arm") && text.contains("vtd") && text.contains("line 3"),
            "{text}"
        );
        let err = Scenario::parse(
            Path::new("a.toml"),
            "name = \"x\"\n[[timeline]]\nat_us = 1\ndo = \"warp\"\n",
        )
        .unwrap_err();
        assert!(full_error(&err).contains("warp"));
    }

    #[test]
    fn typed_names_fail_at_load_time_with_their_place() {
        for (text, needle) in [
            ("[vm]\nformat = \"arm\"\n", "ept or npt"),
            ("[vm]\nviommu = \"full\"\n", "none, nested or shadow"),
            ("[sharing]\nmodes = [\"fast\"]\n", "pin_prepopulate"),
            ("[sharing]\ndirty_tracking = \"all\"\n", "dirty_bits"),
            (
                "[[timeline]]\nat_us = 0\ndo = \"private_slot\"\nkind = \"vga\"\ngpa = 0\nhpa = 0\n",
                "apic_access",
            ),
        ] {
            let err =
                Scenario::parse(Path::new("n.toml"), &format!("name = \"x\"\n{text}")).unwrap_err();
            let full = full_error(&err);
            assert!(full.contains(needle) && full.contains("line "), "{full}");
        }
    }

    #[test]
    fn mistakes_a_run_would_meet_are_refused_at_load_time() {
        let cases = [
            (
                "[[timeline]]\nat_us = 0\ndo = \"touch\"\nvcpu = 7\ngpa = 0\nsize = 4096\n",
                "n.toml:2:1: timeline step 1 (touch): vCPU 7 does not exist (the VM has 2)",
            ),
            (
                "[[timeline]]\nat_us = 0\ndo = \"memslot_delete\"\nslot = 3\n",
                "n.toml:2:1: timeline step 1 (memslot_delete): memslot 3 of address space 0 does not exist at this point",
            ),
            (
                "[[timeline]]\nat_us = 0\ndo = \"share_start\"\n\n[[timeline]]\nat_us = 1\ndo = \"memslot_add\"\nslot = 0\ngpa = 0x800\nsize = 0x1000\nhpa = 0\n",
                "n.toml:6:1: timeline step 2 (memslot_add): gpa 0x800 is not 4 KiB-aligned",
            ),
        ];
        for (text, want) in cases {
            let err =
                Scenario::parse(Path::new("n.toml"), &format!("name = \"x\"\n{text}")).unwrap_err();
            assert_eq!(err.to_string(), format!("scenario {want}"));
        }
    }

    #[test]
    fn from_events_replays_memslots_faults_and_dma() {
        let slot = Memslot {
            slot: 3,
            as_id: 0,
            gpa: Gpa(0x1000_0000),
            size: 0x10_0000,
            flags: 0,
            ua: 0x7f00_0000_0000,
        };
        let ev = |ts, kind| Event::new(ts, 42, Source::Live, kind);
        let events = vec![
            ev(1_000, EventKind::MemslotAdd(slot)),
            ev(
                2_000,
                EventKind::PageFault {
                    gfn: Gfn(0x10000),
                    error_code: 2,
                },
            ),
            ev(
                3_000,
                EventKind::IommuMap {
                    iova: Iova(0x1000_0000),
                    size: 0x2000,
                    ns: 0,
                },
            ),
            Event::new(3_500, 7, Source::Live, EventKind::MemslotDelete(slot)),
            ev(4_000, EventKind::MemslotDelete(slot)),
            // A slot added before the recording began: its deletion cannot be replayed.
            ev(5_000, EventKind::MemslotDelete(Memslot { slot: 9, ..slot })),
        ];
        let s = Scenario::from_events("t", None, &events);
        let kinds: Vec<_> = s
            .timeline
            .iter()
            .map(|st| format!("{}:{}", st.at_us, st.action.name()))
            .collect();
        assert_eq!(
            kinds.len(),
            6,
            "share start, 4 steps of VM 42 only, share stop: {kinds:?}"
        );
        // The VMM's exit ends the sharing the scenario started: no pins outlive the VM.
        assert_eq!(kinds[5], "4:share_stop");
        assert_eq!(s.timeline[0].action, Action::ShareStart);
        assert!(matches!(
            s.timeline[1].action,
            Action::MemslotAdd {
                hpa: Hpa(0x7f00_0000_0000),
                ..
            }
        ));
        assert!(matches!(
            s.timeline[2].action,
            Action::Touch { write: true, .. }
        ));
        assert!(matches!(
            s.timeline[3].action,
            Action::Dma { size: 0x2000, .. }
        ));
        s.validate().unwrap();
    }

    #[test]
    fn from_events_replays_smm_and_control_register_writes() {
        let ev = |ts, vcpu, kind| Event::new(ts, 1, Source::Live, kind).on_vcpu(vcpu);
        let events = vec![
            ev(1_000, 3, EventKind::SmmTransition { enter: true }),
            ev(2_000, 3, EventKind::SmmTransition { enter: false }),
            ev(
                3_000,
                0,
                EventKind::CrWrite {
                    cr: 0,
                    value: Some(0x8001_0033),
                },
            ),
            ev(4_000, 0, EventKind::CrWrite { cr: 4, value: None }),
            // CR3 writes are no MMU-role change: not replayed.
            ev(
                5_000,
                0,
                EventKind::CrWrite {
                    cr: 3,
                    value: Some(0x1000),
                },
            ),
        ];
        let s = Scenario::from_events("t", None, &events);
        let actions: Vec<_> = s.timeline.iter().map(|st| st.action.clone()).collect();
        assert_eq!(
            actions,
            [
                Action::ShareStart,
                Action::Smm {
                    vcpu: 3,
                    enter: true
                },
                Action::Smm {
                    vcpu: 3,
                    enter: false
                },
                Action::Cr {
                    vcpu: 0,
                    cr: 0,
                    value: Some(0x8001_0033)
                },
                Action::Cr {
                    vcpu: 0,
                    cr: 4,
                    value: None
                },
                Action::ShareStop,
            ]
        );
        assert_eq!(s.vm.vcpus, 4, "vCPU 3 was seen");
        s.validate().unwrap();
        // And from a scenario file.
        let text =
            "name = \"c\"\n[[timeline]]\nat_us = 0\ndo = \"cr\"\ncr = 0\nvalue = 0x80010033\n";
        let s = Scenario::parse(Path::new("c.toml"), text).unwrap();
        assert_eq!(
            s.timeline[0].action,
            Action::Cr {
                vcpu: 0,
                cr: 0,
                value: Some(0x8001_0033)
            }
        );
        let bad = "name = \"c\"\n[[timeline]]\nat_us = 0\ndo = \"cr\"\ncr = 3\n";
        let err = Scenario::parse(Path::new("c.toml"), bad).unwrap_err();
        assert!(err.to_string().contains("only CR0 and CR4"), "{err}");
    }
}
