//! The CO-RE probes (`probes/core/mmu_page.bpf.c`, C, loaded with libbpf-rs): every shadow page
//! KVM allocates, read from `struct kvm_mmu_page` itself: its table's host-physical address
//! and, for the TDP MMU, whether it is a root (it has no parent entry) — the tracepoint record
//! has neither, so without this probe roots are inferred from levels and numbered; and the
//! CR0/CR4 each vCPU enters the guest with, from `struct kvm_vcpu`, whenever they change —
//! `kvm_cr` does not fire for every write KVM emulates, and `kvm_exit` has no value.
//!
//! `tp_btf` needs the kernel's BTF (`CONFIG_DEBUG_INFO_BTF`); libbpf relocates the program's
//! field accesses against it, so one object runs on every kernel with these members.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libbpf_rs::{Link, MapCore, Object, ObjectBuilder, RingBuffer, RingBufferBuilder};
use tdpshare_probes_common::Record;

use crate::loader::ProbeState;

/// The object build.rs made (empty when clang or libbpf's headers were missing).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mmu_page.bpf.o"));
/// Why the object is empty, if it is.
const MISSING: &str = env!("TDPSHARE_CORE_MISSING");

/// The object's programs (probes/common's `core_programs`), attached all or none.
const PROGRAMS: [&str; 2] = ["mmu_get_page", "kvm_entry_cr"];

/// The loaded and attached programs with their ring buffer.
pub struct CoreProbe {
    ring: RingBuffer<'static>,
    records: Arc<Mutex<Vec<Record>>>,
    // Dropped after the ring: the links detach, then the object closes its maps.
    _links: Vec<Link>,
    object: Object,
}

impl std::fmt::Debug for CoreProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreProbe").finish_non_exhaustive()
    }
}

/// A libbpf error as a probe state: permission problems are `Denied`.
fn state_of(e: &libbpf_rs::Error, privilege: &str) -> ProbeState {
    use libbpf_rs::ErrorKind;
    match e.kind() {
        ErrorKind::PermissionDenied => ProbeState::Denied(privilege.to_owned()),
        _ => ProbeState::Failed(format!("{e:#}").lines().next().unwrap_or("").to_owned()),
    }
}

impl CoreProbe {
    /// Opens, loads and attaches the program for `pid` (every process when `None`).
    pub fn start(pid: Option<u32>, privilege: &str) -> Result<CoreProbe, ProbeState> {
        if OBJECT.is_empty() {
            return Err(ProbeState::NotBuilt(MISSING.to_owned()));
        }
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(ProbeState::Failed(
                "the kernel has no BTF (/sys/kernel/btf/vmlinux: CONFIG_DEBUG_INFO_BTF)".into(),
            ));
        }
        let mut open = ObjectBuilder::default()
            .name("tdpshare_core")
            .map_err(|e| state_of(&e, privilege))?
            .open_memory(OBJECT)
            .map_err(|e| state_of(&e, privilege))?;
        let target = pid.unwrap_or(0);
        // `const volatile u32 target_tgid` lives in the object's .rodata.
        for mut map in open.maps_mut() {
            if map.name().to_string_lossy().ends_with(".rodata") {
                let mut data = map.initial_value().map(<[u8]>::to_vec).unwrap_or_default();
                if data.len() >= 4 {
                    data[..4].copy_from_slice(&target.to_ne_bytes());
                    map.set_initial_value(&data)
                        .map_err(|e| state_of(&e, privilege))?;
                }
            }
        }
        let object = open.load().map_err(|e| state_of(&e, privilege))?;
        let mut links = Vec::new();
        for name in PROGRAMS {
            let link = object
                .progs_mut()
                .find(|p| p.name() == name)
                .ok_or_else(|| ProbeState::Failed(format!("no program {name} in the object")))?
                .attach()
                .map_err(|e| state_of(&e, privilege))?;
            links.push(link);
        }
        let records = Arc::new(Mutex::new(Vec::new()));
        let sink = records.clone();
        let ring = {
            let map = object
                .maps()
                .find(|m| m.name() == "CORE_EVENTS")
                .ok_or_else(|| ProbeState::Failed("no map CORE_EVENTS in the object".into()))?;
            let mut builder = RingBufferBuilder::new();
            builder
                .add(&map, move |bytes: &[u8]| {
                    if let (Some(r), Ok(mut v)) = (Record::from_bytes(bytes), sink.lock()) {
                        v.push(r);
                    }
                    0
                })
                .map_err(|e| state_of(&e, privilege))?;
            builder.build().map_err(|e| state_of(&e, privilege))?
        };
        Ok(CoreProbe {
            ring,
            records,
            _links: links,
            object,
        })
    }

    /// Moves the records the ring buffer holds into `out`.
    pub fn poll(&mut self, out: &mut Vec<Record>) {
        let _ = self.ring.poll(Duration::ZERO);
        if let Ok(mut v) = self.records.lock() {
            out.append(&mut v);
        }
    }

    /// Records the ring buffer could not take.
    pub fn drops(&self) -> u64 {
        let Some(map) = self.object.maps().find(|m| m.name() == "CORE_DROPS") else {
            return 0;
        };
        map.lookup(&0u32.to_ne_bytes(), libbpf_rs::MapFlags::ANY)
            .ok()
            .flatten()
            .and_then(|v| v.get(..8).and_then(|b| b.try_into().ok()))
            .map_or(0, u64::from_ne_bytes)
    }
}
