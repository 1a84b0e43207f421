//! sharetop's state and everything that changes it: `App::update(Action)`, pure (no terminal,
//! no clock, no I/O), so every behaviour is a unit test.

use std::collections::{BTreeSet, VecDeque};

use regex::Regex;
use tdpshare::event::{Event, EventKind, Path, VmId};

use crate::overview::{COLUMNS, Overview};

/// The views, in Tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Overview,
    Detail,
    Log,
    Probes,
}

impl View {
    pub const ALL: [View; 4] = [View::Overview, View::Detail, View::Log, View::Probes];

    pub fn title(self) -> &'static str {
        match self {
            View::Overview => "Overview",
            View::Detail => "VM detail",
            View::Log => "Event log",
            View::Probes => "Probes",
        }
    }

    fn step(self, by: isize) -> View {
        let i = View::ALL.iter().position(|v| *v == self).unwrap_or(0) as isize;
        View::ALL[(i + by).rem_euclid(View::ALL.len() as isize) as usize]
    }
}

/// One row of the probe status table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRow {
    pub tracepoint: String,
    pub path: String,
    pub state: String,
}

/// Everything that can happen to the app.
#[derive(Debug, Clone)]
pub enum Action {
    Event(Event),
    /// A name for a VM (its VMM's `-name`, or the simulator's mode).
    VmName(VmId, String),
    Probes(Vec<ProbeRow>),
    /// Records the kernel's ring buffer dropped so far.
    Drops(u64),
    /// A message for the user (not root, a source ended, …).
    Note(String),
    /// A source failed (bad input, a crashed worker): shown, and sharetop exits non-zero.
    Failed(String),
    /// sharetop's own CPU use, percent of one core.
    SelfCpu(f64),
    /// A source's clock reads this (ns, the clock its events are stamped with). In the
    /// interactive view a tick samples the rates of that source's VMs.
    Tick(tdpshare::Source, u64),
    /// How far a replay or simulation has played, 0.0–1.0 (of the trace file's bytes, or of
    /// the simulated events).
    Progress(tdpshare::Source, f64),
    /// Sample every source's rates now (headless: at each print, so rates cover the printed
    /// interval).
    Sample,
    Quit,
    NextView,
    PrevView,
    Up,
    Down,
    PageUp,
    PageDown,
    /// Scroll the log left / right.
    Left,
    Right,
    Enter,
    Back,
    /// Sort by the next (or previous) column.
    SortNext,
    SortPrev,
    TogglePause,
    ToggleHelp,
    FilterStart,
    FilterInput(char),
    FilterBackspace,
    FilterApply,
    FilterCancel,
    /// Show or hide one class of events in the log.
    ToggleClass(Path),
    /// Sparkline window in seconds.
    SetWindow(usize),
}

/// A value's name as the trace format spells it (`memslot_change`, not `MemslotChange`).
pub use tdpshare::event::trace::name_of as tag;

/// A source's name as the trace format spells it.
pub fn source_name(s: tdpshare::Source) -> &'static str {
    match s {
        tdpshare::Source::Live => "live",
        tdpshare::Source::Simulator => "simulator",
        tdpshare::Source::Replay => "replay",
    }
}

/// A [`tdpshare::Source`] as a map key (ordered: live, simulator, replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceKey(pub tdpshare::Source);

impl SourceKey {
    fn rank(self) -> u8 {
        match self.0 {
            tdpshare::Source::Live => 0,
            tdpshare::Source::Simulator => 1,
            tdpshare::Source::Replay => 2,
        }
    }
}

impl PartialOrd for SourceKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SourceKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

/// The event classes, in the order of their toggle keys (1–5).
pub const CLASSES: [Path; 5] = [
    Path::Prepopulation,
    Path::RootUpdate,
    Path::Iommu,
    Path::Memslot,
    Path::Sharing,
];

/// sharetop's state.
#[derive(Debug)]
pub struct App {
    pub overview: Overview,
    pub view: View,
    /// The selected VM, kept by id across refreshes and re-sorting.
    pub selected: Option<VmId>,
    /// Index into [`COLUMNS`] of the sort column; 0 (vm) sorts by VM id.
    pub sort: usize,
    /// The event log: one ring per VM (with its arrival number), so one VM's flood never
    /// pushes another's events out.
    pub log: std::collections::BTreeMap<VmId, VecDeque<(u64, Event)>>,
    log_seq: u64,
    /// Events kept per VM.
    pub log_capacity: usize,
    /// Lines the log view showed last (set by the renderer): paging stops at the first page.
    pub log_height: std::cell::Cell<usize>,
    /// Columns the log is scrolled right (←/→).
    pub log_hscroll: u16,
    /// Overview columns scrolled past, after VM and name (←/→).
    pub col_offset: usize,
    /// Lines scrolled up from the newest.
    pub log_offset: usize,
    pub paused: bool,
    pub filter: Option<Regex>,
    /// The filter being typed, while `/` is active.
    pub filter_input: Option<String>,
    pub filter_error: Option<String>,
    pub classes: BTreeSet<Path>,
    pub help: bool,
    /// Lines the help is scrolled down (↑/↓, PgUp/PgDn while it is open).
    pub help_offset: usize,
    /// Lines the help showed last and has in all (set by the renderer): scrolling stops at
    /// its end.
    pub help_height: std::cell::Cell<(usize, usize)>,
    pub quit: bool,
    pub probes: Vec<ProbeRow>,
    pub drops: u64,
    pub notes: Vec<String>,
    /// What failed (also among the notes); any makes sharetop's exit code non-zero.
    pub failures: Vec<String>,
    pub cpu_percent: f64,
    pub window: usize,
    /// Where the events come from, for the header.
    pub source: String,
    pub events: u64,
    /// Each source's clock: the latest of its ticks and event times.
    pub clocks: std::collections::BTreeMap<SourceKey, u64>,
    /// Ticks sample rates (the interactive view); headless samples at each print instead.
    pub sample_on_tick: bool,
    /// How far each replay or simulation has played, 0.0–1.0.
    pub progress: std::collections::BTreeMap<SourceKey, f64>,
}

impl App {
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            overview: Overview::default(),
            view: View::Overview,
            selected: None,
            sort: 0,
            log: std::collections::BTreeMap::new(),
            log_seq: 0,
            log_capacity: 10_000,
            log_height: std::cell::Cell::new(20),
            log_hscroll: 0,
            col_offset: 0,
            log_offset: 0,
            paused: false,
            filter: None,
            filter_input: None,
            filter_error: None,
            classes: CLASSES.into_iter().collect(),
            help: false,
            help_offset: 0,
            help_height: std::cell::Cell::new((20, 0)),
            quit: false,
            probes: Vec::new(),
            drops: 0,
            notes: Vec::new(),
            failures: Vec::new(),
            cpu_percent: 0.0,
            window: 60,
            source: source.into(),
            events: 0,
            clocks: std::collections::BTreeMap::new(),
            sample_on_tick: true,
            progress: std::collections::BTreeMap::new(),
        }
    }

    /// The three paths summed over every VM: pre-populations, new roots, fast zaps, IOTLB
    /// flushes.
    pub fn totals(&self) -> [(&'static str, u64); 4] {
        let mut t = [0u64; 4];
        for r in self.overview.rows(None) {
            let s = &r.stats;
            for (acc, v) in t.iter_mut().zip([
                s.prepopulations,
                s.root_updates(),
                s.fast_zaps,
                s.iotlb_flushes,
            ]) {
                *acc += v;
            }
        }
        [
            ("prepops", t[0]),
            ("roots", t[1]),
            ("fast zaps", t[2]),
            ("flushes", t[3]),
        ]
    }

    /// Probe health: attached, of how many, and how many failed or were denied (absent ones —
    /// tracepoints this kernel does not have — are no fault).
    pub fn probe_health(&self) -> (usize, usize, usize) {
        let attached = self.probes.iter().filter(|p| p.state == "attached").count();
        let bad = self
            .probes
            .iter()
            .filter(|p| p.state.starts_with("failed") || p.state.starts_with("denied"))
            .count();
        (attached, self.probes.len(), bad)
    }

    /// Scrolls the help `by` lines (negative: up), within its length.
    fn scroll_help(&mut self, by: isize) {
        let (shown, total) = self.help_height.get();
        let max = total.saturating_sub(shown.max(1));
        self.help_offset = self.help_offset.saturating_add_signed(by).min(max);
    }

    /// The sort column, `None` for the VM id order.
    pub fn sort_column(&self) -> Option<&'static crate::overview::Column> {
        (self.sort > 0).then(|| &COLUMNS[self.sort])
    }

    /// VM ids in display order.
    pub fn order(&self) -> Vec<VmId> {
        self.overview
            .rows(self.sort_column())
            .iter()
            .map(|r| r.vm)
            .collect()
    }

    /// The log lines that pass the class toggles and the filter, oldest first.
    /// Events held in the log, over all VMs.
    pub fn log_len(&self) -> usize {
        self.log.values().map(VecDeque::len).sum()
    }

    /// The log's lines after the class toggles and the filter, oldest first (all VMs' rings
    /// merged in arrival order).
    pub fn visible_log(&self) -> Vec<String> {
        let mut all: Vec<&(u64, Event)> = self.log.values().flatten().collect();
        all.sort_unstable_by_key(|(seq, _)| *seq);
        all.into_iter()
            .map(|(_, e)| e)
            .filter(|e| self.classes.contains(&e.kind.path()))
            .map(|e| {
                log_line(
                    e,
                    &self
                        .overview
                        .get(e.vm)
                        .map(|r| r.name.clone())
                        .unwrap_or_default(),
                )
            })
            .filter(|l| self.filter.as_ref().is_none_or(|re| re.is_match(l)))
            .collect()
    }

    /// Scrolls the log `by` lines back, stopping where the oldest line tops the page.
    fn scroll_log(&mut self, by: usize) {
        let lines = self.visible_log().len();
        let max = lines.saturating_sub(self.log_height.get().max(1));
        self.log_offset = self.log_offset.saturating_add(by).min(max);
    }

    fn move_selection(&mut self, by: isize) {
        let order = self.order();
        if order.is_empty() {
            return;
        }
        let at = self
            .selected
            .and_then(|id| order.iter().position(|&v| v == id))
            .map_or(0, |i| {
                (i as isize + by).clamp(0, order.len() as isize - 1) as usize
            });
        self.selected = Some(order[at]);
    }

    pub fn update(&mut self, action: Action) {
        if self.filter_input.is_some() {
            // While typing a filter, keys edit it.
            match action {
                Action::FilterInput(c) => {
                    self.filter_input.get_or_insert_default().push(c);
                    return;
                }
                Action::FilterBackspace => {
                    if let Some(s) = self.filter_input.as_mut() {
                        s.pop();
                    }
                    return;
                }
                Action::FilterApply => {
                    let text = self.filter_input.take().unwrap_or_default();
                    if text.is_empty() {
                        self.filter = None;
                        self.filter_error = None;
                    } else {
                        match Regex::new(&text) {
                            Ok(re) => {
                                self.filter = Some(re);
                                self.filter_error = None;
                            }
                            Err(e) => {
                                self.filter_error = Some(format!("bad filter {text:?}: {e}"));
                            }
                        }
                    }
                    self.log_offset = 0;
                    return;
                }
                Action::FilterCancel => {
                    self.filter_input = None;
                    return;
                }
                _ => {}
            }
        }
        match action {
            Action::Event(e) => {
                self.events += 1;
                if let EventKind::VmName { name } = &e.kind {
                    self.overview.set_name(e.vm, name);
                }
                let clock = self.clocks.entry(SourceKey(e.source)).or_insert(0);
                *clock = (*clock).max(e.ts_ns);
                self.overview.record(&e);
                if self.selected.is_none() {
                    self.selected = Some(e.vm);
                }
                if !self.paused {
                    let ring = self.log.entry(e.vm).or_default();
                    ring.push_back((self.log_seq, e));
                    self.log_seq += 1;
                    while ring.len() > self.log_capacity {
                        ring.pop_front();
                    }
                }
            }
            Action::VmName(vm, name) => self.overview.set_name(vm, &name),
            Action::Probes(rows) => self.probes = rows,
            Action::Drops(n) => self.drops = n,
            Action::Note(n) => {
                if !self.notes.contains(&n) {
                    self.notes.push(n);
                }
            }
            Action::Failed(f) => {
                let n = format!("FAILED: {f}");
                if !self.notes.contains(&n) {
                    self.notes.push(n);
                }
                self.failures.push(f);
            }
            Action::SelfCpu(p) => self.cpu_percent = p,
            Action::Tick(source, now) => {
                let clock = self.clocks.entry(SourceKey(source)).or_insert(0);
                *clock = (*clock).max(now);
                if self.sample_on_tick {
                    self.overview.sample(source, *clock);
                }
            }
            Action::Progress(source, done) => {
                self.progress
                    .insert(SourceKey(source), done.clamp(0.0, 1.0));
            }
            Action::Sample => {
                for (k, &now) in &self.clocks {
                    self.overview.sample(k.0, now);
                }
            }
            Action::Quit => self.quit = true,
            Action::NextView => self.view = self.view.step(1),
            Action::PrevView => self.view = self.view.step(-1),
            Action::Up if self.help => self.scroll_help(-1),
            Action::Down if self.help => self.scroll_help(1),
            Action::PageUp if self.help => {
                self.scroll_help(-(self.help_height.get().0.max(1) as isize));
            }
            Action::PageDown if self.help => {
                self.scroll_help(self.help_height.get().0.max(1) as isize);
            }
            Action::Up => match self.view {
                View::Log => self.scroll_log(1),
                _ => self.move_selection(-1),
            },
            Action::Down => match self.view {
                View::Log => self.log_offset = self.log_offset.saturating_sub(1),
                _ => self.move_selection(1),
            },
            Action::PageUp => self.scroll_log(self.log_height.get().max(1)),
            Action::PageDown => {
                self.log_offset = self.log_offset.saturating_sub(self.log_height.get().max(1));
            }
            Action::Left => match self.view {
                View::Log => self.log_hscroll = self.log_hscroll.saturating_sub(8),
                _ => self.col_offset = self.col_offset.saturating_sub(1),
            },
            Action::Right => match self.view {
                View::Log => self.log_hscroll = self.log_hscroll.saturating_add(8).min(400),
                _ => self.col_offset = (self.col_offset + 1).min(COLUMNS.len().saturating_sub(3)),
            },
            Action::Enter => {
                if self.view == View::Overview && self.selected.is_some() {
                    self.view = View::Detail;
                }
            }
            Action::Back => {
                if self.help {
                    self.help = false;
                } else {
                    self.view = View::Overview;
                }
            }
            Action::SortNext => self.sort = (self.sort + 1) % COLUMNS.len(),
            Action::SortPrev => self.sort = (self.sort + COLUMNS.len() - 1) % COLUMNS.len(),
            Action::TogglePause => self.paused = !self.paused,
            Action::ToggleHelp => {
                self.help = !self.help;
                self.help_offset = 0;
            }
            Action::FilterStart => {
                self.view = View::Log;
                self.filter_input = Some(
                    self.filter
                        .as_ref()
                        .map(|r| r.as_str().to_owned())
                        .unwrap_or_default(),
                );
            }
            Action::ToggleClass(p) => {
                if !self.classes.remove(&p) {
                    self.classes.insert(p);
                }
            }
            Action::SetWindow(w) => {
                self.window = w.clamp(10, 3600);
                self.overview.set_window(self.window);
            }
            Action::FilterInput(_)
            | Action::FilterBackspace
            | Action::FilterApply
            | Action::FilterCancel => {}
        }
    }
}

/// One event as a log line: time, VM, event name and its fields.
pub fn log_line(e: &Event, name: &str) -> String {
    let t = e.ts_ns as f64 / 1e9;
    let who = if name.is_empty() {
        format!("vm {}", e.vm)
    } else {
        format!("vm {} ({name})", e.vm)
    };
    let vcpu = e.vcpu.map(|v| format!(" vcpu {v}")).unwrap_or_default();
    let detail = match &e.kind {
        EventKind::PrepopulateStart {
            range,
            page_size,
            cause,
        } => {
            format!(
                "{:#x}+{:#x} {page_size} {}",
                range.start,
                range.size,
                tag(cause)
            )
        }
        EventKind::PrepopulateEnd {
            range,
            page_size,
            cause,
            entries,
            ns,
            ..
        } => format!(
            "{:#x}+{:#x} {page_size} {} entries={entries} {:.3}ms",
            range.start,
            range.size,
            tag(cause),
            *ns as f64 / 1e6
        ),
        EventKind::RootAlloc(r) | EventKind::RootSwitch(r) | EventKind::RootFree(r) => format!(
            "root={} level={} smm={} cause={}",
            r.root,
            r.level,
            r.smm,
            tag(&r.cause)
        ),
        EventKind::FastZap { generation, pages } => format!("gen={generation} pages={pages}"),
        EventKind::Zap {
            range,
            tables,
            entries,
        } => {
            format!(
                "{:#x}+{:#x} tables={tables} entries={entries}",
                range.start, range.size
            )
        }
        EventKind::HugePageSplit { gfn, level } | EventKind::HugePageCollapse { gfn, level } => {
            format!("gfn={gfn:#x} level={level}")
        }
        EventKind::SpteSet {
            gfn,
            level,
            old,
            new,
        } => {
            format!("gfn={gfn:#x} level={level} {old} -> {new}")
        }
        EventKind::PageFault { gfn, error_code } => format!("gfn={gfn:#x} error={error_code:#x}"),
        EventKind::IommuMap { iova, size, ns } | EventKind::IommuUnmap { iova, size, ns } => {
            format!("iova={iova:#x} size={size:#x} {:.3}ms", *ns as f64 / 1e6)
        }
        EventKind::IotlbFlush {
            scope,
            domain,
            range,
            ns,
        } => format!(
            "{}{}{} {}ns",
            tag(scope),
            domain.map(|d| format!(" domain={d}")).unwrap_or_default(),
            range
                .map(|r| format!(" {:#x}+{:#x}", r.start, r.size))
                .unwrap_or_default(),
            ns
        ),
        EventKind::Pin { range, pages } | EventKind::Unpin { range, pages } => {
            format!("{:#x}+{:#x} pages={pages}", range.start, range.size)
        }
        EventKind::MemslotAdd(s) | EventKind::MemslotDelete(s) => format!(
            "slot={} as={} gpa={:#x} size={:#x} flags={:#x}",
            s.slot, s.as_id, s.gpa, s.size, s.flags
        ),
        EventKind::MemslotMove { old_gpa, slot } => {
            format!("slot={} {old_gpa:#x} -> {:#x}", slot.slot, slot.gpa)
        }
        EventKind::MemslotFlags { old_flags, slot } => {
            format!(
                "slot={} flags {old_flags:#x} -> {:#x}",
                slot.slot, slot.flags
            )
        }
        EventKind::SharingRequested { mode } => format!("mode={mode}"),
        EventKind::SharingStarted { mode, handle } => format!("mode={mode} handle={handle}"),
        EventKind::SharingStopped { mode, unpinned } => format!("mode={mode} unpinned={unpinned}"),
        EventKind::SharingRefused { mode, reason } => format!("mode={mode} {reason}"),
        EventKind::IoPageFault {
            iova,
            write,
            resolved,
        } => {
            format!("iova={iova:#x} write={write} resolved={resolved}")
        }
        EventKind::SmmTransition { enter } => (if *enter { "enter" } else { "leave" }).to_string(),
        EventKind::CrWrite { cr, value } => match value {
            Some(v) => format!("cr{cr}={v:#x}"),
            None => format!("cr{cr}=?"),
        },
        EventKind::VmName { name } => format!("{name:?}"),
    };
    format!("{t:>12.6} {who}{vcpu} {} {detail}", e.kind.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdpshare::event::{GpaRange, Memslot, Source};

    fn pin(vm: VmId, pages: u64) -> Action {
        Action::Event(Event::new(
            0,
            vm,
            Source::Live,
            EventKind::Pin {
                range: GpaRange::new(tdpshare::Gpa(0), pages << 12),
                pages,
            },
        ))
    }

    fn slot(vm: VmId, ts: u64) -> Action {
        Action::Event(Event::new(
            ts,
            vm,
            Source::Live,
            EventKind::MemslotAdd(Memslot {
                slot: 1,
                as_id: 0,
                gpa: tdpshare::Gpa(0x1000),
                size: 0x2000,
                flags: 0,
                ua: 0,
            }),
        ))
    }

    fn col(name: &str) -> usize {
        COLUMNS.iter().position(|c| c.name == name).unwrap()
    }

    #[test]
    fn sorting_keeps_the_selected_vm() {
        let mut app = App::new("test");
        for (vm, pages) in [(10, 5), (20, 500), (30, 50)] {
            app.update(pin(vm, pages));
        }
        assert_eq!(app.order(), vec![10, 20, 30]);
        app.update(Action::Down);
        assert_eq!(app.selected, Some(20));
        while COLUMNS[app.sort].name != "pinned_mib" {
            app.update(Action::SortNext);
        }
        assert_eq!(app.order(), vec![20, 30, 10]);
        assert_eq!(
            app.selected,
            Some(20),
            "selection follows the VM, not the row"
        );
        app.update(Action::Down);
        assert_eq!(app.selected, Some(30));
        app.update(Action::Down);
        app.update(Action::Down);
        assert_eq!(app.selected, Some(10), "clamped at the end");
        app.update(Action::SortPrev);
        assert_eq!(app.sort, col("pinned_mib") - 1);
    }

    #[test]
    fn filtering_by_regex_and_class() {
        let mut app = App::new("test");
        app.update(pin(1, 8));
        app.update(slot(2, 5));
        assert_eq!(app.visible_log().len(), 2);
        app.update(Action::FilterStart);
        assert_eq!(app.view, View::Log);
        for c in "vm 2 .*memslot_".chars() {
            app.update(Action::FilterInput(c));
        }
        // Keys edit the filter while it is typed: 'q' does not quit.
        app.update(Action::FilterInput('q'));
        app.update(Action::FilterBackspace);
        assert!(!app.quit);
        app.update(Action::FilterApply);
        let lines = app.visible_log();
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("memslot_add"), "{lines:?}");
        app.update(Action::ToggleClass(Path::Memslot));
        assert!(app.visible_log().is_empty());
        app.update(Action::ToggleClass(Path::Memslot));
        // A bad regex is reported, and the previous filter stays.
        app.update(Action::FilterStart);
        app.update(Action::FilterBackspace);
        for c in "(".chars() {
            app.update(Action::FilterInput(c));
        }
        app.update(Action::FilterApply);
        assert!(app.filter_error.as_deref().unwrap().contains("bad filter"));
        assert_eq!(app.visible_log().len(), 1);
    }

    #[test]
    fn pause_freezes_the_log_not_the_totals() {
        let mut app = App::new("test");
        app.update(slot(1, 1));
        app.update(Action::TogglePause);
        app.update(slot(1, 2));
        assert_eq!(app.log_len(), 1);
        assert_eq!(app.overview.get(1).unwrap().stats.memslot_ops, 2);
        app.update(Action::TogglePause);
        app.update(slot(1, 3));
        assert_eq!(app.log_len(), 2);
    }

    #[test]
    fn a_flood_from_one_vm_keeps_the_others_log() {
        let mut app = App::new("demo");
        app.log_capacity = 100;
        app.update(slot(1, 0));
        for ts in 0..1000 {
            app.update(pin(2, ts));
        }
        let lines = app.visible_log();
        assert_eq!(lines.len(), 101);
        assert!(lines[0].contains("vm 1"), "{}", lines[0]);
        // Paging back stops at the first page.
        app.update(Action::NextView);
        app.update(Action::NextView);
        assert_eq!(app.view, View::Log);
        app.log_height.set(20);
        for _ in 0..50 {
            app.update(Action::PageUp);
        }
        assert_eq!(app.log_offset, 81);
        app.update(Action::Up);
        assert_eq!(app.log_offset, 81);
        app.update(Action::PageDown);
        assert_eq!(app.log_offset, 61);
    }

    #[test]
    fn views_cycle_and_enter_opens_the_detail() {
        let mut app = App::new("test");
        app.update(Action::Enter);
        assert_eq!(app.view, View::Overview, "nothing to open");
        app.update(pin(7, 1));
        app.update(Action::Enter);
        assert_eq!(app.view, View::Detail);
        app.update(Action::NextView);
        assert_eq!(app.view, View::Log);
        app.update(Action::NextView);
        app.update(Action::NextView);
        assert_eq!(app.view, View::Overview);
        app.update(Action::PrevView);
        assert_eq!(app.view, View::Probes);
        app.update(Action::ToggleHelp);
        app.update(Action::Back);
        assert!(!app.help);
        assert_eq!(app.view, View::Probes);
        app.update(Action::Back);
        assert_eq!(app.view, View::Overview);
        app.update(Action::Quit);
        assert!(app.quit);
    }

    #[test]
    fn window_and_rates() {
        let mut app = App::new("test");
        app.update(Action::SetWindow(5));
        assert_eq!(app.window, 10, "at least 10 s");
        app.update(Action::Tick(Source::Live, 0));
        for ts in 0..4 {
            app.update(slot(1, ts));
        }
        app.update(Action::Tick(Source::Live, 2_000_000_000));
        let row = app.overview.get(1).unwrap();
        assert_eq!(row.rates.memslot_ops, 2.0, "4 ops over 2 s");
        app.update(Action::Tick(Source::Live, 4_000_000_000));
        assert_eq!(app.overview.get(1).unwrap().rates.memslot_ops, 0.0);
    }

    #[test]
    fn each_source_keeps_its_own_clock() {
        // The demo: a live guest (clock: seconds since the probes started) next to a simulation
        // whose clock runs far ahead. 8 live events in the live clock's first second are 8/s.
        let mut app = App::new("demo");
        for i in 0..8 {
            app.update(slot(1, 100_000_000 + i * 100_000_000));
        }
        let sim = |ts: u64| {
            Action::Event(Event::new(
                ts,
                2,
                Source::Simulator,
                EventKind::FastZap {
                    generation: ts,
                    pages: 0,
                },
            ))
        };
        for t in 0..50u64 {
            app.update(sim(t * 200_000_000));
            app.update(Action::Tick(Source::Simulator, t * 200_000_000));
        }
        app.update(Action::Tick(Source::Live, 1_000_000_000));
        let live = app.overview.get(1).unwrap();
        assert!(
            (live.rates.memslot_ops - 8.0 / 0.9).abs() < 1e-9,
            "{}",
            live.rates.memslot_ops
        );
        // The simulated VM's rate is over its own clock: 1 root update per 0.2 s is 0 roots
        // (fast zaps are not root updates) and its memslot rate stays 0.
        assert_eq!(app.overview.get(2).unwrap().rates.memslot_ops, 0.0);
    }

    #[test]
    fn headless_samples_cover_the_printed_interval() {
        let mut app = App::new("replay");
        app.sample_on_tick = false;
        for ts in 0..10u64 {
            app.update(slot(1, ts * 100_000_000));
        }
        // Ticks alone sample nothing headless.
        app.update(Action::Tick(Source::Live, 900_000_000));
        assert_eq!(app.overview.get(1).unwrap().rates.memslot_ops, 0.0);
        // `--once`: one sample at the end, over the VM's whole span (10 events in 0.9 s).
        app.update(Action::Sample);
        let r = app.overview.get(1).unwrap().rates.memslot_ops;
        assert!((r - 10.0 / 0.9).abs() < 1e-9, "{r}");
        // The next print: 5 more in the following second.
        for ts in 0..5u64 {
            app.update(slot(1, 1_000_000_000 + ts * 100_000_000));
        }
        app.update(Action::Tick(Source::Live, 1_900_000_000));
        app.update(Action::Sample);
        assert_eq!(app.overview.get(1).unwrap().rates.memslot_ops, 5.0);
    }
}
