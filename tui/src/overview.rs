//! The overview: one row per VM with the totals of the three seed paths.
//!
//! The columns defined here are the only ones: the TUI, `--format table`, `csv` and `json` all
//! use [`COLUMNS`], so a field has the same name everywhere.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use tdpshare::VmStats;
use tdpshare::event::{Event, VmId};

/// A value in a column: counts stay integers, durations and sizes are shown with a unit.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Count(u64),
    /// Milliseconds, from nanoseconds.
    Millis(u64),
    /// Mebibytes, from 4 KiB pages.
    MiB(u64),
    /// Per second.
    Rate(f64),
    Text(String),
}

impl Value {
    pub fn text(&self) -> String {
        match self {
            Value::Count(n) => n.to_string(),
            Value::Millis(ns) => format!("{:.3}", *ns as f64 / 1e6),
            Value::MiB(pages) => format!("{:.1}", *pages as f64 / 256.0),
            Value::Rate(r) => format!("{r:.1}"),
            Value::Text(t) => t.clone(),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            Value::Count(n) => (*n).into(),
            Value::Millis(ns) => (*ns as f64 / 1e6).into(),
            Value::MiB(pages) => (*pages as f64 / 256.0).into(),
            Value::Rate(r) => (*r).into(),
            Value::Text(t) => t.clone().into(),
        }
    }

    /// Text sorts after numbers, alphabetically.
    fn sort_key(&self) -> (u64, String) {
        match self {
            Value::Count(n) | Value::Millis(n) | Value::MiB(n) => (*n, String::new()),
            Value::Rate(r) => ((r * 1000.0) as u64, String::new()),
            Value::Text(t) => (0, t.clone()),
        }
    }

    /// Numbers align right, text left.
    pub fn is_text(&self) -> bool {
        matches!(self, Value::Text(_))
    }
}

/// Per-second rates over the last sample interval of the VM's source clock.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub prepopulations: f64,
    pub entries: f64,
    pub root_updates: f64,
    pub iotlb_flushes: f64,
    pub dma_maps: f64,
    pub memslot_ops: f64,
}

/// The counters rates are computed from.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counters([u64; 6]);

impl Counters {
    fn of(s: &VmStats) -> Self {
        Counters([
            s.prepopulations,
            s.prepop_entries,
            s.root_updates(),
            s.iotlb_flushes,
            s.dma_maps,
            s.memslot_ops,
        ])
    }
}

/// One column: its field name (TUI header, CSV header, JSON key) and how to get it.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Field name: CSV header, JSON key, `--sort`.
    pub name: &'static str,
    /// The interactive view's header (short, with units); `?` lists them with `about`.
    pub title: &'static str,
    pub about: &'static str,
    pub value: fn(&VmRow) -> Value,
}

pub const COLUMNS: &[Column] = &[
    Column {
        name: "vm",
        title: "VM",
        about: "the VM: its VMM's pid live, the simulator's VM number",
        value: |r| Value::Count(r.vm),
    },
    Column {
        name: "name",
        title: "name",
        about: "the VMM's -name, or the simulator's mode",
        value: |r| Value::Text(r.name.clone()),
    },
    Column {
        name: "prepops",
        title: "prepops",
        about: "pre-populations (full and partial)",
        value: |r| Value::Count(r.stats.prepopulations),
    },
    Column {
        name: "prepops_per_s",
        title: "/s",
        about: "pre-populations per second",
        value: |r| Value::Rate(r.rates.prepopulations),
    },
    Column {
        name: "roots",
        title: "roots",
        about: "new roots (root updates the IOMMU must follow)",
        value: |r| Value::Count(r.stats.root_updates()),
    },
    Column {
        name: "roots_per_s",
        title: "/s",
        about: "new roots per second",
        value: |r| Value::Rate(r.rates.root_updates),
    },
    Column {
        name: "fast_zaps",
        title: "zaps",
        about: "fast zaps: all roots invalidated at once",
        value: |r| Value::Count(r.stats.fast_zaps),
    },
    Column {
        name: "iotlb_flushes",
        title: "flushes",
        about: "IOTLB flushes",
        value: |r| Value::Count(r.stats.iotlb_flushes),
    },
    Column {
        name: "flushes_per_s",
        title: "/s",
        about: "IOTLB flushes per second",
        value: |r| Value::Rate(r.rates.iotlb_flushes),
    },
    Column {
        name: "pinned_mib",
        title: "pinned MiB",
        about: "memory pinned for DMA now",
        value: |r| Value::MiB(r.stats.pinned_pages),
    },
    Column {
        name: "entries",
        title: "entries",
        about: "table entries pre-population wrote",
        value: |r| Value::Count(r.stats.prepop_entries),
    },
    Column {
        name: "prepop_ms",
        title: "prepop ms",
        about: "time in pre-population",
        value: |r| Value::Millis(r.stats.prepop_total_ns()),
    },
    Column {
        name: "splits",
        title: "splits",
        about: "huge-page splits",
        value: |r| Value::Count(r.stats.splits),
    },
    Column {
        name: "dma_maps",
        title: "maps",
        about: "DMA map calls",
        value: |r| Value::Count(r.stats.dma_maps),
    },
    Column {
        name: "dma_unmaps",
        title: "unmaps",
        about: "DMA unmap calls",
        value: |r| Value::Count(r.stats.dma_unmaps),
    },
    Column {
        name: "iopf",
        title: "IOPF",
        about: "IO page faults",
        value: |r| Value::Count(r.stats.io_page_faults),
    },
    Column {
        name: "memslot_ops",
        title: "memslots",
        about: "memslot changes",
        value: |r| Value::Count(r.stats.memslot_ops),
    },
    Column {
        name: "sharing",
        title: "sharing",
        about: "sharing state: requested, granted, refused <mode>: <why>, stopped",
        value: |r| Value::Text(r.detail.sharing.clone()),
    },
];

/// One VM's row.
#[derive(Debug, Clone, Default)]
pub struct VmRow {
    pub vm: VmId,
    /// From the VMM's command line (`-name`), the simulator's mode, or empty.
    pub name: String,
    pub stats: VmStats,
    pub detail: crate::detail::VmDetail,
    pub rates: Rates,
    /// The clock the VM's events run on (the source that reported it).
    pub source: Option<tdpshare::Source>,
    last: Counters,
    /// The source-clock time of the last sample (`None`: none yet — the first sample measures
    /// from the VM's first event).
    last_at: Option<u64>,
}

/// Every VM seen, keyed by VM id.
#[derive(Debug, Clone, Default)]
pub struct Overview {
    rows: BTreeMap<VmId, VmRow>,
}

impl Overview {
    pub fn record(&mut self, event: &Event) {
        let row = self.rows.entry(event.vm).or_insert_with(|| VmRow {
            vm: event.vm,
            ..VmRow::default()
        });
        row.source.get_or_insert(event.source);
        row.stats.record(event);
        row.detail.record(event);
    }

    /// Names VM `vm` (creating its row).
    pub fn set_name(&mut self, vm: VmId, name: &str) {
        let row = self.rows.entry(vm).or_insert_with(|| VmRow {
            vm,
            ..VmRow::default()
        });
        row.name = name.to_owned();
    }

    /// Samples the rates of the VMs whose events come from `source`, whose clock reads `now_ns`:
    /// each over the time since its previous sample (or since its first event). VMs of other
    /// sources keep their rates: every source has its own clock.
    pub fn sample(&mut self, source: tdpshare::Source, now_ns: u64) {
        for row in self.rows.values_mut().filter(|r| r.source == Some(source)) {
            let since = row.last_at.or(row.stats.first_ts_ns).unwrap_or(now_ns);
            let Some(dt) = now_ns.checked_sub(since).filter(|&d| d > 0) else {
                continue;
            };
            let secs = dt as f64 / 1e9;
            let now = Counters::of(&row.stats);
            let d: Vec<f64> = now
                .0
                .iter()
                .zip(row.last.0.iter())
                .map(|(a, b)| a.saturating_sub(*b) as f64 / secs)
                .collect();
            row.rates = Rates {
                prepopulations: d[0],
                entries: d[1],
                root_updates: d[2],
                iotlb_flushes: d[3],
                dma_maps: d[4],
                memslot_ops: d[5],
            };
            row.last = now;
            row.last_at = Some(now_ns);
        }
    }

    /// Sparkline window, seconds.
    pub fn set_window(&mut self, window: usize) {
        for row in self.rows.values_mut() {
            row.detail.window = window;
        }
    }

    pub fn get(&self, vm: VmId) -> Option<&VmRow> {
        self.rows.get(&vm)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Rows sorted by `column` (descending, ties by VM id), or by VM id when `None`.
    pub fn rows(&self, column: Option<&Column>) -> Vec<&VmRow> {
        let mut rows: Vec<_> = self.rows.values().collect();
        if let Some(c) = column {
            rows.sort_by(|a, b| {
                (c.value)(b)
                    .sort_key()
                    .cmp(&(c.value)(a).sort_key())
                    .then(a.vm.cmp(&b.vm))
            });
        }
        rows
    }

    /// The counts `--interval` rows report deltas of: (column, value).
    pub fn delta_counts(r: &VmRow) -> [(&'static str, u64); 4] {
        [
            ("prepops", r.stats.prepopulations),
            ("roots", r.stats.root_updates()),
            ("fast_zaps", r.stats.fast_zaps),
            ("iotlb_flushes", r.stats.iotlb_flushes),
        ]
    }

    /// The cells: column names and one row of values per VM; with `interval`, a leading `time`
    /// and trailing `d_<count>` columns (the change since the previous print, as kvm_stat -l).
    fn grid(
        &self,
        column: Option<&Column>,
        interval: Option<&Interval>,
    ) -> (Vec<String>, Vec<Vec<Value>>) {
        let mut names: Vec<String> = Vec::new();
        if interval.is_some() {
            names.push("time".into());
        }
        names.extend(COLUMNS.iter().map(|c| c.name.to_owned()));
        if interval.is_some() {
            names.extend(
                ["prepops", "roots", "fast_zaps", "iotlb_flushes"]
                    .iter()
                    .map(|n| format!("d_{n}")),
            );
        }
        let rows = self
            .rows(column)
            .into_iter()
            .map(|r| {
                let mut v = Vec::new();
                if let Some(i) = interval {
                    v.push(Value::Text(i.time.clone()));
                }
                v.extend(COLUMNS.iter().map(|c| (c.value)(r)));
                if let Some(i) = interval {
                    let prev = i.prev.get(&r.vm);
                    for (k, (_, now)) in Self::delta_counts(r).into_iter().enumerate() {
                        let before = prev.map_or(0, |p| p[k]);
                        v.push(Value::Count(now.saturating_sub(before)));
                    }
                }
                v
            })
            .collect();
        (names, rows)
    }

    pub fn table(&self, column: Option<&Column>) -> String {
        self.table_at(column, None)
    }

    pub fn table_at(&self, column: Option<&Column>, interval: Option<&Interval>) -> String {
        let (names, rows) = self.grid(column, interval);
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| r.iter().map(Value::text).collect())
            .collect();
        let widths: Vec<usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                cells
                    .iter()
                    .map(|row| row[i].len())
                    .chain([n.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let line = |out: &mut String, fields: &mut dyn Iterator<Item = &str>| {
            let parts: Vec<String> = fields
                .zip(&widths)
                .map(|(f, w)| format!("{f:>w$}"))
                .collect();
            let _ = writeln!(out, "{}", parts.join("  "));
        };
        line(&mut out, &mut names.iter().map(String::as_str));
        for row in &cells {
            line(&mut out, &mut row.iter().map(String::as_str));
        }
        out
    }

    pub fn csv(&self, column: Option<&Column>) -> String {
        self.csv_at(column, None)
    }

    /// CSV (RFC 4180: a field holding a comma, quote or newline is quoted).
    pub fn csv_at(&self, column: Option<&Column>, interval: Option<&Interval>) -> String {
        let (names, rows) = self.grid(column, interval);
        let field = |f: String| {
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f
            }
        };
        let mut out = names.join(",");
        out.push('\n');
        for r in rows {
            let fields: Vec<String> = r.iter().map(|v| field(v.text())).collect();
            out.push_str(&fields.join(","));
            out.push('\n');
        }
        out
    }

    pub fn json(&self, column: Option<&Column>) -> String {
        self.json_at(column, None)
    }

    /// A JSON array with one object per VM, keys in column order (a `serde_json::Map` would
    /// sort them).
    pub fn json_at(&self, column: Option<&Column>, interval: Option<&Interval>) -> String {
        let (names, rows) = self.grid(column, interval);
        let objects: Vec<String> = rows
            .iter()
            .map(|r| {
                let fields: Vec<String> = names
                    .iter()
                    .zip(r)
                    .map(|(n, v)| format!("{}:{}", serde_json::Value::from(n.as_str()), v.json()))
                    .collect();
                format!("{{{}}}", fields.join(","))
            })
            .collect();
        format!("[{}]", objects.join(","))
    }
}

/// What an `--interval` print adds: its time, and each VM's counts at the previous print.
#[derive(Debug, Clone, Default)]
pub struct Interval {
    /// UTC, RFC 3339 to the second.
    pub time: String,
    pub prev: BTreeMap<VmId, [u64; 4]>,
}

impl Interval {
    /// Remembers the counts just printed, for the next print's deltas.
    pub fn printed(&mut self, o: &Overview) {
        for r in o.rows.values() {
            let c = Overview::delta_counts(r);
            self.prev.insert(r.vm, [c[0].1, c[1].1, c[2].1, c[3].1]);
        }
    }
}

/// The column called `name`.
pub fn column(name: &str) -> Option<&'static Column> {
    COLUMNS.iter().find(|c| c.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdpshare::event::{EventKind, GpaRange, Source};

    fn overview() -> Overview {
        let mut o = Overview::default();
        let range = GpaRange::new(tdpshare::Gpa(0), 1 << 30);
        for (vm, pages) in [(7, 512), (3, 262144), (9, 1)] {
            o.record(&Event::new(
                0,
                vm,
                Source::Simulator,
                EventKind::Pin { range, pages },
            ));
        }
        o.record(&Event::new(
            1,
            9,
            Source::Simulator,
            EventKind::IotlbFlush {
                scope: tdpshare::event::FlushScope::All,
                domain: None,
                range: None,
                ns: 2_500_000,
            },
        ));
        o
    }

    #[test]
    fn interval_rows_carry_time_deltas_and_column_order() {
        let mut o = overview();
        o.set_name(9, "guest, \"nine\"");
        let mut i = Interval {
            time: "2026-11-28T12:00:00Z".into(),
            ..Interval::default()
        };
        let csv = o.csv_at(column("vm"), Some(&i));
        let mut lines = csv.lines();
        let header = lines.next().unwrap();
        assert!(header.starts_with("time,vm,name,"), "{header}");
        assert!(
            header.ends_with(",d_prepops,d_roots,d_fast_zaps,d_iotlb_flushes"),
            "{header}"
        );
        // The name with a comma and quotes is one quoted field.
        let nine = lines.find(|l| l.contains(",9,")).unwrap();
        assert!(nine.contains(",\"guest, \"\"nine\"\"\","), "{nine}");
        assert!(nine.ends_with(",0,0,0,1"), "{nine}");
        // After a print, the deltas count from it.
        i.printed(&o);
        o.record(&Event::new(
            2,
            9,
            Source::Simulator,
            EventKind::IotlbFlush {
                scope: tdpshare::event::FlushScope::All,
                domain: None,
                range: None,
                ns: 1,
            },
        ));
        let json = o.json_at(column("vm"), Some(&i));
        let keys_in_order: Vec<usize> = [
            "\"time\"",
            "\"vm\"",
            "\"name\"",
            "\"prepops\"",
            "\"d_iotlb_flushes\"",
        ]
        .iter()
        .map(|k| json.find(k).unwrap())
        .collect();
        assert!(keys_in_order.windows(2).all(|w| w[0] < w[1]), "{json}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let row9 = v.as_array().unwrap().iter().find(|r| r["vm"] == 9).unwrap();
        assert_eq!(row9["d_iotlb_flushes"], 1);
        assert_eq!(row9["iotlb_flushes"], 2);
    }

    #[test]
    fn sorts_descending_with_ties_by_vm() {
        let o = overview();
        let by = |name| {
            o.rows(column(name))
                .iter()
                .map(|r| r.vm)
                .collect::<Vec<_>>()
        };
        assert_eq!(by("pinned_mib"), [3, 7, 9]);
        assert_eq!(by("iotlb_flushes"), [9, 3, 7]);
        assert_eq!(
            o.rows(None).iter().map(|r| r.vm).collect::<Vec<_>>(),
            [3, 7, 9]
        );
    }

    #[test]
    fn formats_share_field_names() {
        let o = overview();
        let csv = o.csv(None);
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let json: serde_json::Value = serde_json::from_str(&o.json(None)).unwrap();
        let keys: Vec<&str> = json[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut sorted_header = header.clone();
        sorted_header.sort();
        let mut sorted_keys = keys.clone();
        sorted_keys.sort();
        assert_eq!(sorted_header, sorted_keys);
        assert!(o.table(None).lines().next().unwrap().contains("pinned_mib"));
        assert_eq!(json[0]["pinned_mib"], 1024.0);
        assert_eq!(json[2]["iotlb_flushes"], 1);
    }
}
