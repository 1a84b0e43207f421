//! The events as one flat table: the schema every input (trace files, the Parquet dataset) is
//! loaded into, the columns of the exported dataset, and the way back from rows to [`Event`]s.
//!
//! One row per event. The first columns say where it came from (`trace`, `host`, `date`) and
//! when (`ts_ns`, `unix_ns`); `type` is the event's name in trace files; the payload columns
//! are shared between event types where they mean the same thing (`start`/`size` is the range of
//! every ranged event, the memslot's GPA range, or the IOVA range of a DMA map) and null where an
//! event has no such field. `docs/analysis.md` lists them.

use polars::prelude::*;
use tdpshare::event::trace::{from_name as untag, name_of as tag};
use tdpshare::event::{
    FlushScope, GpaRange, Memslot, PrepopCause, Root, RootCause, ShareMode, SpteFlags,
};
use tdpshare::{Event, EventKind, Gfn, Gpa, Iova, PageSize, Source};

/// A column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    U64,
    U32,
    U16,
    U8,
    Bool,
    Str,
}

impl Ty {
    pub fn dtype(self) -> DataType {
        match self {
            Ty::U64 => DataType::UInt64,
            Ty::U32 => DataType::UInt32,
            Ty::U16 => DataType::UInt16,
            Ty::U8 => DataType::UInt8,
            Ty::Bool => DataType::Boolean,
            Ty::Str => DataType::String,
        }
    }
}

/// Every column: name, type, meaning. The order is the frame's column order.
pub const SCHEMA: [(&str, Ty, &str); 46] = [
    (
        "trace",
        Ty::Str,
        "the input the row came from (trace file name without extension)",
    ),
    (
        "host",
        Ty::Str,
        "host that recorded it (header `host`; `unknown` when not recorded)",
    ),
    ("date", Ty::Str, "UTC date of the event, YYYY-MM-DD"),
    ("ts_ns", Ty::U64, "ns since the trace's start"),
    (
        "unix_ns",
        Ty::U64,
        "wall-clock time of the event, ns since the Unix epoch",
    ),
    (
        "vm",
        Ty::U64,
        "VM id (the VMM's pid live, the simulator's VM number)",
    ),
    ("vcpu", Ty::U32, "vCPU, when known"),
    ("source", Ty::Str, "live | simulator | replay"),
    ("type", Ty::Str, "event name (trace format `kind.type`)"),
    (
        "path",
        Ty::Str,
        "the seed design's path: prepopulation | root_update | iommu | memslot | sharing",
    ),
    (
        "start",
        Ty::U64,
        "range start: GPA of a range or memslot, IOVA of a DMA map/unmap or IO page fault",
    ),
    ("size", Ty::U64, "range size in bytes"),
    (
        "gfn",
        Ty::U64,
        "4 KiB guest frame (spte_set, page_fault, huge page split/collapse)",
    ),
    (
        "level",
        Ty::U8,
        "KVM level (1 = 4 KiB leaf); a root's level for root events",
    ),
    ("page_size", Ty::U64, "pre-population's largest leaf, bytes"),
    ("cause", Ty::Str, "pre-population cause or root cause"),
    (
        "entries",
        Ty::U64,
        "leaf entries written (pre-population) or zapped (zap)",
    ),
    (
        "leaves_4k",
        Ty::U64,
        "pre-population: 4 KiB leaves written (when the source counts them)",
    ),
    ("leaves_2m", Ty::U64, "pre-population: 2 MiB leaves written"),
    ("leaves_1g", Ty::U64, "pre-population: 1 GiB leaves written"),
    (
        "ns",
        Ty::U64,
        "duration: pre-population, DMA map/unmap (0: not timed), IOTLB flush",
    ),
    (
        "root",
        Ty::U64,
        "root identity (table address live, id in the simulator)",
    ),
    ("smm", Ty::Bool, "root of the SMM address space"),
    ("generation", Ty::U64, "fast zap: the new MMU generation"),
    (
        "pages",
        Ty::U64,
        "fast zap: pages invalidated; pin, unpin, sharing_stopped: 4 KiB pages (un)pinned",
    ),
    ("tables", Ty::Bool, "zap: page tables freed too"),
    (
        "spte_old",
        Ty::Str,
        "spte_set: old entry flags (`prwxhadsP`)",
    ),
    ("spte_new", Ty::Str, "spte_set: new entry flags"),
    ("error_code", Ty::U64, "page_fault: the fault's error code"),
    (
        "scope",
        Ty::Str,
        "iotlb_flush: all | domain | range | range_leaves",
    ),
    ("domain", Ty::U32, "iotlb_flush: domain id"),
    ("write", Ty::Bool, "io_page_fault: a write"),
    (
        "resolved",
        Ty::Bool,
        "io_page_fault: the TDP fault path mapped it",
    ),
    ("slot", Ty::U16, "memslot id within its address space"),
    ("as_id", Ty::U8, "memslot address space (1: SMM)"),
    ("flags", Ty::U32, "memslot KVM_MEM_* flags"),
    ("old_flags", Ty::U32, "memslot_flags: the flags before"),
    ("ua", Ty::U64, "memslot userspace address"),
    ("old_gpa", Ty::U64, "memslot_move: the GPA before"),
    ("mode", Ty::Str, "sharing events: the sharing mode"),
    ("handle", Ty::U64, "sharing_started: the handle"),
    (
        "reason",
        Ty::Str,
        "sharing_refused: the failed prerequisites",
    ),
    (
        "enter",
        Ty::Bool,
        "smm_transition: entering (true) or leaving SMM",
    ),
    ("cr", Ty::U8, "cr_write: the control register (0 or 4)"),
    (
        "value",
        Ty::U64,
        "cr_write: the value written, when the tracepoint carries it",
    ),
    ("name", Ty::Str, "vm_name: the VM's name (its VMM's -name)"),
];

/// Column positions in [`SCHEMA`].
pub mod c {
    pub const TRACE: usize = 0;
    pub const HOST: usize = 1;
    pub const DATE: usize = 2;
    pub const TS_NS: usize = 3;
    pub const UNIX_NS: usize = 4;
    pub const VM: usize = 5;
    pub const VCPU: usize = 6;
    pub const SOURCE: usize = 7;
    pub const TYPE: usize = 8;
    pub const PATH: usize = 9;
    pub const START: usize = 10;
    pub const SIZE: usize = 11;
    pub const GFN: usize = 12;
    pub const LEVEL: usize = 13;
    pub const PAGE_SIZE: usize = 14;
    pub const CAUSE: usize = 15;
    pub const ENTRIES: usize = 16;
    pub const LEAVES_4K: usize = 17;
    pub const LEAVES_2M: usize = 18;
    pub const LEAVES_1G: usize = 19;
    pub const NS: usize = 20;
    pub const ROOT: usize = 21;
    pub const SMM: usize = 22;
    pub const GENERATION: usize = 23;
    pub const PAGES: usize = 24;
    pub const TABLES: usize = 25;
    pub const SPTE_OLD: usize = 26;
    pub const SPTE_NEW: usize = 27;
    pub const ERROR_CODE: usize = 28;
    pub const SCOPE: usize = 29;
    pub const DOMAIN: usize = 30;
    pub const WRITE: usize = 31;
    pub const RESOLVED: usize = 32;
    pub const SLOT: usize = 33;
    pub const AS_ID: usize = 34;
    pub const FLAGS: usize = 35;
    pub const OLD_FLAGS: usize = 36;
    pub const UA: usize = 37;
    pub const OLD_GPA: usize = 38;
    pub const MODE: usize = 39;
    pub const HANDLE: usize = 40;
    pub const REASON: usize = 41;
    pub const ENTER: usize = 42;
    pub const CR: usize = 43;
    pub const VALUE: usize = 44;
    pub const NAME: usize = 45;
}

/// The columns that are Hive partitions in the exported dataset (`host=…/date=…/`).
pub const PARTITIONS: [&str; 2] = ["host", "date"];

/// The frame's schema.
pub fn schema() -> Schema {
    SCHEMA
        .iter()
        .map(|&(name, ty, _)| Field::new(name.into(), ty.dtype()))
        .collect()
}

/// The name of column `i`.
pub const fn name(i: usize) -> &'static str {
    SCHEMA[i].0
}

/// One column being built, by type.
enum Buf {
    U(Vec<Option<u64>>),
    B(Vec<Option<bool>>),
    S(Vec<Option<String>>),
}

/// Where the rows of one input come from: its name, host and start time.
#[derive(Debug, Clone)]
pub struct Origin {
    pub trace: String,
    pub host: String,
    pub start_unix_ns: u64,
}

/// Builds the frame's columns row by row.
pub struct Builder {
    cols: Vec<Buf>,
    rows: usize,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Builder({} rows)", self.rows)
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    pub fn new() -> Self {
        let cols = SCHEMA
            .iter()
            .map(|&(_, ty, _)| match ty {
                Ty::Bool => Buf::B(Vec::new()),
                Ty::Str => Buf::S(Vec::new()),
                _ => Buf::U(Vec::new()),
            })
            .collect();
        Self { cols, rows: 0 }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    fn u(&mut self, i: usize, v: u64) {
        if let Buf::U(b) = &mut self.cols[i]
            && let Some(last) = b.last_mut()
        {
            *last = Some(v);
        }
    }

    fn b(&mut self, i: usize, v: bool) {
        if let Buf::B(b) = &mut self.cols[i]
            && let Some(last) = b.last_mut()
        {
            *last = Some(v);
        }
    }

    fn s(&mut self, i: usize, v: impl Into<String>) {
        if let Buf::S(b) = &mut self.cols[i]
            && let Some(last) = b.last_mut()
        {
            *last = Some(v.into());
        }
    }

    fn range(&mut self, r: &GpaRange) {
        self.u(c::START, r.start.0);
        self.u(c::SIZE, r.size);
    }

    fn root(&mut self, r: &Root) {
        self.u(c::ROOT, r.root);
        self.u(c::LEVEL, u64::from(r.level));
        self.b(c::SMM, r.smm);
        self.s(c::CAUSE, tag(&r.cause));
    }

    fn memslot(&mut self, s: &Memslot) {
        self.u(c::SLOT, u64::from(s.slot));
        self.u(c::AS_ID, u64::from(s.as_id));
        self.u(c::START, s.gpa.0);
        self.u(c::SIZE, s.size);
        self.u(c::FLAGS, u64::from(s.flags));
        self.u(c::UA, s.ua);
    }

    /// Appends one event.
    pub fn push(&mut self, origin: &Origin, e: &Event) {
        for col in &mut self.cols {
            match col {
                Buf::U(b) => b.push(None),
                Buf::B(b) => b.push(None),
                Buf::S(b) => b.push(None),
            }
        }
        self.rows += 1;
        let unix_ns = origin.start_unix_ns.saturating_add(e.ts_ns);
        self.s(c::TRACE, origin.trace.as_str());
        self.s(c::HOST, origin.host.as_str());
        self.s(c::DATE, utc_date(unix_ns));
        self.u(c::TS_NS, e.ts_ns);
        self.u(c::UNIX_NS, unix_ns);
        self.u(c::VM, e.vm);
        if let Some(v) = e.vcpu {
            self.u(c::VCPU, u64::from(v));
        }
        self.s(c::SOURCE, tag(&e.source));
        self.s(c::TYPE, e.kind.name());
        self.s(c::PATH, tag(&e.kind.path()));
        match &e.kind {
            EventKind::PrepopulateStart {
                range,
                page_size,
                cause,
            } => {
                self.range(range);
                self.u(c::PAGE_SIZE, page_size.bytes());
                self.s(c::CAUSE, tag(cause));
            }
            EventKind::PrepopulateEnd {
                range,
                page_size,
                cause,
                entries,
                leaves,
                ns,
            } => {
                self.range(range);
                self.u(c::PAGE_SIZE, page_size.bytes());
                self.s(c::CAUSE, tag(cause));
                self.u(c::ENTRIES, *entries);
                if let Some([a, b, g]) = leaves {
                    self.u(c::LEAVES_4K, *a);
                    self.u(c::LEAVES_2M, *b);
                    self.u(c::LEAVES_1G, *g);
                }
                self.u(c::NS, *ns);
            }
            EventKind::RootAlloc(r) | EventKind::RootSwitch(r) | EventKind::RootFree(r) => {
                self.root(r)
            }
            EventKind::FastZap { generation, pages } => {
                self.u(c::GENERATION, *generation);
                self.u(c::PAGES, *pages);
            }
            EventKind::Zap {
                range,
                tables,
                entries,
            } => {
                self.range(range);
                self.b(c::TABLES, *tables);
                self.u(c::ENTRIES, *entries);
            }
            EventKind::HugePageSplit { gfn, level }
            | EventKind::HugePageCollapse { gfn, level } => {
                self.u(c::GFN, gfn.0);
                self.u(c::LEVEL, u64::from(*level));
            }
            EventKind::SpteSet {
                gfn,
                level,
                old,
                new,
            } => {
                self.u(c::GFN, gfn.0);
                self.u(c::LEVEL, u64::from(*level));
                self.s(c::SPTE_OLD, old.to_string());
                self.s(c::SPTE_NEW, new.to_string());
            }
            EventKind::PageFault { gfn, error_code } => {
                self.u(c::GFN, gfn.0);
                self.u(c::ERROR_CODE, *error_code);
            }
            EventKind::IommuMap { iova, size, ns } | EventKind::IommuUnmap { iova, size, ns } => {
                self.u(c::START, iova.0);
                self.u(c::SIZE, *size);
                self.u(c::NS, *ns);
            }
            EventKind::IotlbFlush {
                scope,
                domain,
                range,
                ns,
            } => {
                self.s(c::SCOPE, tag(scope));
                if let Some(d) = domain {
                    self.u(c::DOMAIN, u64::from(*d));
                }
                if let Some(r) = range {
                    self.range(r);
                }
                self.u(c::NS, *ns);
            }
            EventKind::Pin { range, pages } | EventKind::Unpin { range, pages } => {
                self.range(range);
                self.u(c::PAGES, *pages);
            }
            EventKind::MemslotAdd(s) | EventKind::MemslotDelete(s) => self.memslot(s),
            EventKind::MemslotMove { old_gpa, slot } => {
                self.memslot(slot);
                self.u(c::OLD_GPA, old_gpa.0);
            }
            EventKind::MemslotFlags { old_flags, slot } => {
                self.memslot(slot);
                self.u(c::OLD_FLAGS, u64::from(*old_flags));
            }
            EventKind::SharingRequested { mode } => self.s(c::MODE, mode.name()),
            EventKind::SharingStarted { mode, handle } => {
                self.s(c::MODE, mode.name());
                self.u(c::HANDLE, *handle);
            }
            EventKind::SharingStopped { mode, unpinned } => {
                self.s(c::MODE, mode.name());
                self.u(c::PAGES, *unpinned);
            }
            EventKind::SharingRefused { mode, reason } => {
                self.s(c::MODE, mode.name());
                self.s(c::REASON, reason.as_str());
            }
            EventKind::IoPageFault {
                iova,
                write,
                resolved,
            } => {
                self.u(c::START, iova.0);
                self.b(c::WRITE, *write);
                self.b(c::RESOLVED, *resolved);
            }
            EventKind::SmmTransition { enter } => self.b(c::ENTER, *enter),
            EventKind::CrWrite { cr, value } => {
                self.u(c::CR, u64::from(*cr));
                if let Some(v) = value {
                    self.u(c::VALUE, *v);
                }
            }
            EventKind::VmName { name } => self.s(c::NAME, name.as_str()),
        }
    }

    /// The rows so far as a frame; the builder is empty afterwards.
    pub fn take(&mut self) -> PolarsResult<DataFrame> {
        let rows = std::mem::take(&mut self.rows);
        let mut columns = Vec::with_capacity(SCHEMA.len());
        for (col, &(name, ty, _)) in self.cols.iter_mut().zip(SCHEMA.iter()) {
            let column = match col {
                Buf::U(b) => Column::new(name.into(), std::mem::take(b)),
                Buf::B(b) => Column::new(name.into(), std::mem::take(b)),
                Buf::S(b) => Column::new(name.into(), std::mem::take(b)),
            };
            columns.push(if ty == Ty::U64 {
                column
            } else {
                column.cast(&ty.dtype())?
            });
        }
        DataFrame::new(rows, columns)
    }
}

/// `YYYY-MM-DD` (UTC) of a Unix time in nanoseconds.
pub fn utc_date(unix_ns: u64) -> String {
    tdpshare::event::clock::UtcTime::from_unix_ns(unix_ns).date()
}

/// Why a row could not be turned back into an event.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("row {row}: column `{column}` is missing or null for a `{kind}` event")]
    Missing {
        row: usize,
        column: &'static str,
        kind: String,
    },
    #[error("row {row}: `{value}` is not a valid {column}")]
    Invalid {
        row: usize,
        column: &'static str,
        value: String,
    },
    #[error("the frame has no column `{0}` (not a tdpshare events frame?)")]
    NoColumn(&'static str),
    #[error(transparent)]
    Polars(#[from] PolarsError),
}

/// The columns of a frame, read out for row access.
struct Cols {
    u: Vec<Option<Vec<Option<u64>>>>,
    b: Vec<Option<Vec<Option<bool>>>>,
    s: Vec<Option<Vec<Option<String>>>>,
}

impl Cols {
    fn of(df: &DataFrame) -> Result<Self, RowError> {
        let n = SCHEMA.len();
        let mut cols = Cols {
            u: vec![None; n],
            b: vec![None; n],
            s: vec![None; n],
        };
        for (i, &(name, ty, _)) in SCHEMA.iter().enumerate() {
            // Origin columns are optional (a frame may have dropped them).
            let Ok(col) = df.column(name) else {
                if i <= c::DATE || i == c::UNIX_NS || i == c::PATH {
                    continue;
                }
                return Err(RowError::NoColumn(name));
            };
            match ty {
                Ty::Bool => cols.b[i] = Some(col.bool()?.iter().collect()),
                Ty::Str => {
                    cols.s[i] = Some(col.str()?.iter().map(|s| s.map(str::to_owned)).collect())
                }
                _ => {
                    let col = col.cast(&DataType::UInt64)?;
                    cols.u[i] = Some(col.u64()?.iter().collect());
                }
            }
        }
        Ok(cols)
    }
}

/// Turns the rows of an events frame back into events (for the simulator's what-if and the
/// stateful walks): the inverse of [`Builder::push`], given the frame's payload columns.
pub fn events(df: &DataFrame) -> Result<Vec<Event>, RowError> {
    let cols = Cols::of(df)?;
    (0..df.height()).map(|row| event_at(&cols, row)).collect()
}

fn event_at(cols: &Cols, row: usize) -> Result<Event, RowError> {
    let kind_name = cols.s[c::TYPE]
        .as_ref()
        .and_then(|v| v[row].clone())
        .ok_or(RowError::Missing {
            row,
            column: "type",
            kind: "?".into(),
        })?;
    let missing = |i: usize| RowError::Missing {
        row,
        column: name(i),
        kind: kind_name.clone(),
    };
    let invalid = |i: usize, v: &str| RowError::Invalid {
        row,
        column: name(i),
        value: v.to_owned(),
    };
    let u = |i: usize| {
        cols.u[i]
            .as_ref()
            .and_then(|v| v[row])
            .ok_or_else(|| missing(i))
    };
    let uo = |i: usize| cols.u[i].as_ref().and_then(|v| v[row]);
    let b = |i: usize| {
        cols.b[i]
            .as_ref()
            .and_then(|v| v[row])
            .ok_or_else(|| missing(i))
    };
    let s = |i: usize| {
        cols.s[i]
            .as_ref()
            .and_then(|v| v[row].clone())
            .ok_or_else(|| missing(i))
    };
    let parse = |i: usize| -> Result<String, RowError> { s(i) };
    let narrow = |i: usize, v: u64| -> Result<u32, RowError> {
        u32::try_from(v).map_err(|_| invalid(i, &v.to_string()))
    };
    let range =
        || -> Result<GpaRange, RowError> { Ok(GpaRange::new(Gpa(u(c::START)?), u(c::SIZE)?)) };
    let page_size = || -> Result<PageSize, RowError> {
        let bytes = u(c::PAGE_SIZE)?;
        [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G]
            .into_iter()
            .find(|p| p.bytes() == bytes)
            .ok_or_else(|| invalid(c::PAGE_SIZE, &bytes.to_string()))
    };
    let prepop_cause = || -> Result<PrepopCause, RowError> {
        let t = parse(c::CAUSE)?;
        untag(&t).ok_or_else(|| invalid(c::CAUSE, &t))
    };
    let root = || -> Result<Root, RowError> {
        let t = parse(c::CAUSE)?;
        let cause: RootCause = untag(&t).ok_or_else(|| invalid(c::CAUSE, &t))?;
        Ok(Root {
            root: u(c::ROOT)?,
            level: narrow(c::LEVEL, u(c::LEVEL)?)? as u8,
            smm: b(c::SMM)?,
            cause,
        })
    };
    let memslot = || -> Result<Memslot, RowError> {
        Ok(Memslot {
            slot: narrow(c::SLOT, u(c::SLOT)?)? as u16,
            as_id: narrow(c::AS_ID, u(c::AS_ID)?)? as u8,
            gpa: Gpa(u(c::START)?),
            size: u(c::SIZE)?,
            flags: narrow(c::FLAGS, u(c::FLAGS)?)?,
            ua: u(c::UA)?,
        })
    };
    let mode = || -> Result<ShareMode, RowError> {
        let t = parse(c::MODE)?;
        t.parse().map_err(|_| invalid(c::MODE, &t))
    };
    let flags = |i: usize| -> Result<SpteFlags, RowError> {
        let t = parse(i)?;
        SpteFlags::parse(&t).ok_or_else(|| invalid(i, &t))
    };
    let level = || -> Result<u8, RowError> {
        let v = u(c::LEVEL)?;
        u8::try_from(v).map_err(|_| invalid(c::LEVEL, &v.to_string()))
    };
    let kind = match kind_name.as_str() {
        "prepopulate_start" => EventKind::PrepopulateStart {
            range: range()?,
            page_size: page_size()?,
            cause: prepop_cause()?,
        },
        "prepopulate_end" => EventKind::PrepopulateEnd {
            range: range()?,
            page_size: page_size()?,
            cause: prepop_cause()?,
            entries: u(c::ENTRIES)?,
            leaves: match (uo(c::LEAVES_4K), uo(c::LEAVES_2M), uo(c::LEAVES_1G)) {
                (Some(a), Some(b), Some(g)) => Some([a, b, g]),
                _ => None,
            },
            ns: u(c::NS)?,
        },
        "root_alloc" => EventKind::RootAlloc(root()?),
        "root_switch" => EventKind::RootSwitch(root()?),
        "root_free" => EventKind::RootFree(root()?),
        "fast_zap" => EventKind::FastZap {
            generation: u(c::GENERATION)?,
            pages: u(c::PAGES)?,
        },
        "zap" => EventKind::Zap {
            range: range()?,
            tables: b(c::TABLES)?,
            entries: u(c::ENTRIES)?,
        },
        "huge_page_split" => EventKind::HugePageSplit {
            gfn: Gfn(u(c::GFN)?),
            level: level()?,
        },
        "huge_page_collapse" => EventKind::HugePageCollapse {
            gfn: Gfn(u(c::GFN)?),
            level: level()?,
        },
        "spte_set" => EventKind::SpteSet {
            gfn: Gfn(u(c::GFN)?),
            level: level()?,
            old: flags(c::SPTE_OLD)?,
            new: flags(c::SPTE_NEW)?,
        },
        "page_fault" => EventKind::PageFault {
            gfn: Gfn(u(c::GFN)?),
            error_code: u(c::ERROR_CODE)?,
        },
        "iommu_map" => EventKind::IommuMap {
            iova: Iova(u(c::START)?),
            size: u(c::SIZE)?,
            ns: u(c::NS)?,
        },
        "iommu_unmap" => EventKind::IommuUnmap {
            iova: Iova(u(c::START)?),
            size: u(c::SIZE)?,
            ns: u(c::NS)?,
        },
        "iotlb_flush" => {
            let t = parse(c::SCOPE)?;
            let scope: FlushScope = untag(&t).ok_or_else(|| invalid(c::SCOPE, &t))?;
            let range = match (uo(c::START), uo(c::SIZE)) {
                (Some(start), Some(size)) => Some(GpaRange::new(Gpa(start), size)),
                _ => None,
            };
            EventKind::IotlbFlush {
                scope,
                domain: uo(c::DOMAIN).map(|d| narrow(c::DOMAIN, d)).transpose()?,
                range,
                ns: u(c::NS)?,
            }
        }
        "pin" => EventKind::Pin {
            range: range()?,
            pages: u(c::PAGES)?,
        },
        "unpin" => EventKind::Unpin {
            range: range()?,
            pages: u(c::PAGES)?,
        },
        "memslot_add" => EventKind::MemslotAdd(memslot()?),
        "memslot_delete" => EventKind::MemslotDelete(memslot()?),
        "memslot_move" => EventKind::MemslotMove {
            old_gpa: Gpa(u(c::OLD_GPA)?),
            slot: memslot()?,
        },
        "memslot_flags" => EventKind::MemslotFlags {
            old_flags: narrow(c::OLD_FLAGS, u(c::OLD_FLAGS)?)?,
            slot: memslot()?,
        },
        "sharing_requested" => EventKind::SharingRequested { mode: mode()? },
        "sharing_started" => EventKind::SharingStarted {
            mode: mode()?,
            handle: u(c::HANDLE)?,
        },
        "sharing_stopped" => EventKind::SharingStopped {
            mode: mode()?,
            unpinned: u(c::PAGES)?,
        },
        "sharing_refused" => EventKind::SharingRefused {
            mode: mode()?,
            reason: parse(c::REASON)?,
        },
        "io_page_fault" => EventKind::IoPageFault {
            iova: Iova(u(c::START)?),
            write: b(c::WRITE)?,
            resolved: b(c::RESOLVED)?,
        },
        "smm_transition" => EventKind::SmmTransition {
            enter: b(c::ENTER)?,
        },
        "cr_write" => EventKind::CrWrite {
            cr: narrow(c::CR, u(c::CR)?)? as u8,
            value: uo(c::VALUE),
        },
        "vm_name" => EventKind::VmName {
            name: parse(c::NAME)?,
        },
        other => return Err(invalid(c::TYPE, other)),
    };
    let source_text = parse(c::SOURCE)?;
    let source: Source = untag(&source_text).ok_or_else(|| invalid(c::SOURCE, &source_text))?;
    Ok(Event {
        ts_ns: u(c::TS_NS)?,
        vm: u(c::VM)?,
        vcpu: uo(c::VCPU).map(|v| narrow(c::VCPU, v)).transpose()?,
        source,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_match_the_schema() {
        let pairs = [
            (c::TRACE, "trace"),
            (c::DATE, "date"),
            (c::TS_NS, "ts_ns"),
            (c::TYPE, "type"),
            (c::START, "start"),
            (c::LEAVES_1G, "leaves_1g"),
            (c::NS, "ns"),
            (c::SPTE_NEW, "spte_new"),
            (c::RESOLVED, "resolved"),
            (c::OLD_GPA, "old_gpa"),
            (c::VALUE, "value"),
        ];
        for (i, n) in pairs {
            assert_eq!(name(i), n);
        }
        assert_eq!(c::NAME + 1, SCHEMA.len());
    }

    #[test]
    fn the_docs_list_every_column_with_its_type() {
        let doc = include_str!("../../docs/analysis.md");
        for (name, ty, _) in SCHEMA {
            let t = format!("{:?}", ty.dtype());
            let row = format!("| `{name}` | {t} |");
            assert!(doc.contains(&row), "docs/analysis.md lacks `{row}`");
        }
    }

    #[test]
    fn dates_are_utc_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        // 2026-11-28T12:00:00Z
        assert_eq!(utc_date(1_795_867_200_000_000_000), "2026-11-28");
        assert_eq!(utc_date(951_782_400_000_000_000), "2000-02-29");
    }
}
