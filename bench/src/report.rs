//! A Markdown report comparing measured runs with the seed design's published boot figures.

use std::fmt::Write as _;

use tdpshare::VmStats;

/// A figure published by an earlier design, with where it comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reference {
    pub what: &'static str,
    pub value: f64,
    pub unit: &'static str,
    pub source: &'static str,
}

/// KVM Forum 2021 (Intel), 8 GiB guest boot.
pub const SEED_8G: &[Reference] = &[
    Reference {
        what: "boot, no sharing",
        value: 29.0,
        unit: "s",
        source: "KVM Forum 2021",
    },
    Reference {
        what: "boot, sharing, huge pages",
        value: 32.0,
        unit: "s",
        source: "KVM Forum 2021",
    },
    Reference {
        what: "boot, sharing, 4K pages",
        value: 63.0,
        unit: "s",
        source: "KVM Forum 2021",
    },
    Reference {
        what: "pre-populations per boot",
        value: 132.0,
        unit: "",
        source: "KVM Forum 2021",
    },
    Reference {
        what: "time in pre-population, 4K pages",
        value: 32.0,
        unit: "s",
        source: "KVM Forum 2021",
    },
    Reference {
        what: "time in pre-population, huge pages",
        value: 2.0,
        unit: "s",
        source: "KVM Forum 2021",
    },
    Reference {
        what: "time in IOTLB flushes",
        value: 1.0,
        unit: "s",
        source: "KVM Forum 2021",
    },
];

/// One measured run: a label (mode, page size) and its totals.
#[derive(Debug, Clone)]
pub struct Run {
    pub label: String,
    /// Whether the figures were measured on real memory or modelled by the simulator.
    pub how: &'static str,
    pub stats: VmStats,
}

fn secs(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e9)
}

/// The report: a table of the runs, then the reference figures.
pub fn markdown(title: &str, runs: &[Run], references: &[Reference]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## {title}\n");
    let _ = writeln!(
        out,
        "| run | how | pre-populations | entries written | pre-population s | root updates | IOTLB flushes | IOTLB flush s | peak pinned MiB |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for run in runs {
        let s = &run.stats;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.label,
            run.how,
            s.prepopulations,
            s.prepop_entries,
            secs(s.prepop_total_ns()),
            s.root_updates(),
            s.iotlb_flushes,
            secs(s.iotlb_flush_total_ns()),
            s.pinned_pages_peak / 256,
        );
    }
    if !references.is_empty() {
        let _ = writeln!(out, "\nPublished figures to compare with:\n");
        for r in references {
            let unit = if r.unit.is_empty() {
                String::new()
            } else {
                format!(" {}", r.unit)
            };
            let _ = writeln!(out, "- {}: {}{} ({})", r.what, r.value, unit, r.source);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdpshare::event::{Event, EventKind, GpaRange, PageSize, Source};

    #[test]
    fn report_lists_each_run_with_its_totals() {
        let mut stats = VmStats::default();
        stats.record(&Event::new(
            0,
            1,
            Source::Simulator,
            EventKind::PrepopulateEnd {
                range: GpaRange::new(tdpshare::Gpa(0), 8 << 30),
                page_size: PageSize::Size4K,
                cause: tdpshare::event::PrepopCause::NewRoot,
                entries: 2_097_152,
                ns: 1_500_000_000,
            },
        ));
        let md = markdown(
            "8 GiB boot",
            &[Run {
                label: "pin_prepopulate 4K".into(),
                how: "modelled",
                stats,
            }],
            SEED_8G,
        );
        assert!(
            md.contains(
                "| pin_prepopulate 4K | modelled | 1 | 2097152 | 1.500 | 0 | 0 | 0.000 | 0 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("- pre-populations per boot: 132 (KVM Forum 2021)"),
            "{md}"
        );
    }
}
