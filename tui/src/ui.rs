//! Drawing the app: a header, one of four views, a footer with key hints, and the help overlay.
//! Reads the [`App`], never changes it.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Clear, Paragraph, Row, Sparkline, Table, Wrap};
use tdpshare::Log2Histogram;

use crate::app::{App, CLASSES, View};
use crate::overview::{COLUMNS, VmRow};

/// Draws everything.
pub fn render(frame: &mut Frame<'_>, app: &App) {
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    render_header(frame, header, app);
    match app.view {
        View::Overview => render_overview(frame, body, app),
        View::Detail => render_detail(frame, body, app),
        View::Log => render_log(frame, body, app),
        View::Probes => render_probes(frame, body, app),
    }
    render_footer(frame, footer, app);
    if app.help {
        render_help(frame, body, app);
    }
}

fn render_header(frame: &mut Frame<'_>, area: Rect, app: &App) {
    let [tabs_area, summary_area] =
        Layout::vertical([Constraint::Length(1), Constraint::Length(1)]).areas(area);
    let tabs: Vec<Span<'_>> = View::ALL
        .iter()
        .flat_map(|v| {
            let style = if *v == app.view {
                Style::new().add_modifier(Modifier::REVERSED)
            } else {
                Style::new()
            };
            [
                Span::styled(format!(" {} ", v.title()), style),
                Span::raw(" "),
            ]
        })
        .collect();
    let mut spans = vec![Span::styled("sharetop ", Style::new().bold())];
    spans.extend(tabs);
    if !app.failures.is_empty() {
        spans.push(Span::styled(
            format!("{} FAILED ", app.failures.len()),
            Style::new().fg(Color::Red).bold(),
        ));
    }
    if app.paused {
        spans.push(Span::styled(
            "PAUSED ",
            Style::new().fg(Color::Yellow).bold(),
        ));
    }
    spans.push(Span::styled(
        app.source.clone(),
        Style::new().fg(Color::DarkGray),
    ));
    frame.render_widget(Line::from(spans), tabs_area);
    frame.render_widget(
        Line::from(fit_pieces(summary(app), summary_area.width as usize)),
        summary_area,
    );
}

/// The summary line's pieces, in display order, each with its rank (0 first): what a narrow
/// terminal keeps.
fn summary(app: &App) -> Vec<(u8, Vec<Span<'static>>)> {
    let bold = Style::new().bold();
    let mut out = Vec::new();
    // Each source's clock (event time) and how far a replay or simulation has played.
    let clocks: Vec<String> = app
        .clocks
        .iter()
        .map(|(k, &ns)| {
            let progress = app
                .progress
                .get(k)
                .map(|p| format!(" {:.0}%", p * 100.0))
                .unwrap_or_default();
            format!(
                "{} {:.1} s{progress}",
                crate::app::source_name(k.0),
                ns as f64 / 1e9
            )
        })
        .collect();
    if !clocks.is_empty() {
        out.push((0, vec![Span::raw(format!("t {}", clocks.join(", ")))]));
    }
    let mut totals = Vec::new();
    for (i, (name, n)) in app.totals().into_iter().enumerate() {
        if i > 0 {
            totals.push(Span::raw(" "));
        }
        totals.push(Span::raw(format!("{name} ")));
        totals.push(Span::styled(n.to_string(), bold));
    }
    out.push((1, totals));
    if !app.probes.is_empty() || app.drops > 0 {
        let style = if app.drops > 0 {
            Style::new().fg(Color::Red).bold()
        } else {
            Style::new()
        };
        out.push((2, vec![Span::styled(format!("drops {}", app.drops), style)]));
    }
    if !app.probes.is_empty() {
        let (attached, total, bad) = app.probe_health();
        let mut piece = vec![Span::raw(format!("probes {attached}/{total}"))];
        if bad > 0 {
            piece.push(Span::styled(
                format!(" {bad} failed"),
                Style::new().fg(Color::Red).bold(),
            ));
        }
        out.push((3, piece));
    }
    out.push((
        4,
        vec![Span::raw(format!(
            "{} VMs, {} events",
            app.overview.len(),
            app.events
        ))],
    ));
    if app.cpu_percent > 0.0 {
        out.push((5, vec![Span::raw(format!("cpu {:.1}%", app.cpu_percent))]));
    }
    out
}

/// The pieces that fit `width` with their separators, taken by rank, shown in their order.
fn fit_pieces(pieces: Vec<(u8, Vec<Span<'static>>)>, width: usize) -> Vec<Span<'static>> {
    const SEP: &str = " │ ";
    let len = |p: &[Span<'_>]| p.iter().map(|s| s.content.chars().count()).sum::<usize>();
    let mut ranks: Vec<(u8, usize)> = pieces
        .iter()
        .enumerate()
        .map(|(i, (r, _))| (*r, i))
        .collect();
    ranks.sort_unstable();
    let mut keep = vec![false; pieces.len()];
    let mut used = 0;
    for (_, i) in ranks {
        let w = len(&pieces[i].1) + if used > 0 { SEP.chars().count() } else { 0 };
        if used + w <= width {
            used += w;
            keep[i] = true;
        }
    }
    let mut out = Vec::new();
    for (i, (_, piece)) in pieces.into_iter().enumerate() {
        if keep[i] {
            if !out.is_empty() {
                out.push(Span::styled(SEP, Style::new().fg(Color::DarkGray)));
            }
            out.extend(piece);
        }
    }
    out
}

fn render_footer(frame: &mut Frame<'_>, area: Rect, app: &App) {
    let text = if app.help {
        "Esc / ? close the help  ↑↓ PgUp PgDn scroll it".to_owned()
    } else if let Some(input) = &app.filter_input {
        format!("filter (regex, Enter to apply, Esc to cancel): {input}_")
    } else if let Some(err) = &app.filter_error {
        err.clone()
    } else {
        match app.view {
            View::Overview => {
                "q quit  ? help  Tab view  ↑↓ select  Enter detail  s/S sort  space pause  / filter"
            }
            View::Detail => "q quit  ? help  Esc back  ↑↓ other VM  +/- window  Tab view",
            View::Log => {
                "q quit  ? help  / filter  1-5 classes  space pause  ↑↓ PgUp PgDn ←→ scroll  Esc back"
            }
            View::Probes => "q quit  ? help  Tab view  Esc back",
        }
        .to_owned()
    };
    frame.render_widget(
        Line::from(text).style(Style::new().fg(Color::DarkGray)),
        area,
    );
}

/// The columns that fit in `width`, always starting with vm and name.
/// Columns always shown: VM and name.
const FIXED: usize = 2;

/// The columns that fit `width`: the fixed ones, then from the `offset`-th of the others
/// (←/→ scroll); the name is cut to 16 characters.
pub fn fitting_columns(
    width: u16,
    rows: &[&VmRow],
    sort: usize,
    offset: usize,
) -> Vec<(usize, u16)> {
    let mut out = Vec::new();
    let mut used = 0u16;
    let skip = offset.min(COLUMNS.len() - FIXED - 1);
    let order = (0..FIXED).chain(FIXED + skip..COLUMNS.len());
    for i in order {
        let c = &COLUMNS[i];
        let w = rows
            .iter()
            .map(|r| (c.value)(r).text().chars().count())
            .chain([c.title.chars().count()])
            .max()
            .unwrap_or(4)
            .min(if i == 1 { 16 } else { 24 }) as u16
            + u16::from(i == sort); // room for the sort mark
        if used + w + 1 > width && out.len() >= 2 {
            break;
        }
        used += w + 1;
        out.push((i, w));
    }
    out
}

fn render_overview(frame: &mut Frame<'_>, area: Rect, app: &App) {
    let rows = app.overview.rows(app.sort_column());
    let block = Block::bordered().title(format!(
        " VMs — sorted by {}{} ",
        COLUMNS[app.sort].name,
        if app.col_offset > 0 {
            " — ← more columns"
        } else {
            ""
        }
    ));
    if rows.is_empty() {
        let mut lines = vec![Line::from("no VM seen yet")];
        lines.extend(app.notes.iter().map(|n| Line::from(n.as_str())));
        frame.render_widget(
            Paragraph::new(lines).wrap(Wrap { trim: true }).block(block),
            area,
        );
        return;
    }
    let cols = fitting_columns(
        area.width.saturating_sub(2),
        &rows,
        app.sort,
        app.col_offset,
    );
    let header = Row::new(cols.iter().map(|&(i, _)| {
        let name = COLUMNS[i].title;
        if i == app.sort {
            Cell::from(format!("{name}▼")).style(Style::new().bold().underlined())
        } else {
            Cell::from(name).style(Style::new().bold())
        }
    }));
    let body: Vec<Row<'_>> = rows
        .iter()
        .map(|r| {
            let row = Row::new(cols.iter().map(|&(i, _)| {
                let v = (COLUMNS[i].value)(r);
                let text = v.text();
                if v.is_text() {
                    Cell::from(text)
                } else {
                    Cell::from(Line::from(text).right_aligned())
                }
            }));
            if Some(r.vm) == app.selected {
                row.style(Style::new().add_modifier(Modifier::REVERSED))
            } else {
                row
            }
        })
        .collect();
    let widths: Vec<Constraint> = cols.iter().map(|&(_, w)| Constraint::Length(w)).collect();
    // The table takes what its rows need; the rows left over show each VM's activity.
    let table_h = (rows.len() as u16).saturating_add(3);
    let (table_area, activity) = if area.height >= table_h + ACTIVITY_MIN {
        let [t, a] =
            Layout::vertical([Constraint::Length(table_h), Constraint::Min(0)]).areas(area);
        (t, Some(a))
    } else {
        (area, None)
    };
    frame.render_widget(
        Table::new(body, widths).header(header).block(block),
        table_area,
    );
    if let Some(a) = activity {
        render_activity(frame, a, app, &rows);
    }
}

/// Rows the activity panel needs at least: borders, its heading, one VM.
const ACTIVITY_MIN: u16 = 4;

/// The three paths' activity per VM as sparklines over the window, newest at the right edge;
/// each VM gets up to four rows when there is room, one when there is not.
fn render_activity(frame: &mut Frame<'_>, area: Rect, app: &App, rows: &[&VmRow]) {
    let window = rows.first().map_or(app.window, |r| r.detail.window);
    let block = Block::bordered().title(format!(
        " per second over the last {window} s (+/-), newest right; numbers: peaks "
    ));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    const LABEL: u16 = 18;
    const PEAK: u16 = 7;
    let cell_w = inner.width.saturating_sub(LABEL) / 3;
    let spark_w = cell_w.saturating_sub(PEAK + 1);
    if spark_w < 4 || inner.height < 2 {
        return;
    }
    let [heading, mut rest] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(inner);
    let titles = if cell_w >= 26 {
        ["pre-population entries", "root updates", "IOTLB flushes"]
    } else {
        ["prepop entries", "roots", "flushes"]
    };
    let mut spans = vec![Span::raw(" ".repeat(LABEL as usize))];
    for t in titles {
        let t: String = t.chars().take(cell_w as usize).collect();
        spans.push(Span::styled(
            format!("{t:<w$}", w = cell_w as usize),
            Style::new().bold(),
        ));
    }
    frame.render_widget(Line::from(spans), heading);
    let per_vm = (rest.height / rows.len().max(1) as u16).clamp(1, 4);
    for r in rows {
        if rest.height < per_vm {
            break;
        }
        let [vm_area, below] =
            Layout::vertical([Constraint::Length(per_vm), Constraint::Min(0)]).areas(rest);
        rest = below;
        let now = r
            .source
            .and_then(|s| app.clocks.get(&crate::app::SourceKey(s)))
            .map_or(0, |ns| ns / 1_000_000_000);
        let label = if r.name.is_empty() {
            format!("{}", r.vm)
        } else {
            format!("{} {}", r.vm, r.name)
        };
        let label: String = label.chars().take(LABEL as usize - 1).collect();
        let style = if Some(r.vm) == app.selected {
            Style::new().add_modifier(Modifier::REVERSED)
        } else {
            Style::new()
        };
        let [label_area, cells] =
            Layout::horizontal([Constraint::Length(LABEL), Constraint::Min(0)]).areas(vm_area);
        frame.render_widget(
            Line::from(Span::styled(label, style)),
            Rect {
                height: 1,
                ..label_area
            },
        );
        let d = &r.detail;
        let cell_areas = Layout::horizontal([Constraint::Length(cell_w); 3]).split(cells);
        for (cell, series) in
            cell_areas
                .iter()
                .zip([&d.prepopulation, &d.root_updates, &d.iotlb_flushes])
        {
            let values = series.values_at(now, d.window);
            let peak = values.iter().copied().max().unwrap_or(0);
            let shown = right_aligned(fit(&values, d.window, spark_w as usize), spark_w);
            let [spark, number] =
                Layout::horizontal([Constraint::Length(spark_w), Constraint::Length(PEAK + 1)])
                    .areas(*cell);
            frame.render_widget(
                Sparkline::default()
                    .data(&shown)
                    .style(Style::new().fg(Color::Cyan)),
                spark,
            );
            frame.render_widget(
                Line::from(format!("{peak:>w$} ", w = PEAK as usize)),
                Rect {
                    y: number.y + number.height.saturating_sub(1),
                    height: 1,
                    ..number
                },
            );
        }
    }
}

/// `values` padded with zeros in front to `width`: the newest value at the right edge, so that
/// every VM's line ends at its clock's "now".
fn right_aligned(values: Vec<u64>, width: u16) -> Vec<u64> {
    let pad = (width as usize).saturating_sub(values.len());
    std::iter::repeat_n(0, pad).chain(values).collect()
}

/// p50 / p99 / max of a histogram, in µs.
fn quantiles(h: &Log2Histogram) -> String {
    match (h.quantile(0.5), h.quantile(0.99)) {
        (Some(p50), Some(p99)) => format!(
            "n={} p50≤{:.1}µs p99≤{:.1}µs max {:.1}µs",
            h.count,
            p50 as f64 / 1e3,
            p99 as f64 / 1e3,
            h.max as f64 / 1e3
        ),
        _ => "no samples".into(),
    }
}

/// A log2 histogram as a one-line bar per non-empty bucket range.
fn histogram_lines(title: &str, h: &Log2Histogram, width: u16) -> Vec<Line<'static>> {
    let mut lines = vec![Line::from(vec![
        Span::styled(format!("{title}: "), Style::new().bold()),
        Span::raw(quantiles(h)),
    ])];
    let max = h.buckets.iter().copied().max().unwrap_or(0);
    if max == 0 {
        return lines;
    }
    let bar_width = width.saturating_sub(22).max(4) as u64;
    for (b, &n) in h.buckets.iter().enumerate().filter(|(_, n)| **n > 0) {
        let lo = if b == 0 { 0 } else { 1u64 << b };
        let bar = "█".repeat(((n * bar_width).div_ceil(max)) as usize);
        lines.push(Line::from(format!("{:>9} {bar} {n}", human_ns(lo))));
    }
    lines
}

fn human_ns(ns: u64) -> String {
    match ns {
        n if n >= 1_000_000_000 => format!("{}s", n / 1_000_000_000),
        n if n >= 1_000_000 => format!("{}ms", n / 1_000_000),
        n if n >= 1_000 => format!("{}µs", n / 1_000),
        n => format!("{n}ns"),
    }
}

/// The last `window` per-second values in at most `width` columns: each column the largest
/// of the seconds it covers, so the window's whole span is on screen and +/- changes it.
pub fn fit(values: &[u64], window: usize, width: usize) -> Vec<u64> {
    let tail = &values[values.len().saturating_sub(window.max(1))..];
    let width = width.max(1);
    if tail.len() <= width {
        return tail.to_vec();
    }
    let per = tail.len().div_ceil(width);
    tail.chunks(per)
        .map(|c| c.iter().copied().max().unwrap_or(0))
        .collect()
}

fn render_detail(frame: &mut Frame<'_>, area: Rect, app: &App) {
    let Some(row) = app.selected.and_then(|vm| app.overview.get(vm)) else {
        frame.render_widget(
            Paragraph::new("no VM selected: pick one in the overview").block(Block::bordered()),
            area,
        );
        return;
    };
    let title = if row.name.is_empty() {
        format!(" VM {} ", row.vm)
    } else {
        format!(" VM {} — {} ", row.vm, row.name)
    };
    let outer = Block::bordered().title(format!(
        "{title}— sparklines over the last {} s (+/-) ",
        row.detail.window
    ));
    let inner = outer.inner(area);
    frame.render_widget(outer, area);
    let [sparks, rest] = Layout::vertical([Constraint::Length(6), Constraint::Min(3)]).areas(inner);
    let [s1, s2, s3] = Layout::vertical([Constraint::Length(2); 3]).areas(sparks);
    let d = &row.detail;
    let now = row
        .source
        .and_then(|s| app.clocks.get(&crate::app::SourceKey(s)))
        .map_or(0, |ns| ns / 1_000_000_000);
    for (rect, title, series) in [
        (s1, "pre-population (entries/s)", &d.prepopulation),
        (s2, "root updates (/s)", &d.root_updates),
        (s3, "IOTLB flushes (/s)", &d.iotlb_flushes),
    ] {
        let values = series.values_at(now, d.window);
        let last = values.last().copied().unwrap_or(0);
        let [label, spark] =
            Layout::horizontal([Constraint::Length(34), Constraint::Min(4)]).areas(rect);
        frame.render_widget(
            Line::from(format!("{title:<27}{last:>6}")).style(Style::new().bold()),
            label,
        );
        let shown = fit(&values, row.detail.window, spark.width as usize);
        frame.render_widget(
            Sparkline::default()
                .data(&shown)
                .style(Style::new().fg(Color::Cyan)),
            spark,
        );
    }
    let wide = rest.width >= 120;
    let (left, right) = if wide {
        let [l, r] = Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)])
            .areas(rest);
        (l, Some(r))
    } else {
        (rest, None)
    };
    let s = &row.stats;
    let mut lines = Vec::new();
    lines.extend(histogram_lines("pre-population", &s.prepop_ns, left.width));
    lines.extend(histogram_lines(
        "IOTLB flush",
        &s.iotlb_flush_ns,
        left.width,
    ));
    lines.extend(histogram_lines("DMA map", &s.dma_map_ns, left.width));
    let pinned = s.pinned_pages;
    let [e4k, e2m, e1g] = s.prepop_entries_by_size;
    let covered = e4k + e2m * 512 + e1g * 512 * 512;
    let pct = |n: u64| {
        if covered == 0 {
            0.0
        } else {
            n as f64 * 100.0 / covered as f64
        }
    };
    lines.push(Line::from(vec![
        Span::styled("huge pages: ", Style::new().bold()),
        Span::raw(format!(
            "4K {:.1}% 2M {:.1}% 1G {:.1}% of pre-populated memory; {:.1} MiB pinned",
            pct(e4k),
            pct(e2m * 512),
            pct(e1g * 512 * 512),
            pinned as f64 / 256.0
        )),
    ]));
    lines.push(Line::from(vec![
        Span::styled("sharing: ", Style::new().bold()),
        Span::raw(d.sharing.clone()),
    ]));
    let mut tables = Vec::new();
    // Ages on the VM's source clock (not its last event: a quiet VM's roots still age).
    let now = row
        .source
        .and_then(|s| app.clocks.get(&crate::app::SourceKey(s)).copied())
        .unwrap_or(row.stats.last_ts_ns);
    tables.push(Line::from(Span::styled(
        format!("roots ({}):", d.roots.len()),
        Style::new().bold(),
    )));
    for (id, r) in &d.roots {
        tables.push(Line::from(format!(
            "  #{id} level {} {} age {:.3}s",
            r.level,
            if r.smm { "SMM" } else { "normal" },
            now.saturating_sub(r.since_ns) as f64 / 1e9
        )));
    }
    tables.push(Line::from(Span::styled(
        format!("memslots ({}):", d.memslots.len()),
        Style::new().bold(),
    )));
    for m in d.memslots.values() {
        tables.push(Line::from(format!(
            "  {}:{:<3} {:#011x} {:>9.1} MiB flags {:#x}",
            m.as_id,
            m.slot,
            m.gpa,
            m.size as f64 / (1 << 20) as f64,
            m.flags
        )));
    }
    match right {
        Some(r) => {
            frame.render_widget(Paragraph::new(lines), left);
            frame.render_widget(Paragraph::new(tables).block(Block::new()), r);
        }
        None => {
            lines.extend(tables);
            frame.render_widget(Paragraph::new(lines), left);
        }
    }
}

fn render_log(frame: &mut Frame<'_>, area: Rect, app: &App) {
    let lines = app.visible_log();
    let classes: Vec<String> = CLASSES
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let on = if app.classes.contains(p) { "x" } else { " " };
            format!("{}[{on}]{}", i + 1, p.name())
        })
        .collect();
    let filter = app
        .filter
        .as_ref()
        .map(|f| format!(" /{}/", f.as_str()))
        .unwrap_or_default();
    let block = Block::bordered().title(format!(
        " {} lines{filter} — {} ",
        lines.len(),
        classes.join(" ")
    ));
    let height = block.inner(area).height as usize;
    app.log_height.set(height);
    let end = lines.len().saturating_sub(app.log_offset.min(lines.len()));
    let start = end.saturating_sub(height);
    let shown: Vec<Line<'_>> = lines[start..end]
        .iter()
        .map(|l| Line::from(l.as_str()))
        .collect();
    frame.render_widget(
        Paragraph::new(shown)
            .block(block)
            .scroll((0, app.log_hscroll)),
        area,
    );
}

fn render_probes(frame: &mut Frame<'_>, area: Rect, app: &App) {
    let [table, info] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(3 + app.notes.len().min(6) as u16),
    ])
    .areas(area);
    let rows: Vec<Row<'_>> = app
        .probes
        .iter()
        .map(|p| {
            let color = if p.state == "attached" {
                Color::Green
            } else if p.state.starts_with("absent") {
                Color::DarkGray
            } else {
                Color::Red
            };
            Row::new([
                Cell::from(p.tracepoint.as_str()),
                Cell::from(p.path.as_str()),
                Cell::from(p.state.as_str()).style(Style::new().fg(color)),
            ])
        })
        .collect();
    let title = if app.probes.is_empty() {
        " Probes — none (not a live source) ".to_owned()
    } else {
        format!(
            " Probes — {} of {} attached ",
            app.probes.iter().filter(|p| p.state == "attached").count(),
            app.probes.len()
        )
    };
    frame.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(38),
                Constraint::Length(14),
                Constraint::Min(10),
            ],
        )
        .header(Row::new(["tracepoint", "path", "state"]).style(Style::new().bold()))
        .block(Block::bordered().title(title)),
        table,
    );
    let mut lines = vec![Line::from(format!(
        "ring-buffer drops: {}   sharetop CPU: {:.1}%",
        app.drops, app.cpu_percent
    ))];
    lines.extend(app.notes.iter().map(|n| Line::from(n.as_str())));
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .block(Block::bordered()),
        info,
    );
}

fn render_help(frame: &mut Frame<'_>, area: Rect, app: &App) {
    let keys = [
        "q            quit",
        "?            this help (Esc closes)",
        "Tab / S-Tab  next / previous view",
        "↑ ↓  k j     select a VM; scroll the log",
        "Enter        open the selected VM",
        "Esc          back to the overview",
        "s / S        sort by the next / previous column",
        "space        pause the log",
        "/            filter the log (regex)",
        "1-5          log classes: pre-population, root update, IOMMU, memslot, sharing",
        "+ / -        sparkline window",
        "PgUp PgDn    scroll the log by a page (stops at its start)",
        "← → h l      overview: more columns; log: long lines sideways",
        "n            next event (replay --step)",
        "↑ ↓ PgUp PgDn  (in this help) scroll it",
    ];
    let mut text: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    text.push(String::new());
    text.push("overview columns (rates: per second on the VM's source clock)".into());
    for c in COLUMNS {
        text.push(format!("{:<12} {}", c.title, c.about));
    }
    let w = (text.iter().map(|l| l.chars().count()).max().unwrap_or(40) as u16 + 4).min(area.width);
    let h = (text.len() as u16 + 2).min(area.height);
    let rect = Rect {
        x: area.x + (area.width.saturating_sub(w)) / 2,
        y: area.y + (area.height.saturating_sub(h)) / 2,
        width: w,
        height: h,
    };
    let shown = rect.height.saturating_sub(2) as usize;
    app.help_height.set((shown, text.len()));
    let offset = app.help_offset.min(text.len().saturating_sub(shown));
    let title = if shown < text.len() {
        format!(
            " keys — lines {}–{} of {} (↑↓ PgUp PgDn) ",
            offset + 1,
            (offset + shown).min(text.len()),
            text.len()
        )
    } else {
        " keys ".to_owned()
    };
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(
            text.iter()
                .skip(offset)
                .map(|l| Line::from(l.as_str()))
                .collect::<Vec<_>>(),
        )
        .block(Block::bordered().title(title)),
        rect,
    );
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn the_window_decides_the_span_shown() {
        let v: Vec<u64> = (0..120).collect();
        // 60 s in 30 columns: two seconds a column, the last 60 seconds.
        let f = fit(&v, 60, 30);
        assert_eq!(f.len(), 30);
        assert_eq!((f[0], f[29]), (61, 119));
        // Half the window: one second a column.
        let h = fit(&v, 30, 30);
        assert_eq!((h.len(), h[0]), (30, 90));
        assert_eq!(fit(&v[..5], 60, 30), [0, 1, 2, 3, 4]);
    }
}
