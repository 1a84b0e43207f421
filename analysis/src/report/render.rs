//! Rendering a [`Report`]: aligned terminal tables, Markdown, JSON, CSV.
//!
//! CSV holds several tables in one stream: each begins with a comment line
//! `# <section id>: <table title>`, then its header and rows, then a blank line.

use std::fmt::Write as _;

use super::{Cell, Report, Table};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Aligned tables for a terminal.
    #[default]
    Table,
    /// GitHub-flavoured Markdown (what the bench report embeds).
    Md,
    Json,
    Csv,
}

/// Renders `report` in `format`.
pub fn render(report: &Report, format: Format) -> String {
    match format {
        Format::Table => text(report),
        Format::Md => markdown(report),
        Format::Json => serde_json::to_string_pretty(report).unwrap_or_default() + "\n",
        Format::Csv => csv(report),
    }
}

fn widths(t: &Table) -> Vec<usize> {
    let mut w: Vec<usize> = t.columns.iter().map(|c| c.chars().count()).collect();
    for row in &t.rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(wi) = w.get_mut(i) {
                *wi = (*wi).max(cell.to_string().chars().count());
            }
        }
    }
    w
}

fn numeric(c: &Cell) -> bool {
    matches!(c, Cell::Int(_) | Cell::Signed(_) | Cell::Float(..))
}

/// Wraps `text` at `width` columns.
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = 0;
    for word in text.split_whitespace() {
        let n = word.chars().count();
        if line > 0 && line + 1 + n > width {
            out.push('\n');
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += n;
    }
    out
}

fn text(report: &Report) -> String {
    let mut out = String::new();
    for s in &report.sections {
        let _ = writeln!(out, "== {} ==", s.title);
        let _ = writeln!(out, "{}\n", wrap(&s.finding, 100));
        for t in s.tables.iter().filter(|t| !t.rows.is_empty()) {
            let w = widths(t);
            let _ = writeln!(out, "{}", t.title);
            let header: Vec<String> = t
                .columns
                .iter()
                .zip(&w)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            let _ = writeln!(out, "  {}", header.join("  ").trim_end());
            for row in &t.rows {
                let cells: Vec<String> = row
                    .iter()
                    .zip(&w)
                    .map(|(c, w)| {
                        if numeric(c) {
                            format!("{:>w$}", c.to_string())
                        } else {
                            format!("{:<w$}", c.to_string())
                        }
                    })
                    .collect();
                let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
            }
            out.push('\n');
        }
    }
    out
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

fn markdown(report: &Report) -> String {
    let mut out = String::new();
    for s in &report.sections {
        let _ = writeln!(out, "### {}\n\n{}\n", s.title, s.finding);
        for t in s.tables.iter().filter(|t| !t.rows.is_empty()) {
            let _ = writeln!(out, "**{}**\n", md_escape(&t.title));
            let _ = writeln!(
                out,
                "| {} |",
                t.columns
                    .iter()
                    .map(|c| md_escape(c))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            let align: Vec<&str> = (0..t.columns.len())
                .map(|i| {
                    if t.rows.first().and_then(|r| r.get(i)).is_some_and(numeric) {
                        "---:"
                    } else {
                        "---"
                    }
                })
                .collect();
            let _ = writeln!(out, "| {} |", align.join(" | "));
            for row in &t.rows {
                let cells: Vec<String> = row.iter().map(|c| md_escape(&c.to_string())).collect();
                let _ = writeln!(out, "| {} |", cells.join(" | "));
            }
            out.push('\n');
        }
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn csv(report: &Report) -> String {
    let mut out = String::new();
    for s in &report.sections {
        for t in &s.tables {
            let _ = writeln!(out, "# {}: {}", s.id, t.title);
            let header: Vec<String> = t.columns.iter().map(|c| csv_field(c)).collect();
            let _ = writeln!(out, "{}", header.join(","));
            for row in &t.rows {
                let cells: Vec<String> = row
                    .iter()
                    .map(|c| match c {
                        Cell::Null => String::new(),
                        // Full precision in machine output.
                        Cell::Float(v, _) => v.to_string(),
                        other => csv_field(&other.to_string()),
                    })
                    .collect();
                let _ = writeln!(out, "{}", cells.join(","));
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Section;

    fn sample() -> Report {
        let mut t = Table::new("Causes", &["cause", "count", "ms"]);
        t.row(vec![
            Cell::text("memslot_delete, slot 1"),
            Cell::Int(5),
            Cell::f(1.5, 2),
        ]);
        t.row(vec![Cell::text("a|b"), Cell::Int(12), Cell::Null]);
        Report {
            inputs: vec!["x.jsonl".into()],
            sections: vec![Section {
                id: "roots".into(),
                title: "Root updates".into(),
                finding: "Five of five.".into(),
                tables: vec![t],
            }],
        }
    }

    #[test]
    fn each_format_carries_every_cell() {
        let r = sample();
        let t = render(&r, Format::Table);
        assert!(t.contains("== Root updates ==") && t.contains("   12"));
        let md = render(&r, Format::Md);
        assert!(md.contains("| cause | count | ms |") && md.contains("| --- | ---: | ---: |"));
        assert!(md.contains("a\\|b"));
        let csv = render(&r, Format::Csv);
        assert!(csv.starts_with(
            "# roots: Causes\ncause,count,ms\n\"memslot_delete, slot 1\",5,1.5\na|b,12,\n"
        ));
        let json: serde_json::Value = serde_json::from_str(&render(&r, Format::Json)).unwrap();
        assert_eq!(json["sections"][0]["tables"][0]["rows"][0][1], 5);
    }
}
