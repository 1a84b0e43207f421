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
//! Every field but `name` and `timeline` has a default; unknown fields are errors, so a typo
//! does not silently change a run. A scenario can also be made from a recorded trace
//! ([`Scenario::from_events`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::decision::caps::{IommuCaps, KvmCaps};
use crate::decision::format::Kind;
use crate::event::{Event, EventKind, ShareMode, VmId};
use crate::sharing::dirty::DirtyTracking;
use crate::sharing::vm::{PrivateKind, VIommu, VmConfig};

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
    #[error("scenario {path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("cannot read trace {path}")]
    Trace {
        path: PathBuf,
        #[source]
        source: crate::event::trace::TraceError,
    },
}

fn yes() -> bool {
    true
}
fn two() -> u32 {
    2
}

/// The VM and what KVM uses for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    #[serde(default = "two")]
    pub vcpus: u32,
    /// Host memory in huge pages (THP / hugetlbfs).
    #[serde(default = "yes")]
    pub huge_pages: bool,
    #[serde(default = "yes")]
    pub tdp: bool,
    #[serde(default)]
    pub nested_tdp_exposed: bool,
    /// "none", "nested" or "shadow".
    #[serde(default = "none")]
    pub viommu: String,
    /// "ept" or "npt".
    #[serde(default = "ept")]
    pub format: String,
    #[serde(default = "four")]
    pub levels: u8,
    #[serde(default = "three")]
    pub max_huge_level: u8,
    #[serde(default)]
    pub device_iopf: bool,
    #[serde(default)]
    pub noncoherent_dma: bool,
}

fn none() -> String {
    "none".into()
}
fn ept() -> String {
    "ept".into()
}
fn four() -> u8 {
    4
}
fn three() -> u8 {
    3
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            vcpus: 2,
            huge_pages: true,
            tdp: true,
            nested_tdp_exposed: false,
            viommu: none(),
            format: ept(),
            levels: 4,
            max_huge_level: 3,
            device_iopf: false,
            noncoherent_dma: false,
        }
    }
}

fn kind_of(name: &str) -> Option<Kind> {
    match name {
        "ept" => Some(Kind::Ept),
        "npt" => Some(Kind::Npt),
        _ => None,
    }
}

impl VmSpec {
    pub fn config(&self) -> Result<VmConfig, String> {
        let kind = kind_of(&self.format)
            .ok_or_else(|| format!("vm.format {:?} is not \"ept\" or \"npt\"", self.format))?;
        let viommu = match self.viommu.as_str() {
            "none" => VIommu::None,
            "nested" => VIommu::Nested,
            "shadow" => VIommu::Shadow,
            other => return Err(format!("vm.viommu {other:?} is not none, nested or shadow")),
        };
        Ok(VmConfig {
            tdp: self.tdp,
            nested_tdp_exposed: self.nested_tdp_exposed,
            viommu,
            kvm: KvmCaps {
                kind,
                levels: self.levels,
                max_huge_level: self.max_huge_level,
            },
            huge_pages: self.huge_pages,
            device_iopf: self.device_iopf,
            noncoherent_dma: self.noncoherent_dma,
        })
    }
}

/// The IOMMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IommuSpec {
    /// "vtd" (EPT-format second level) or "amd" (x86-64 format, v2).
    #[serde(default = "vtd")]
    pub kind: String,
    #[serde(default = "levels")]
    pub levels: Vec<u8>,
    #[serde(default = "yes")]
    pub superpage_2m: bool,
    #[serde(default = "yes")]
    pub superpage_1g: bool,
    #[serde(default = "yes")]
    pub snoop_control: bool,
    #[serde(default = "yes")]
    pub coherent_walk: bool,
    #[serde(default = "iotlb_entries")]
    pub iotlb_entries: usize,
}

fn vtd() -> String {
    "vtd".into()
}
fn levels() -> Vec<u8> {
    vec![4, 5]
}
fn iotlb_entries() -> usize {
    4096
}

impl Default for IommuSpec {
    fn default() -> Self {
        Self {
            kind: vtd(),
            levels: levels(),
            superpage_2m: true,
            superpage_1g: true,
            snoop_control: true,
            coherent_walk: true,
            iotlb_entries: iotlb_entries(),
        }
    }
}

impl IommuSpec {
    pub fn caps(&self) -> Result<IommuCaps, String> {
        let mut caps = match self.kind.as_str() {
            "vtd" => IommuCaps::vtd(&self.levels, self.superpage_1g),
            "amd" => IommuCaps::amd_v2(&self.levels),
            other => return Err(format!("iommu.kind {other:?} is not \"vtd\" or \"amd\"")),
        };
        caps.superpage_2m = self.superpage_2m;
        caps.superpage_1g = self.superpage_1g;
        caps.snoop_control = self.snoop_control;
        caps.coherent_walk = self.coherent_walk;
        Ok(caps)
    }
}

/// Which modes to run and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharingSpec {
    #[serde(default = "all_modes")]
    pub modes: Vec<ShareMode>,
    /// Dirty tracking while sharing; default: dirty bits for pinning modes, write-protection
    /// with IO page faults.
    #[serde(default)]
    pub dirty_tracking: Option<DirtyTracking>,
}

fn all_modes() -> Vec<ShareMode> {
    ShareMode::ALL.to_vec()
}

impl Default for SharingSpec {
    fn default() -> Self {
        Self {
            modes: all_modes(),
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
        gpa: u64,
        size: u64,
        #[serde(default)]
        flags: u32,
        /// The host memory behind the slot (the VMM's userspace address).
        hpa: u64,
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
        gpa: u64,
    },
    MemslotFlags {
        slot: u16,
        #[serde(default)]
        as_id: u8,
        flags: u32,
    },
    /// KVM creates a private slot ("apic_access", "tss", "identity_map").
    PrivateSlot {
        kind: String,
        gpa: u64,
        hpa: u64,
    },
    /// A peer device's BAR appears in the guest (P2P DMA target).
    Mmio {
        gpa: u64,
        size: u64,
        hpa: u64,
    },
    /// A vCPU reads or writes guest memory.
    Touch {
        #[serde(default)]
        vcpu: u32,
        gpa: u64,
        size: u64,
        #[serde(default)]
        write: bool,
    },
    Smm {
        #[serde(default)]
        vcpu: u32,
        enter: bool,
    },
    /// The device does DMA, one access per `stride` bytes.
    Dma {
        iova: u64,
        size: u64,
        #[serde(default)]
        write: bool,
        #[serde(default = "page")]
        stride: u64,
    },
    /// `KVM_GET_DIRTY_LOG` of a slot.
    DirtyHarvest {
        slot: u16,
        #[serde(default)]
        as_id: u8,
    },
}

fn page() -> u64 {
    4096
}

impl Action {
    /// The private-slot kind named in a `private_slot` step.
    pub fn private_kind(name: &str) -> Option<PrivateKind> {
        match name {
            "apic_access" => Some(PrivateKind::ApicAccess),
            "tss" => Some(PrivateKind::Tss),
            "identity_map" => Some(PrivateKind::IdentityMap),
            _ => None,
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

impl Scenario {
    /// Parses the text of a scenario file named `path` (for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|source| ScenarioError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        s.validate().map_err(|what| ScenarioError::Invalid {
            path: path.to_path_buf(),
            what,
        })?;
        Ok(s)
    }

    /// Reads a scenario: a `.toml` file, or a recorded trace (`.jsonl`) turned into one.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        if path.extension().is_some_and(|e| e == "jsonl") {
            let reader = crate::event::trace::TraceReader::open(path).map_err(|source| {
                ScenarioError::Trace {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            let events =
                reader
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| ScenarioError::Trace {
                        path: path.to_path_buf(),
                        source,
                    })?;
            let name = path
                .file_stem()
                .map_or_else(|| "trace".to_owned(), |s| s.to_string_lossy().into_owned());
            return Ok(Self::from_events(&name, None, &events));
        }
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    fn validate(&self) -> Result<(), String> {
        self.vm.config()?;
        self.iommu.caps()?;
        if self.sharing.modes.is_empty() {
            return Err("sharing.modes is empty".into());
        }
        let mut last = 0;
        for (i, step) in self.timeline.iter().enumerate() {
            if step.at_us < last {
                return Err(format!(
                    "timeline step {} at {} us comes before the previous step at {} us",
                    i + 1,
                    step.at_us,
                    last
                ));
            }
            last = step.at_us;
            if let Action::PrivateSlot { kind, .. } = &step.action
                && Action::private_kind(kind).is_none()
            {
                return Err(format!(
                    "timeline step {}: private slot kind {kind:?} is not apic_access, tss or identity_map",
                    i + 1
                ));
            }
        }
        Ok(())
    }

    /// A scenario replaying what a trace recorded for VM `vm` (default: the first VM seen):
    /// memslot changes, vCPU page faults as touches, DMA mappings and IO page faults as DMA,
    /// sharing requests and stops. Sharing starts at the beginning when the trace never asked.
    pub fn from_events(name: &str, vm: Option<VmId>, events: &[Event]) -> Self {
        let vm = vm.or_else(|| events.first().map(|e| e.vm));
        let mut timeline = Vec::new();
        let mut share_asked = false;
        let mut slots = std::collections::BTreeMap::new();
        for e in events.iter().filter(|e| Some(e.vm) == vm) {
            let at_us = e.ts_ns / 1000;
            let vcpu = e.vcpu.unwrap_or(0);
            let hpa_of = |s: &crate::event::Memslot| if s.ua != 0 { s.ua } else { s.gpa };
            let action = match &e.kind {
                EventKind::MemslotAdd(s) => {
                    slots.insert((s.as_id, s.slot), *s);
                    Action::MemslotAdd {
                        slot: s.slot,
                        as_id: s.as_id,
                        gpa: s.gpa,
                        size: s.size,
                        flags: s.flags,
                        hpa: hpa_of(s),
                    }
                }
                EventKind::MemslotDelete(s) => {
                    slots.remove(&(s.as_id, s.slot));
                    Action::MemslotDelete {
                        slot: s.slot,
                        as_id: s.as_id,
                    }
                }
                EventKind::MemslotMove { slot, .. } => Action::MemslotMove {
                    slot: slot.slot,
                    as_id: slot.as_id,
                    gpa: slot.gpa,
                },
                EventKind::MemslotFlags { slot, .. } => Action::MemslotFlags {
                    slot: slot.slot,
                    as_id: slot.as_id,
                    flags: slot.flags,
                },
                EventKind::PageFault { gfn, error_code } => Action::Touch {
                    vcpu,
                    gpa: gfn << 12,
                    size: 4096,
                    write: error_code & 2 != 0,
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
                EventKind::SharingStopped { .. } => Action::ShareStop,
                _ => continue,
            };
            timeline.push(Step { at_us, action });
        }
        if !share_asked {
            timeline.insert(
                0,
                Step {
                    at_us: 0,
                    action: Action::ShareStart,
                },
            );
        }
        // Traces from several sources may interleave: keep the timeline ordered.
        timeline.sort_by_key(|s| s.at_us);
        Scenario {
            name: name.to_owned(),
            description: format!("generated from a recorded trace ({} steps)", timeline.len()),
            vm: VmSpec::default(),
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
                gpa: 0x100000,
                size: 0x200000,
                flags: 0,
                hpa: 0x7f00_0010_0000
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
        // Round trip through TOML.
        assert_eq!(
            Scenario::parse(Path::new("u.toml"), &s.to_toml()).unwrap(),
            s
        );
    }

    #[test]
    fn errors_name_the_cause() {
        let err =
            Scenario::parse(Path::new("bad.toml"), "name = \"x\"\n[vm]\nvcpu = 2\n").unwrap_err();
        let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(text.contains("bad.toml") && text.contains("vcpu"), "{text}");
        let err = Scenario::parse(
            Path::new("order.toml"),
            "name = \"x\"\n[[timeline]]\nat_us = 5\ndo = \"share_start\"\n[[timeline]]\nat_us = 1\ndo = \"share_stop\"\n",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "scenario order.toml: timeline step 2 at 1 us comes before the previous step at 5 us"
        );
        let err = Scenario::parse(
            Path::new("k.toml"),
            "name = \"x\"\n[iommu]\nkind = \"arm\"\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("\"arm\" is not \"vtd\" or \"amd\"")
        );
        let err = Scenario::parse(
            Path::new("a.toml"),
            "name = \"x\"\n[[timeline]]\nat_us = 1\ndo = \"warp\"\n",
        )
        .unwrap_err();
        assert!(
            std::error::Error::source(&err)
                .unwrap()
                .to_string()
                .contains("warp")
        );
    }

    #[test]
    fn from_events_replays_memslots_faults_and_dma() {
        let slot = Memslot {
            slot: 3,
            as_id: 0,
            gpa: 0x1000_0000,
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
                    gfn: 0x10000,
                    error_code: 2,
                },
            ),
            ev(
                3_000,
                EventKind::IommuMap {
                    iova: 0x1000_0000,
                    size: 0x2000,
                    ns: 0,
                },
            ),
            Event::new(3_500, 7, Source::Live, EventKind::MemslotDelete(slot)),
            ev(4_000, EventKind::MemslotDelete(slot)),
        ];
        let s = Scenario::from_events("t", None, &events);
        let kinds: Vec<_> = s
            .timeline
            .iter()
            .map(|st| format!("{}:{:?}", st.at_us, std::mem::discriminant(&st.action)))
            .collect();
        assert_eq!(
            kinds.len(),
            5,
            "share start + 4 steps of VM 42 only: {kinds:?}"
        );
        assert_eq!(s.timeline[0].action, Action::ShareStart);
        assert!(matches!(
            s.timeline[1].action,
            Action::MemslotAdd {
                hpa: 0x7f00_0000_0000,
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
    }
}
