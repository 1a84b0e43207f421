//! Inputs: trace files and Parquet datasets loaded into one lazy events frame; and the export of
//! traces as a Hive-partitioned Parquet dataset (`host=…/date=…/<trace>.parquet`).
//!
//! A trace is read line by line. Up to [`SPILL_ROWS`] events stay in memory; past that, every
//! batch of [`BATCH_ROWS`] goes to a Parquet file in a private spill directory and the frame
//! scans those files, so a trace of any length loads in bounded memory and the reports run on
//! polars' streaming engine. Any bad line fails the whole load with its file and line number:
//! a report is never computed on part of an input.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use polars::prelude::*;
use tdpshare::{Header, TraceError, TraceReader};

use crate::frame::{self, Builder, Origin};

/// Rows per frame batch (and per Parquet row group).
pub const BATCH_ROWS: usize = 1 << 17;
/// Rows of trace input kept in memory before the load spills to Parquet.
pub const SPILL_ROWS: usize = 1 << 18;

/// Everything that can go wrong loading or exporting.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no input given")]
    NoInput,
    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },
    #[error("{path}")]
    Trace {
        path: PathBuf,
        #[source]
        source: TraceError,
    },
    #[error("{path}: not a Parquet dataset of tdpshare events (no .parquet file under it)")]
    EmptyDataset { path: PathBuf },
    #[error("{path}: cannot read or write it")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: polars")]
    Polars {
        path: PathBuf,
        #[source]
        source: PolarsError,
    },
}

/// What one input contributed.
#[derive(Debug, Clone)]
pub struct Input {
    pub path: PathBuf,
    /// The `trace` column's value for its rows (trace inputs; datasets carry their own).
    pub name: String,
    /// The trace header (trace inputs).
    pub header: Option<Header>,
    /// Events read (trace inputs).
    pub events: u64,
    /// Events of unknown types skipped (with `skip_unknown`).
    pub skipped_unknown: u64,
}

/// How to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Skip events of types this build does not know instead of failing.
    pub skip_unknown: bool,
    /// The `host` of trace inputs whose header names none.
    pub host: Option<String>,
    /// Rows kept in memory before spilling (`None`: [`SPILL_ROWS`]) and per batch (`None`:
    /// [`BATCH_ROWS`]); small values exercise the spill in tests.
    pub spill_rows: Option<usize>,
    pub batch_rows: Option<usize>,
}

/// The loaded inputs as one lazy frame in [`frame::SCHEMA`]'s column order.
pub struct Dataset {
    pub inputs: Vec<Input>,
    frames: Vec<LazyFrame>,
    spill: Option<SpillDir>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("inputs", &self.inputs)
            .field("frames", &self.frames.len())
            .field("spill", &self.spill)
            .finish()
    }
}

/// A private directory removed when dropped.
#[derive(Debug)]
struct SpillDir(PathBuf);

impl SpillDir {
    fn create() -> std::io::Result<Self> {
        let base = std::env::temp_dir();
        for n in 0..1000u32 {
            let dir = base.join(format!("tdpshare-analyze-{}-{n}", std::process::id()));
            match fs::create_dir(&dir) {
                Ok(()) => return Ok(Self(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free spill directory name"))
    }
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A trace input's name: its file name without `.jsonl`.
pub fn trace_name(path: &Path) -> String {
    let file = path.file_name().map_or_else(
        || path.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    );
    file.strip_suffix(".jsonl").unwrap_or(&file).to_owned()
}

fn polars_err(path: &Path) -> impl Fn(PolarsError) -> LoadError + '_ {
    move |source| LoadError::Polars {
        path: path.to_path_buf(),
        source,
    }
}

/// The header's host, the option's, or `unknown`.
fn host_of(header: &Header, opts: &LoadOptions) -> String {
    if !header.host.is_empty() {
        header.host.clone()
    } else {
        opts.host.clone().unwrap_or_else(|| "unknown".to_owned())
    }
}

impl Dataset {
    /// Loads `paths`: trace files (`.jsonl`), Parquet files, or directories holding an exported
    /// dataset.
    pub fn open(paths: &[PathBuf], opts: &LoadOptions) -> Result<Self, LoadError> {
        if paths.is_empty() {
            return Err(LoadError::NoInput);
        }
        let mut inputs = Vec::new();
        let mut frames = Vec::new();
        let mut spill: Option<SpillDir> = None;
        for path in paths {
            if !path.exists() {
                return Err(LoadError::NotFound { path: path.clone() });
            }
            if path.is_dir() || path.extension().is_some_and(|e| e == "parquet") {
                frames.push(scan_parquet(path)?);
                inputs.push(Input {
                    path: path.clone(),
                    name: String::new(),
                    header: None,
                    events: 0,
                    skipped_unknown: 0,
                });
            } else {
                let (input, mut lfs) = load_trace(path, opts, &mut spill)?;
                inputs.push(input);
                frames.append(&mut lfs);
            }
        }
        Ok(Self {
            inputs,
            frames,
            spill,
        })
    }

    /// Where rows spilled to Parquet (removed with the dataset), if they did.
    pub fn spill_dir(&self) -> Option<&Path> {
        self.spill.as_ref().map(|s| s.0.as_path())
    }

    /// All rows, sorted by input, VM and time ([`by_time`] of [`Dataset::lazy`]).
    pub fn sorted(&self) -> PolarsResult<LazyFrame> {
        Ok(by_time(self.lazy()?))
    }

    /// All rows in input order. Filter before sorting ([`by_time`]): a sort of every row and
    /// column of a large trace is what costs memory, not the scan.
    pub fn lazy(&self) -> PolarsResult<LazyFrame> {
        match self.frames.as_slice() {
            [] => Err(PolarsError::NoData("a dataset without inputs".into())),
            [one] => Ok(one.clone()),
            many => concat(many, UnionArgs::default()),
        }
    }

    /// The rows of the given event types, sorted, collected.
    pub fn collect_types(&self, types: &[&str]) -> PolarsResult<DataFrame> {
        collect(by_time(self.lazy()?.filter(type_in(types))))
    }
}

/// Runs `lf` on polars' streaming engine: a 10-million-event trace's aggregates in bounded
/// memory (it falls back to the in-memory engine for what it cannot stream).
pub fn collect(lf: LazyFrame) -> PolarsResult<DataFrame> {
    match lf.collect_with_engine(Engine::Streaming)? {
        polars_core::query_result::QueryResult::Single(df) => Ok(df),
        polars_core::query_result::QueryResult::Multiple(dfs) => {
            let mut it = dfs.into_iter();
            let mut first = it.next().unwrap_or_default();
            for df in it {
                first.vstack_mut(&df)?;
            }
            Ok(first)
        }
    }
}

/// [`collect`] as a method.
pub trait Collect {
    fn collect_streaming(self) -> PolarsResult<DataFrame>;
}

impl Collect for LazyFrame {
    fn collect_streaming(self) -> PolarsResult<DataFrame> {
        collect(self)
    }
}

/// `lf` sorted by input, VM and time (stable: equal times keep their order).
pub fn by_time(lf: LazyFrame) -> LazyFrame {
    lf.sort(
        ["trace", "vm", "ts_ns"],
        SortMultipleOptions::default().with_maintain_order(true),
    )
}

/// `type` is one of `types`.
pub fn type_in(types: &[&str]) -> Expr {
    types
        .iter()
        .map(|t| col("type").eq(lit(*t)))
        .reduce(|a, b| a.or(b))
        .unwrap_or(lit(false))
}

/// Opens a trace: its reader, header, and the origin its rows carry.
fn open_trace(
    path: &Path,
    opts: &LoadOptions,
) -> Result<(TraceReader<std::io::BufReader<File>>, Header, Origin), LoadError> {
    let reader = TraceReader::open(path)
        .map_err(|source| LoadError::Trace {
            path: path.to_path_buf(),
            source,
        })?
        .skip_unknown(opts.skip_unknown);
    let header = reader.header().clone();
    let origin = Origin {
        trace: trace_name(path),
        host: host_of(&header, opts),
        start_unix_ns: header.start_unix_ns,
    };
    Ok((reader, header, origin))
}

/// Reads one trace into frames, spilling past [`SPILL_ROWS`].
fn load_trace(
    path: &Path,
    opts: &LoadOptions,
    spill: &mut Option<SpillDir>,
) -> Result<(Input, Vec<LazyFrame>), LoadError> {
    let trace_err = |source| LoadError::Trace {
        path: path.to_path_buf(),
        source,
    };
    let (reader, header, origin) = open_trace(path, opts)?;
    let mut builder = Builder::new();
    let mut held: Vec<DataFrame> = Vec::new();
    let mut held_rows = 0usize;
    let mut spilled: Vec<PathBuf> = Vec::new();
    let mut events = 0u64;
    let mut reader = reader;
    let perr = polars_err(path);
    let mut flush = |df: DataFrame,
                     held: &mut Vec<DataFrame>,
                     held_rows: &mut usize,
                     spilled: &mut Vec<PathBuf>|
     -> Result<(), LoadError> {
        *held_rows += df.height();
        held.push(df);
        if *held_rows > opts.spill_rows.unwrap_or(SPILL_ROWS) || !spilled.is_empty() {
            if spill.is_none() {
                *spill = Some(SpillDir::create().map_err(|source| LoadError::Io {
                    path: std::env::temp_dir(),
                    source,
                })?);
            }
            let dir = &spill.as_ref().map(|s| s.0.clone()).unwrap_or_default();
            for mut df in held.drain(..) {
                let file = dir.join(format!("{}-{}.parquet", origin.trace, spilled.len()));
                let out = File::create(&file).map_err(|source| LoadError::Io {
                    path: file.clone(),
                    source,
                })?;
                ParquetWriter::new(out)
                    .with_compression(ParquetCompression::Snappy)
                    .finish(&mut df)
                    .map_err(&perr)?;
                spilled.push(file);
            }
            *held_rows = 0;
        }
        Ok(())
    };
    for event in reader.by_ref() {
        let event = event.map_err(trace_err)?;
        events += 1;
        builder.push(&origin, &event);
        if builder.rows() >= opts.batch_rows.unwrap_or(BATCH_ROWS) {
            let df = builder.take().map_err(&perr)?;
            flush(df, &mut held, &mut held_rows, &mut spilled)?;
        }
    }
    let last = builder.take().map_err(&perr)?;
    if last.height() > 0 || (held.is_empty() && spilled.is_empty()) {
        flush(last, &mut held, &mut held_rows, &mut spilled)?;
    }
    let mut frames: Vec<LazyFrame> = held.into_iter().map(DataFrame::lazy).collect();
    if !spilled.is_empty() {
        let sources: Vec<PlRefPath> = spilled
            .iter()
            .map(|p| PlRefPath::from(p.to_string_lossy().as_ref()))
            .collect();
        let lf = LazyFrame::scan_parquet_files(
            sources.into_iter().collect(),
            ScanArgsParquet::default(),
        )
        .map_err(&perr)?;
        frames.push(lf);
    }
    let input = Input {
        path: path.to_path_buf(),
        name: origin.trace.clone(),
        header: Some(header),
        events,
        skipped_unknown: reader.skipped_unknown(),
    };
    Ok((input, frames))
}

/// A Parquet file or an exported dataset directory, columns in the frame's order.
fn scan_parquet(path: &Path) -> Result<LazyFrame, LoadError> {
    let perr = polars_err(path);
    let hive_schema: Schema = frame::PARTITIONS
        .iter()
        .map(|&p| Field::new(p.into(), DataType::String))
        .collect();
    let (target, hive) = if path.is_dir() {
        let any = walk_parquet(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if !any {
            return Err(LoadError::EmptyDataset {
                path: path.to_path_buf(),
            });
        }
        (format!("{}/**/*.parquet", path.display()), true)
    } else {
        (path.display().to_string(), false)
    };
    let args = ScanArgsParquet {
        hive_options: HiveOptions {
            enabled: Some(hive),
            hive_start_idx: 0,
            schema: Some(Arc::new(hive_schema)),
            try_parse_dates: false,
        },
        glob: true,
        ..Default::default()
    };
    let lf = LazyFrame::scan_parquet(PlRefPath::from(target.as_str()), args).map_err(&perr)?;
    // A file exported without its partition columns, read on its own, gets them as nulls.
    let names = lf
        .clone()
        .collect_schema()
        .map_err(&perr)?
        .iter_names()
        .map(|n| n.to_string())
        .collect::<Vec<_>>();
    let exprs: Vec<Expr> = frame::SCHEMA
        .iter()
        .map(|&(name, ty, _)| {
            if names.iter().any(|n| n == name) {
                col(name).cast(ty.dtype())
            } else {
                lit(NULL).cast(ty.dtype()).alias(name)
            }
        })
        .collect();
    Ok(lf.select(exprs))
}

/// Whether `dir` holds a `.parquet` file at any depth.
fn walk_parquet(dir: &Path) -> std::io::Result<bool> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let p = entry.path();
        if entry.file_type()?.is_dir() {
            if walk_parquet(&p)? {
                return Ok(true);
            }
        } else if p.extension().is_some_and(|e| e == "parquet") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A Hive partition value as a path segment: `[A-Za-z0-9._-]` kept, the rest `%XX`-escaped
/// (what Hive, Spark and DuckDB expect).
pub fn hive_escape(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        return "__HIVE_DEFAULT_PARTITION__".to_owned();
    }
    if let Some(rest) = out.strip_prefix('.') {
        // No hidden directories: engines skip them.
        return format!("%2E{rest}");
    }
    out
}

/// What an export wrote.
#[derive(Debug, Default, Clone)]
pub struct ExportSummary {
    pub events: u64,
    /// (partition directory, rows) per file written.
    pub files: Vec<(PathBuf, u64)>,
}

struct PartWriter {
    tmp: PathBuf,
    path: PathBuf,
    writer: polars::io::parquet::write::BatchedWriter<File>,
    builder: Builder,
    rows: u64,
}

/// Writes `traces` into `dir` as a Hive-partitioned dataset, one file per trace and
/// partition (`host=H/date=D/<trace>.parquet`, replaced when exported again). Files are
/// written under a temporary name and renamed when complete; on any error none of this call's
/// files is left behind.
pub fn export(
    traces: &[PathBuf],
    dir: &Path,
    opts: &LoadOptions,
) -> Result<ExportSummary, LoadError> {
    let mut summary = ExportSummary::default();
    let mut done: Vec<PathBuf> = Vec::new();
    let result = (|| {
        for path in traces {
            export_one(path, dir, opts, &mut summary, &mut done)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for f in &done {
            let _ = fs::remove_file(f);
        }
        return Err(e);
    }
    Ok(summary)
}

fn export_one(
    path: &Path,
    dir: &Path,
    opts: &LoadOptions,
    summary: &mut ExportSummary,
    done: &mut Vec<PathBuf>,
) -> Result<(), LoadError> {
    let perr = polars_err(path);
    let trace_err = |source| LoadError::Trace {
        path: path.to_path_buf(),
        source,
    };
    let (mut reader, _, origin) = open_trace(path, opts)?;
    let file_schema: Schema = frame::schema()
        .iter()
        .filter(|(n, _)| !frame::PARTITIONS.contains(&n.as_str()))
        .map(|(n, t)| Field::new(n.clone(), t.clone()))
        .collect();
    let mut parts: BTreeMap<String, PartWriter> = BTreeMap::new();
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| LoadError::Io { path: p, source }
    };
    let result = (|| -> Result<(), LoadError> {
        let write = |w: &mut PartWriter| -> Result<(), LoadError> {
            let df = w.builder.take().map_err(&perr)?;
            let df = df.drop_many(frame::PARTITIONS);
            w.rows += df.height() as u64;
            w.writer.write_batch(&df).map_err(&perr)
        };
        for event in reader.by_ref() {
            let event = event.map_err(trace_err)?;
            summary.events += 1;
            let date = frame::utc_date(origin.start_unix_ns.saturating_add(event.ts_ns));
            if !parts.contains_key(&date) {
                let part = dir
                    .join(format!("host={}", hive_escape(&origin.host)))
                    .join(format!("date={}", hive_escape(&date)));
                fs::create_dir_all(&part).map_err(io(&part))?;
                let path = part.join(format!("{}.parquet", hive_escape(&origin.trace)));
                let tmp = part.join(format!(".{}.parquet.tmp", hive_escape(&origin.trace)));
                let file = File::create(&tmp).map_err(io(&tmp))?;
                let writer = ParquetWriter::new(file)
                    .with_row_group_size(Some(BATCH_ROWS))
                    .batched(&file_schema)
                    .map_err(&perr)?;
                parts.insert(
                    date.clone(),
                    PartWriter {
                        tmp,
                        path,
                        writer,
                        builder: Builder::new(),
                        rows: 0,
                    },
                );
            }
            let Some(w) = parts.get_mut(&date) else {
                continue;
            };
            w.builder.push(&origin, &event);
            if w.builder.rows() >= BATCH_ROWS {
                write(w)?;
            }
        }
        for w in parts.values_mut() {
            if w.builder.rows() > 0 {
                write(w)?;
            }
            w.writer.finish().map_err(&perr)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for w in parts.values() {
            let _ = fs::remove_file(&w.tmp);
        }
        return Err(e);
    }
    for w in parts.into_values() {
        fs::rename(&w.tmp, &w.path).map_err(io(&w.path))?;
        done.push(w.path.clone());
        summary.files.push((w.path, w.rows));
    }
    Ok(())
}
