//! `results.json`: what a bench run measured, where, and on what — and `compare`, which sets
//! two runs side by side with their noise.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::stats::Metric;

/// The format's name and version, checked when a file is read.
pub const FORMAT: &str = "tdpshare-bench-results";
pub const VERSION: u32 = 1;

/// Where the run happened.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub git_revision: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub qemu: String,
    pub kvm: bool,
}

/// One configuration of one tier, e.g. live TCG boot, 4 GiB, pinned, THP on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    /// A stable key: `live/tcg/4g/pinned/thp` — `compare` matches cases by it.
    pub id: String,
    pub label: String,
    pub metrics: Vec<Metric>,
}

impl Case {
    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.name == name)
    }
}

/// A tier: live, lab or replay. A tier that could not run says why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tier {
    pub name: String,
    /// What the tier's numbers are and where they come from.
    pub about: String,
    pub cases: Vec<Case>,
    /// Why (part of) the tier did not run.
    pub skipped: Vec<String>,
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub format: String,
    pub version: u32,
    pub started_unix: u64,
    pub command: String,
    pub quick: bool,
    /// `false` when the run was interrupted or a step failed: the report says so.
    pub complete: bool,
    pub host: Host,
    pub tiers: Vec<Tier>,
    /// `tdpshare-analyze report` on the traces the run recorded (absent in older results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
}

/// The analysis of a run's recorded traces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// The traces, relative to the run's directory.
    pub traces: Vec<String>,
    /// The report as Markdown, or why there is none.
    pub markdown: Result<String, String>,
}

/// Why a results file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a results.json")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is {format} version {version}, not {FORMAT} version {VERSION}")]
    Format {
        path: String,
        format: String,
        version: u32,
    },
}

impl Results {
    pub fn load(path: &std::path::Path) -> Result<Results, ReadError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ReadError::Io {
            path: p.clone(),
            source,
        })?;
        let r: Results = serde_json::from_str(&text).map_err(|source| ReadError::Parse {
            path: p.clone(),
            source,
        })?;
        if r.format != FORMAT || r.version != VERSION {
            return Err(ReadError::Format {
                path: p,
                format: r.format,
                version: r.version,
            });
        }
        Ok(r)
    }

    pub fn cases(&self) -> impl Iterator<Item = &Case> {
        self.tiers.iter().flat_map(|t| t.cases.iter())
    }
}

/// The differences between two runs, case by case and metric by metric: the change of the
/// median and whether it exceeds the two runs' noise (their min–max spreads).
pub fn compare(a: &Results, b: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "A: {} on {} ({}), {}\nB: {} on {} ({}), {}\n",
        a.host.git_revision,
        a.host.kernel,
        a.host.cpu,
        if a.complete { "complete" } else { "PARTIAL" },
        b.host.git_revision,
        b.host.kernel,
        b.host.cpu,
        if b.complete { "complete" } else { "PARTIAL" },
    );
    let _ = writeln!(
        out,
        "{:<44} {:<30} {:>14} {:>14} {:>9}  verdict",
        "case", "metric", "A", "B", "change"
    );
    let mut only_a = Vec::new();
    for ca in a.cases() {
        let Some(cb) = b.cases().find(|c| c.id == ca.id) else {
            only_a.push(ca.id.clone());
            continue;
        };
        for ma in &ca.metrics {
            let Some(mb) = cb.metric(&ma.name) else {
                continue;
            };
            let change = if ma.median == 0.0 {
                if mb.median == 0.0 { 0.0 } else { f64::INFINITY }
            } else {
                (mb.median - ma.median) / ma.median.abs()
            };
            // Beyond noise when the ranges do not overlap (counts: any difference).
            let disjoint = mb.min > ma.max || mb.max < ma.min;
            let verdict = if change == 0.0 {
                "same"
            } else if disjoint {
                if change > 0.0 { "higher" } else { "lower" }
            } else {
                "within noise"
            };
            let _ = writeln!(
                out,
                "{:<44} {:<30} {:>14} {:>14} {:>+8.1}%  {verdict}",
                ca.id,
                ma.name,
                short(ma),
                short(mb),
                change * 100.0
            );
        }
    }
    let only_b: Vec<_> = b
        .cases()
        .filter(|cb| a.cases().all(|ca| ca.id != cb.id))
        .map(|c| c.id.clone())
        .collect();
    if !only_a.is_empty() {
        let _ = writeln!(out, "\nonly in A: {}", only_a.join(", "));
    }
    if !only_b.is_empty() {
        let _ = writeln!(out, "only in B: {}", only_b.join(", "));
    }
    out
}

fn short(m: &Metric) -> String {
    if m.unit == "count" {
        format!("{}", m.median as i64)
    } else {
        format!("{:.3} {}", m.median, m.unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(boot: &[f64], roots: u64) -> Results {
        Results {
            format: FORMAT.into(),
            version: VERSION,
            started_unix: 0,
            command: "t".into(),
            quick: true,
            complete: true,
            host: Host::default(),
            analysis: None,
            tiers: vec![Tier {
                name: "live".into(),
                about: String::new(),
                cases: vec![Case {
                    id: "live/tcg/1g/base/thp".into(),
                    label: "1 GiB".into(),
                    metrics: vec![
                        Metric::of("boot to marker", "s", "measured", boot).unwrap(),
                        Metric::count("roots allocated", roots),
                    ],
                }],
                skipped: vec![],
            }],
        }
    }

    #[test]
    fn compare_tells_noise_from_change() {
        let a = results(&[10.0, 11.0, 12.0], 5);
        let b = results(&[10.5, 11.5, 12.5], 7);
        let text = compare(&a, &b);
        assert!(text.contains("boot to marker"), "{text}");
        let line = |what: &str| text.lines().find(|l| l.contains(what)).unwrap().to_owned();
        assert!(line("boot to marker").ends_with("within noise"), "{text}");
        assert!(line("roots allocated").ends_with("higher"), "{text}");
        let c = results(&[20.0, 21.0, 22.0], 5);
        let text = compare(&a, &c);
        assert!(
            text.lines()
                .find(|l| l.contains("boot to marker"))
                .unwrap()
                .ends_with("higher")
        );
    }

    #[test]
    fn a_foreign_file_is_refused_with_its_name() {
        let dir = std::env::temp_dir().join(format!("tdpshare-bench-r-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("results.json");
        std::fs::write(&p, "{\"format\":\"x\"}").unwrap();
        let e = Results::load(&p).unwrap_err();
        assert!(e.to_string().contains("is not a results.json"), "{e}");
        let mut r = results(&[1.0], 1);
        r.version = 99;
        std::fs::write(&p, serde_json::to_string(&r).unwrap()).unwrap();
        let e = Results::load(&p).unwrap_err();
        assert!(e.to_string().contains("version 99"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_analysis_is_embedded_and_its_failure_shown() {
        let mut r = results(&[1.0], 1);
        // Older results.json without the field still load.
        let old = serde_json::to_string(&r).unwrap();
        assert!(!old.contains("analysis"));
        r.analysis = Some(Analysis {
            traces: vec!["work/fw-1g-base-probes/trace.jsonl".into()],
            markdown: Ok("### Root updates and their triggers\n\n12 fast zaps.\n\n**Every fast zap**\n\n| a | b |\n| --- | ---: |\n| x | 1 |\n".into()),
        });
        let md = crate::html::markdown(&r, &[]);
        assert!(md.contains("## Analysis of the recorded traces"));
        assert!(md.contains("12 fast zaps."));
        let html = crate::html::html(&r, &[]);
        assert!(html.contains("<h3>Root updates and their triggers</h3>"));
        // Last, after the plots and the tiers: the plots stay near the top of the page.
        let (analysis, seed) = (
            html.find("Analysis of the recorded traces"),
            html.find("seed"),
        );
        assert!(seed.is_some() && analysis > seed, "{html}");
        assert!(html.contains("<p><b>Every fast zap</b></p>"));
        assert!(html.contains("<td>x</td><td>1</td>"));
        r.analysis = Some(Analysis {
            traces: vec![],
            markdown: Err("tdpshare-analyze failed (exit status: 1): line 5".into()),
        });
        assert!(
            crate::html::markdown(&r, &[])
                .contains("**The analysis failed**: tdpshare-analyze failed")
        );
    }
}
