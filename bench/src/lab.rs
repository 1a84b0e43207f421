//! Tier 2, lab: the lab's runs (`cargo xtask lab`) — real TDP tables and a real (emulated)
//! IOMMU in a TCG L1 — read from their results directories: the probes' trace gives exact
//! counts, the console the L1's time for the command.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use tdpshare::{TraceReader, VmStats};

use crate::results::Case;
use crate::stats::Metric;

/// The L1's seconds for the command: from "LAB: booted … in B s" to "… finished … at E s".
pub fn command_secs(console: &str) -> Option<f64> {
    let booted = console.lines().find_map(|l| {
        let (_, rest) = l.split_once("LAB: booted ")?;
        let (_, secs) = rest.rsplit_once(" in ")?;
        secs.trim_end_matches(" s").trim().parse::<f64>().ok()
    })?;
    let done = console.lines().find_map(|l| {
        let (_, rest) = l.split_once("LAB: command finished with status ")?;
        let (_, secs) = rest.rsplit_once(" at ")?;
        secs.trim_end_matches(" s").trim().parse::<f64>().ok()
    })?;
    Some(done - booted)
}

/// One lab run as a case: `label` names its configuration (series or stock, VT-d mode).
pub fn case(dir: &Path, id: &str, label: &str) -> anyhow::Result<Case> {
    let trace = dir.join("trace.jsonl");
    let mut per_vm: HashMap<u64, VmStats> = HashMap::new();
    for e in TraceReader::open(&trace).with_context(|| format!("reading {}", trace.display()))? {
        let e = e.with_context(|| format!("reading {}", trace.display()))?;
        per_vm.entry(e.vm).or_default().record(&e);
    }
    // The lab VMM is the one VM of the recording.
    let stats = per_vm
        .into_values()
        .max_by_key(|s| s.events)
        .with_context(|| format!("{} recorded no VM", trace.display()))?;
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let mut metrics = Vec::new();
    if let Some(secs) = command_secs(&console) {
        metrics.extend(Metric::of("L1 time for the run", "s", "measured", &[secs]));
    }
    metrics.extend([
        Metric::count("memslot operations", stats.memslot_ops),
        Metric::count("roots allocated", stats.roots_allocated),
        Metric::count("fast zaps", stats.fast_zaps),
        Metric::count("full pre-populations", stats.full_prepopulations),
        Metric::count("entries written", stats.prepop_entries),
        Metric::count("huge-page splits", stats.splits),
        Metric::count("page faults", stats.page_faults),
        Metric::count("IOTLB flushes", stats.iotlb_flushes),
        Metric::count("pinned pages (peak)", stats.pinned_pages_peak),
    ]);
    metrics.extend(Metric::of(
        "time in pre-population",
        "ms",
        "measured",
        &[stats.prepop_total_ns() as f64 / 1e6],
    ));
    Ok(Case {
        id: id.to_owned(),
        label: label.to_owned(),
        metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_time_comes_from_the_lab_lines() {
        let console = "| x\nLAB: booted 6.12.117 in 4.52 s\nmore\n\
                       LAB: command finished with status 0 at 27.02 s\n";
        let secs = command_secs(console).unwrap();
        assert!((secs - 22.5).abs() < 1e-9, "{secs}");
        assert_eq!(command_secs("LAB: booted x in 1 s\n"), None);
    }
}
