//! `tdpshare-probe bench-decode`: how fast the decoder turns kernel records into events — the
//! user-space half of the recorder's cost, which bounds the event rate it can keep up with.
//! The records are `kvmmmu:kvm_tdp_mmu_spte_changed` (the most frequent during a boot), laid out
//! by the running kernel's own tracefs format.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context;
use tdpshare::PteFormat;
use tdpshare_probes_common::{ProbeId, RECORD_DATA, Record};

use crate::btf::RoleLayout;
use crate::decode::Decoder;
use crate::tracefs::{Format, tracefs_root};

/// Records decoded per second, and events made per record.
#[derive(Debug, Clone, Copy)]
pub struct DecodeRate {
    pub records: u64,
    pub events: u64,
    pub secs: f64,
}

/// Decodes `n` synthetic SPTE-change records laid out by this kernel's format.
pub fn decode_rate(n: u64) -> anyhow::Result<DecodeRate> {
    let root = tracefs_root().context("tracefs is not mounted (/sys/kernel/tracing)")?;
    let format = Format::load(&root, "kvmmmu", "kvm_tdp_mmu_spte_changed")
        .context("this kernel's kvmmmu:kvm_tdp_mmu_spte_changed format")?;
    let put = |data: &mut [u8], name: &str, value: u64| -> anyhow::Result<()> {
        let f = format.field(name)?;
        let bytes = value.to_le_bytes();
        data.get_mut(f.offset..f.offset + f.size)
            .with_context(|| format!("field {name} beyond the record"))?
            .copy_from_slice(&bytes[..f.size]);
        Ok(())
    };
    let mut records = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut data = [0u8; RECORD_DATA];
        put(&mut data, "gfn", 0x10_0000 + i)?;
        put(&mut data, "level", 1)?;
        put(&mut data, "old_spte", 0)?;
        put(&mut data, "new_spte", 0x1_2345_6000 | 0x867)?;
        records.push(Record {
            probe: ProbeId::KvmTdpMmuSpteChanged as u32,
            tgid: 4242,
            tid: 4243 + (i % 4) as u32,
            cpu: 0,
            ts_ns: 1_000 + i,
            latency_ns: 0,
            ret: 0,
            data,
        });
    }
    let mut formats = HashMap::new();
    formats.insert(ProbeId::KvmTdpMmuSpteChanged, format.clone());
    let mut decoder = Decoder::new(formats, RoleLayout::LINUX_6, PteFormat::NPT4, 0);
    let start = Instant::now();
    let mut events = 0;
    for r in &records {
        events += decoder.decode(r).len() as u64;
    }
    Ok(DecodeRate {
        records: n,
        events,
        secs: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_decodes_into_one_event() {
        let Some(root) = tracefs_root() else {
            eprintln!("skipped: no tracefs");
            return;
        };
        if !root.join("events/kvmmmu/kvm_tdp_mmu_spte_changed").exists() {
            eprintln!("skipped: this kernel has no kvmmmu:kvm_tdp_mmu_spte_changed");
            return;
        }
        let r = decode_rate(1000).unwrap();
        assert_eq!((r.records, r.events), (1000, 1000));
        assert!(r.secs > 0.0);
    }
}
