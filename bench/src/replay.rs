//! Tier 3, replay: the kmod simulator — the real page-table code on real table memory — on the
//! boot scenarios recorded by the live and lab tiers, in every mode, with huge pages and without.

use std::path::Path;

use anyhow::Context;
use tdpshare::ShareMode;
use tdpshare::sim::{RunOptions, Scenario, run_mode};

use crate::results::Case;
use crate::stats::Metric;

/// The metric names, in report order.
pub const FULL_PREPOPS: &str = "full pre-populations";
pub const PREPOPS: &str = "pre-populations (all)";
pub const ENTRIES: &str = "entries written";
pub const PREPOP_TIME: &str = "time in pre-population";
pub const ROOT_UPDATES: &str = "root updates";
pub const IOTLB_FLUSHES: &str = "IOTLB flushes";
pub const PINNED_PEAK: &str = "pinned pages (peak)";
pub const TABLE_PEAK: &str = "table pages (peak)";
pub const HUGE_COVERAGE: &str = "huge-page coverage";
pub const POPULATION_RATE: &str = "population rate";

/// Runs `scenario` in every mode it lists, with huge host pages and/or without (`huge`), `runs`
/// times each (counts are the same every time; the measured pre-population time is
/// summarised).
pub fn replay(path: &Path, runs: usize, huge: &[bool]) -> anyhow::Result<Vec<Case>> {
    let scenario = Scenario::load(path).with_context(|| format!("loading {}", path.display()))?;
    let opts = RunOptions {
        verify_dma: false,
        ..RunOptions::default()
    };
    let mut cases = Vec::new();
    for &huge in huge {
        let mut s = scenario.clone();
        s.vm.huge_pages = huge;
        for mode in ShareMode::ALL {
            if !s.sharing.modes.contains(&mode) {
                continue;
            }
            let mut times = Vec::new();
            let mut last = None;
            for _ in 0..runs.max(1) {
                let r =
                    run_mode(&s, mode, 1, opts).with_context(|| format!("{} in {mode}", s.name))?;
                times.push(r.stats.prepop_total_ns() as f64 / 1e6);
                last = Some(r);
            }
            let r = last.context("no run")?;
            let id = format!(
                "replay/{}/{}/{}",
                s.name,
                mode.name(),
                if huge { "huge" } else { "4k" }
            );
            let mut metrics = vec![
                Metric::count(FULL_PREPOPS, r.stats.full_prepopulations),
                Metric::count(PREPOPS, r.stats.prepopulations),
                Metric::count(ENTRIES, r.stats.prepop_entries),
            ];
            metrics.extend(Metric::of(PREPOP_TIME, "ms", "measured", &times));
            // The real page-table code's throughput: entries written per second.
            let rates: Vec<f64> = times
                .iter()
                .filter(|&&ms| ms > 0.0)
                .map(|ms| r.stats.prepop_entries as f64 / (ms / 1e3))
                .collect();
            metrics.extend(Metric::of(POPULATION_RATE, "entries/s", "measured", &rates));
            metrics.extend([
                Metric::count(ROOT_UPDATES, r.totals.iommu_root_updates),
                Metric::count(IOTLB_FLUSHES, r.stats.iotlb_flushes),
                Metric::count(PINNED_PEAK, r.pinned_pages_peak),
                Metric::count(TABLE_PEAK, r.table_pages_peak),
            ]);
            if let Some([l4k, l2m, l1g]) = r.iommu_leaves {
                let huge = (l2m << 21) + (l1g << 30);
                let all = (l4k << 12) + huge;
                if all > 0 {
                    let pct = huge as f64 * 100.0 / all as f64;
                    metrics.extend(Metric::of(HUGE_COVERAGE, "%", "counted", &[pct]));
                }
            }
            if !r.refusals.is_empty() {
                // A refused mode did nothing: say so rather than show zeros as a result.
                continue;
            }
            cases.push(Case {
                id,
                label: format!(
                    "{} — {} — {} host pages",
                    s.name,
                    mode.name(),
                    if huge { "huge" } else { "4 KiB" }
                ),
                metrics,
            });
        }
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorded_linux_boot_replays_in_every_mode() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../kmod/scenarios/linux-boot-q35-8g.toml");
        // Huge pages only: 4 KiB host pages write 130 M entries, minutes in a debug build.
        let cases = replay(&path, 1, &[true]).unwrap();
        let full = |id: &str| {
            cases
                .iter()
                .find(|c| c.id == id)
                .unwrap_or_else(|| panic!("{id}"))
                .metric(FULL_PREPOPS)
                .unwrap()
                .median
        };
        assert_eq!(full("replay/linux-boot-q35-8g/pin_prepopulate/huge"), 61.0);
        assert!(full("replay/linux-boot-q35-8g/optimized/huge") <= 2.0);
        assert_eq!(cases.len(), 4, "every mode");
    }
}
