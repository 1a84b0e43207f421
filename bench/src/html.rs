//! `report.md` and a self-contained `report.html` (plots inline as SVG, no external assets)
//! from a run's results.

use std::fmt::Write as _;

use crate::plot;
use crate::report::SEED_8G;
use crate::results::{Case, Results, Tier};

/// A plot of the report: its title and SVG.
#[derive(Debug, Clone)]
pub struct Figure {
    pub title: String,
    pub svg: String,
}

/// The seed's columns (Bootup Time, Pre-population count) for the seed's figures and ours.
fn seed_table(r: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| | Bootup Time | Pre-population count | source |\n|---|--:|--:|---|"
    );
    for (what, boot, prepops) in [
        ("8 GiB, no sharing", 29.0, None),
        ("8 GiB, sharing, huge pages", 32.0, Some(132.0)),
        ("8 GiB, sharing, 4 KiB pages", 63.0, Some(132.0)),
    ] {
        let p = prepops.map_or("—".to_owned(), |p: f64| format!("{p}"));
        let _ = writeln!(out, "| seed: {what} | {boot} s | {p} | KVM Forum 2021 |");
    }
    let find = |id: &str| r.cases().find(|c| c.id == id);
    let live = r
        .cases()
        .filter(|c| c.id.starts_with("live/") && c.id.ends_with("/base/thp"))
        .max_by_key(|c| c.id.split('/').nth(2).map(size_of).unwrap_or(0));
    if let Some(c) = live
        && let Some(m) = c.metric("boot to marker")
    {
        let _ = writeln!(
            out,
            "| ours: {} (live) | {} | — | this run |",
            c.label,
            m.display()
        );
    }
    for (mode, label) in [
        ("pin_prepopulate", "the 2021 design"),
        ("optimized", "ours (persistent root)"),
    ] {
        for scenario in ["linux-boot-q35-8g", "boot-8g"] {
            if let Some(c) = find(&format!("replay/{scenario}/{mode}/huge"))
                && let Some(m) = c.metric(crate::replay::FULL_PREPOPS)
            {
                let _ = writeln!(
                    out,
                    "| {label}, replayed: `{scenario}` | — | {} full | this run (simulator) |",
                    m.display()
                );
                break;
            }
        }
    }
    out
}

fn size_of(s: &str) -> u64 {
    s.trim_end_matches('g').parse().unwrap_or(0)
}

fn tier_md(t: &Tier, out: &mut String) {
    let _ = writeln!(out, "## Tier: {}\n\n{}\n", t.name, t.about);
    for s in &t.skipped {
        let _ = writeln!(out, "- **skipped**: {s}");
    }
    if !t.skipped.is_empty() {
        out.push('\n');
    }
    if t.cases.is_empty() {
        return;
    }
    // Cases with the same metrics share a table: rows are cases, columns their metrics.
    let mut groups: Vec<(Vec<&str>, Vec<&Case>)> = Vec::new();
    for c in &t.cases {
        let names: Vec<&str> = c.metrics.iter().map(|m| m.name.as_str()).collect();
        match groups.iter_mut().find(|g| g.0 == names) {
            Some(g) => g.1.push(c),
            None => groups.push((names, vec![c])),
        }
    }
    for (names, cases) in groups {
        let _ = write!(out, "| case |");
        for n in &names {
            let _ = write!(out, " {n} |");
        }
        let _ = write!(out, "\n|---|");
        for _ in &names {
            out.push_str("--:|");
        }
        out.push('\n');
        for c in cases {
            let _ = write!(out, "| {} |", c.label);
            for n in &names {
                let v = c.metric(n).map_or("—".to_owned(), |m| m.display());
                let _ = write!(out, " {v} |");
            }
            out.push('\n');
        }
        out.push('\n');
    }
}

/// The Markdown report.
/// The analysis of the run's recorded traces as Markdown (empty without one). It comes last,
/// after the plots: it is long (every fast zap), and the plots must stay near the top.
pub fn analysis_markdown(r: &Results) -> String {
    let mut out = String::new();
    if let Some(a) = &r.analysis {
        let _ = writeln!(
            out,
            "## Analysis of the recorded traces\n\n`tdpshare-analyze report --only summary --only \
             roots --only whatif` on {}.\n",
            a.traces.join(", ")
        );
        match &a.markdown {
            Ok(md) => out.push_str(md),
            Err(e) => {
                let _ = writeln!(out, "> **The analysis failed**: {e}\n");
            }
        }
    }
    out
}

pub fn markdown(r: &Results, figures: &[Figure]) -> String {
    let mut out = main_markdown(r, figures);
    out.push_str(&analysis_markdown(r));
    out
}

/// The report without the analysis.
fn main_markdown(r: &Results, figures: &[Figure]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# tdpshare bench report\n");
    if !r.complete {
        let _ = writeln!(
            out,
            "> **PARTIAL REPORT**: the run was interrupted or a step failed; what is below is what \
             finished.\n"
        );
    }
    let h = &r.host;
    let _ = writeln!(
        out,
        "- command: `{}`{}\n- git revision: {}\n- host: {} ({} CPUs, {:.1} GiB), kernel {}, {}, KVM {}\n",
        r.command,
        if r.quick { " (quick)" } else { "" },
        h.git_revision,
        h.cpu,
        h.cpus,
        h.memory_gib,
        h.kernel,
        h.qemu,
        if h.kvm { "available" } else { "absent" }
    );
    let _ = writeln!(out, "## The seed's table, and ours\n\n{}", seed_table(r));
    let _ = writeln!(out, "Published figures:\n");
    for f in SEED_8G {
        let _ = writeln!(out, "- {}: {} {} ({})", f.what, f.value, f.unit, f.source);
    }
    out.push('\n');
    for t in &r.tiers {
        tier_md(t, &mut out);
    }
    if !figures.is_empty() {
        let _ = writeln!(out, "## Plots\n\nIn `report.html`: {}.\n", {
            let t: Vec<_> = figures.iter().map(|f| f.title.as_str()).collect();
            t.join("; ")
        });
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The HTML report: the Markdown's tables as HTML tables, and the plots inline.
pub fn html(r: &Results, figures: &[Figure]) -> String {
    let mut out = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>tdpshare bench report</title>\n<style>\
         body{font-family:sans-serif;margin:2em;max-width:1200px}\
         table{border-collapse:collapse;margin:1em 0;font-size:13px}\
         td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}\
         td:first-child,th:first-child{text-align:left}\
         .partial{background:#fdd;padding:1em;border:2px solid #c00}\
         figure{display:inline-block;margin:1em}</style></head><body>\n",
    );
    md_to_html(&main_markdown(r, &[]), &mut out);
    if !figures.is_empty() {
        out.push_str("<h2>Plots</h2>\n");
        for f in figures {
            let _ = writeln!(
                out,
                "<figure id=\"{}\">{}<figcaption>{}</figcaption></figure>",
                escape(&f.title.replace(' ', "-")),
                f.svg,
                escape(&f.title)
            );
        }
    }
    md_to_html(&analysis_markdown(r), &mut out);
    out.push_str("</body></html>\n");
    out
}

/// The Markdown the reports write, as HTML: headings, tables, paragraphs.
fn md_to_html(md: &str, out: &mut String) {
    let mut in_table = false;
    let mut header = false;
    for line in md.lines() {
        if line.starts_with('|') {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            if cells.iter().all(|c| c.chars().all(|ch| "-:".contains(ch))) {
                continue;
            }
            if !in_table {
                out.push_str("<table>\n");
                in_table = true;
                header = true;
            }
            let tag = if header { "th" } else { "td" };
            header = false;
            out.push_str("<tr>");
            for c in cells {
                let _ = write!(out, "<{tag}>{}</{tag}>", escape(&c.replace('`', "")));
            }
            out.push_str("</tr>\n");
            continue;
        }
        if in_table {
            out.push_str("</table>\n");
            in_table = false;
        }
        if let Some(h) = line.strip_prefix("### ") {
            let _ = writeln!(out, "<h3>{}</h3>", escape(h));
        } else if let Some(h) = line.strip_prefix("## ") {
            let _ = writeln!(out, "<h2>{}</h2>", escape(h));
        } else if let Some(h) = line.strip_prefix("# ") {
            let _ = writeln!(out, "<h1>{}</h1>", escape(h));
        } else if let Some(q) = line.strip_prefix("> ") {
            let _ = writeln!(
                out,
                "<p class=\"partial\">{}</p>",
                escape(&q.replace("**", ""))
            );
        } else if let Some(item) = line.strip_prefix("- ") {
            let _ = writeln!(
                out,
                "<p>• {}</p>",
                escape(&item.replace("**", "").replace('`', ""))
            );
        } else if let Some(b) = line.strip_prefix("**").and_then(|l| l.strip_suffix("**")) {
            let _ = writeln!(out, "<p><b>{}</b></p>", escape(b));
        } else if !line.trim().is_empty() {
            let _ = writeln!(out, "<p>{}</p>", escape(&line.replace('`', "")));
        }
    }
    if in_table {
        out.push_str("</table>\n");
    }
}

/// The plots a run's results support: boot time vs memory size per configuration;
/// pre-populations, time in pre-population and IOTLB flushes per mode; huge-page coverage.
pub fn figures(r: &Results) -> anyhow::Result<Vec<Figure>> {
    let mut figs = Vec::new();
    // Live: boot time vs memory, one line per configuration.
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for c in r.cases().filter(|c| c.id.starts_with("live/")) {
        let parts: Vec<&str> = c.id.split('/').collect();
        let (Some(accel), Some(size), Some(config), Some(thp)) =
            (parts.get(1), parts.get(2), parts.get(3), parts.get(4))
        else {
            continue;
        };
        let Some(m) = c
            .metric("boot to marker")
            .or(c.metric("firmware to marker"))
        else {
            continue;
        };
        let name = format!("{accel} {config} {thp}");
        let point = (size_of(size) as f64, m.median);
        match series.iter_mut().find(|s| s.0 == name) {
            Some(s) => s.1.push(point),
            None => series.push((name, vec![point])),
        }
    }
    for s in &mut series {
        s.1.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    if !series.is_empty() {
        figs.push(Figure {
            title: "boot time vs memory size".into(),
            svg: plot::lines(
                "Boot time vs memory size (live)",
                "guest memory (GiB)",
                "seconds to marker",
                &series,
            )?,
        });
    }
    // Replay: per mode, for the first scenario with huge pages.
    let scenario = r
        .cases()
        .filter(|c| c.id.starts_with("replay/") && c.id.ends_with("/huge"))
        .filter_map(|c| c.id.split('/').nth(1))
        .find(|s| *s == "linux-boot-q35-8g")
        .or_else(|| {
            r.cases()
                .find(|c| c.id.starts_with("replay/"))
                .and_then(|c| c.id.split('/').nth(1))
        })
        .map(str::to_owned);
    if let Some(scenario) = scenario {
        let per_mode = |metric: &str, pages: &str| -> Vec<(String, f64)> {
            r.cases()
                .filter(|c| c.id.starts_with(&format!("replay/{scenario}/")))
                .filter(|c| c.id.ends_with(&format!("/{pages}")))
                .filter_map(|c: &Case| {
                    let mode = c.id.split('/').nth(2)?;
                    Some((mode.to_owned(), c.metric(metric)?.median))
                })
                .collect()
        };
        for (metric, title, unit, pages) in [
            (
                crate::replay::FULL_PREPOPS,
                "full pre-populations per mode",
                "count",
                "huge",
            ),
            (
                crate::replay::PREPOP_TIME,
                "time in pre-population per mode (4 KiB host pages)",
                "ms",
                "4k",
            ),
            (
                crate::replay::IOTLB_FLUSHES,
                "IOTLB flushes per mode",
                "count",
                "huge",
            ),
            (
                crate::replay::HUGE_COVERAGE,
                "huge-page coverage of the IOMMU's view",
                "% of mapped bytes",
                "huge",
            ),
        ] {
            let data = per_mode(metric, pages);
            if !data.is_empty() {
                figs.push(Figure {
                    title: title.to_owned(),
                    svg: plot::bars(&format!("{title} — {scenario}"), unit, &data)?,
                });
            }
        }
    }
    Ok(figs)
}
