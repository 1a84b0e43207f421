//! The trace file format: JSON Lines, a header line then one [`Event`] per line.
//!
//! Both ends stream: the writer emits a line per event, the reader parses a line per `next()`, so
//! a trace of any length runs in constant memory. See `docs/trace-format.md`.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::event::{Event, EventKind, Source};

/// The format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The value of the header's `format` field, so a stray JSON file is not taken for a trace.
pub const FORMAT_NAME: &str = "tdpshare-trace";

/// A value's name as the trace format spells it (`memslot_change`, `simulator`, `2M`): its
/// serde string; empty for a value that does not serialize as one. Views and reports show
/// these names, never Rust's.
pub fn name_of<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The value `name` stands for ([`name_of`]'s inverse); `None` for a name it does not know.
pub fn from_name<T: serde::de::DeserializeOwned>(name: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
}

/// The first line of every trace file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub source: Source,
    /// `uname -r` of the host that produced the events (empty for the simulator).
    pub kernel: String,
    /// The tdpshare version that wrote the file.
    pub tool_version: String,
    /// Wall-clock time of `ts_ns == 0`, in nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    /// Host name of the machine that recorded live events (empty otherwise, and in traces
    /// written before it was added); the analysis partitions datasets by it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
}

impl Header {
    /// A header for this build, stamped with the current wall-clock time.
    pub fn new(source: Source, kernel: impl Into<String>) -> Self {
        let start_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            source,
            kernel: kernel.into(),
            tool_version: env!("CARGO_PKG_VERSION").to_owned(),
            start_unix_ns,
            host: if source == Source::Live {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            },
        }
    }
}

/// Everything that can go wrong reading or writing a trace. Line numbers count from 1 (the header).
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot open trace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error at line {line}")]
    Io {
        line: u64,
        #[source]
        source: io::Error,
    },
    #[error("the trace is empty: no header line")]
    Empty,
    #[error("line 1 is not a tdpshare trace header")]
    BadHeader(#[source] serde_json::Error),
    #[error("line 1: format is {found:?}, expected {FORMAT_NAME:?}")]
    NotATrace { found: String },
    #[error(
        "line 1: format version {found} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    Version { found: u32 },
    #[error("line {line} is truncated (the file ends mid-line)")]
    Truncated { line: u64 },
    #[error("line {line} is not valid JSON")]
    Json {
        line: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("line {line}: unknown event type {name:?}")]
    UnknownEvent { line: u64, name: String },
    #[error("line {line}: malformed {name:?} event")]
    Malformed {
        line: u64,
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("line {line}: not an event (no `kind.type` field)")]
    NoKind { line: u64 },
    #[error("cannot write event")]
    Encode(#[source] serde_json::Error),
    #[error("cannot write trace")]
    Write(#[source] io::Error),
    #[error("cannot move the finished trace into place at {path}")]
    Persist {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Writes a trace line by line.
#[derive(Debug)]
pub struct TraceWriter<W: Write> {
    out: W,
    events: u64,
}

impl<W: Write> TraceWriter<W> {
    /// Starts a trace on `out` by writing its header line.
    pub fn new(mut out: W, header: &Header) -> Result<Self, TraceError> {
        serde_json::to_writer(&mut out, header).map_err(TraceError::Encode)?;
        out.write_all(b"\n").map_err(TraceError::Write)?;
        Ok(Self { out, events: 0 })
    }

    pub fn write(&mut self, event: &Event) -> Result<(), TraceError> {
        serde_json::to_writer(&mut self.out, event).map_err(TraceError::Encode)?;
        self.out.write_all(b"\n").map_err(TraceError::Write)?;
        self.events += 1;
        Ok(())
    }

    /// Events written so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    pub fn flush(&mut self) -> Result<(), TraceError> {
        self.out.flush().map_err(TraceError::Write)
    }

    /// Flushes and hands back the sink.
    pub fn into_inner(mut self) -> Result<W, TraceError> {
        self.flush()?;
        Ok(self.out)
    }
}

/// A trace being written to a file: events go to `<path>.partial`, which [`TraceFile::finish`]
/// renames to `path`, so an interrupted recording never leaves a half-written file under the
/// final name (the partial one stays for inspection).
#[derive(Debug)]
pub struct TraceFile {
    writer: TraceWriter<BufWriter<File>>,
    partial: PathBuf,
    path: PathBuf,
}

impl TraceFile {
    pub fn create(path: impl AsRef<Path>, header: &Header) -> Result<Self, TraceError> {
        let path = path.as_ref().to_path_buf();
        let mut partial = path.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::create(&partial).map_err(|source| TraceError::Open {
            path: partial.clone(),
            source,
        })?;
        let writer = TraceWriter::new(BufWriter::new(file), header)?;
        Ok(Self {
            writer,
            partial,
            path,
        })
    }

    pub fn write(&mut self, event: &Event) -> Result<(), TraceError> {
        self.writer.write(event)
    }

    pub fn events(&self) -> u64 {
        self.writer.events()
    }

    /// Pushes the buffered lines to the `.partial` file, so that a process killed without a
    /// chance to [`finish`](TraceFile::finish) loses only what came after.
    pub fn flush(&mut self) -> Result<(), TraceError> {
        self.writer.flush()
    }

    /// The final name.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the data and moves the file to its final name; returns the number of events.
    pub fn finish(self) -> Result<u64, TraceError> {
        let events = self.writer.events();
        let file = self
            .writer
            .into_inner()?
            .into_inner()
            .map_err(|e| TraceError::Write(e.into_error()))?;
        file.sync_all().map_err(TraceError::Write)?;
        std::fs::rename(&self.partial, &self.path).map_err(|source| TraceError::Persist {
            path: self.path.clone(),
            source,
        })?;
        Ok(events)
    }
}

/// Reads a trace line by line; an iterator of events.
///
/// After the first error the iterator ends (a reader does not guess where a damaged file
/// continues). With [`TraceReader::skip_unknown`], events of a type this build does not know
/// are skipped and counted instead of failing, so a newer writer's file can still be read.
#[derive(Debug)]
pub struct TraceReader<R: BufRead> {
    input: R,
    header: Header,
    line: u64,
    buf: String,
    skip_unknown: bool,
    skipped_unknown: u64,
    done: bool,
}

impl TraceReader<BufReader<File>> {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TraceError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| TraceError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(BufReader::new(file))
    }
}

impl<R: BufRead> TraceReader<R> {
    /// Reads and checks the header line.
    pub fn new(mut input: R) -> Result<Self, TraceError> {
        let mut buf = String::new();
        let n = input
            .read_line(&mut buf)
            .map_err(|source| TraceError::Io { line: 1, source })?;
        if n == 0 {
            return Err(TraceError::Empty);
        }
        if !buf.ends_with('\n') {
            return Err(TraceError::Truncated { line: 1 });
        }
        let value: serde_json::Value = serde_json::from_str(&buf).map_err(TraceError::BadHeader)?;
        // Check the name and version before the rest, so a future header shape still gets the
        // precise "version not supported" answer.
        let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("");
        if format != FORMAT_NAME {
            return Err(TraceError::NotATrace {
                found: format.to_owned(),
            });
        }
        if let Some(found) = value.get("version").and_then(|v| v.as_u64())
            && found != u64::from(FORMAT_VERSION)
        {
            return Err(TraceError::Version {
                found: u32::try_from(found).unwrap_or(u32::MAX),
            });
        }
        let header: Header = serde_json::from_value(value).map_err(TraceError::BadHeader)?;
        Ok(Self {
            input,
            header,
            line: 1,
            buf,
            skip_unknown: false,
            skipped_unknown: 0,
            done: false,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Skip (and count) events of unknown type instead of failing on them.
    pub fn skip_unknown(mut self, skip: bool) -> Self {
        self.skip_unknown = skip;
        self
    }

    /// Unknown events skipped so far.
    pub fn skipped_unknown(&self) -> u64 {
        self.skipped_unknown
    }

    /// The number of the last line read (1 is the header).
    pub fn line(&self) -> u64 {
        self.line
    }

    fn read_event(&mut self) -> Option<Result<Event, TraceError>> {
        loop {
            self.buf.clear();
            let n = match self.input.read_line(&mut self.buf) {
                Ok(n) => n,
                Err(source) => {
                    return Some(Err(TraceError::Io {
                        line: self.line + 1,
                        source,
                    }));
                }
            };
            if n == 0 {
                return None;
            }
            self.line += 1;
            let line = self.line;
            let complete = self.buf.ends_with('\n');
            let text = self.buf.trim();
            if text.is_empty() {
                if complete {
                    continue;
                }
                return None;
            }
            let value: serde_json::Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(_) if !complete => return Some(Err(TraceError::Truncated { line })),
                Err(source) => return Some(Err(TraceError::Json { line, source })),
            };
            let Some(name) = value
                .get("kind")
                .and_then(|k| k.get("type"))
                .and_then(|t| t.as_str())
            else {
                return Some(Err(TraceError::NoKind { line }));
            };
            if !EventKind::NAMES.contains(&name) {
                if self.skip_unknown {
                    self.skipped_unknown += 1;
                    continue;
                }
                return Some(Err(TraceError::UnknownEvent {
                    line,
                    name: name.to_owned(),
                }));
            }
            let name = name.to_owned();
            return Some(
                serde_json::from_value(value).map_err(|source| TraceError::Malformed {
                    line,
                    name,
                    source,
                }),
            );
        }
    }
}

impl<R: BufRead> Iterator for TraceReader<R> {
    type Item = Result<Event, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.read_event();
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{GpaRange, Memslot, PageSize};

    fn header() -> Header {
        Header {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            source: Source::Simulator,
            kernel: String::new(),
            tool_version: "0.1.0".into(),
            start_unix_ns: 1,
            host: String::new(),
        }
    }

    fn sample() -> Vec<Event> {
        vec![
            Event::new(
                10,
                7,
                Source::Simulator,
                EventKind::MemslotAdd(Memslot {
                    slot: 0,
                    as_id: 0,
                    gpa: crate::event::Gpa(0),
                    size: 1 << 31,
                    flags: 0,
                    ua: 0x7f00_0000_0000,
                }),
            ),
            Event::new(
                20,
                7,
                Source::Simulator,
                EventKind::PrepopulateEnd {
                    range: GpaRange::new(crate::event::Gpa(0), 1 << 31),
                    page_size: PageSize::Size2M,
                    cause: crate::event::PrepopCause::SharingStart,
                    entries: 1024,
                    leaves: None,
                    ns: 5000,
                },
            )
            .on_vcpu(1),
        ]
    }

    fn write(events: &[Event]) -> Vec<u8> {
        let mut w = TraceWriter::new(Vec::new(), &header()).unwrap();
        for e in events {
            w.write(e).unwrap();
        }
        w.into_inner().unwrap()
    }

    fn read(bytes: &[u8]) -> Result<Vec<Event>, TraceError> {
        TraceReader::new(bytes)?.collect()
    }

    #[test]
    fn round_trip() {
        let events = sample();
        assert_eq!(read(&write(&events)).unwrap(), events);
    }

    #[test]
    fn wrong_version_is_named() {
        let text = r#"{"format":"tdpshare-trace","version":9}
"#;
        let err = read(text.as_bytes()).unwrap_err();
        assert!(matches!(err, TraceError::Version { found: 9 }), "{err}");
    }

    #[test]
    fn truncated_last_line_is_reported_with_its_number() {
        let mut bytes = write(&sample());
        bytes.truncate(bytes.len() - 10);
        let err = read(&bytes).unwrap_err();
        assert!(matches!(err, TraceError::Truncated { line: 3 }), "{err}");
        assert_eq!(
            err.to_string(),
            "line 3 is truncated (the file ends mid-line)"
        );
    }

    #[test]
    fn unknown_event_fails_or_is_skipped_and_counted() {
        let mut bytes = write(&sample()[..1]);
        bytes.extend_from_slice(
            br#"{"ts_ns":1,"vm":1,"source":"live","kind":{"type":"warp_drive","x":1}}
"#,
        );
        let rest = write(&sample()[1..]);
        let header_end = rest.iter().position(|&b| b == b'\n').unwrap() + 1;
        bytes.extend_from_slice(&rest[header_end..]);
        let err = read(&bytes).unwrap_err();
        assert!(
            matches!(&err, TraceError::UnknownEvent { line: 3, name } if name == "warp_drive"),
            "{err}"
        );
        let mut reader = TraceReader::new(&bytes[..]).unwrap().skip_unknown(true);
        let events: Vec<_> = reader.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(events, sample());
        assert_eq!(reader.skipped_unknown(), 1);
    }

    #[test]
    fn malformed_known_event_names_line_and_type() {
        let mut bytes = write(&[]);
        bytes.extend_from_slice(
            br#"{"ts_ns":1,"vm":1,"source":"live","kind":{"type":"pin","range":{"start":0}}}
"#,
        );
        let err = read(&bytes).unwrap_err();
        assert!(
            matches!(&err, TraceError::Malformed { line: 2, name, .. } if name == "pin"),
            "{err}"
        );
    }

    #[test]
    fn not_a_trace() {
        assert!(matches!(read(b""), Err(TraceError::Empty)));
        assert!(matches!(
            read(b"{\"format\":\"other\"}\n"),
            Err(TraceError::NotATrace { .. })
        ));
        assert!(matches!(read(b"hello\n"), Err(TraceError::BadHeader(_))));
    }

    #[test]
    fn trace_file_appears_only_when_finished() {
        let dir = std::env::temp_dir().join(format!("tdpshare-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        let mut file = TraceFile::create(&path, &header()).unwrap();
        for e in sample() {
            file.write(&e).unwrap();
        }
        assert!(!path.exists());
        assert_eq!(file.finish().unwrap(), 2);
        let events: Vec<_> = TraceReader::open(&path)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(events, sample());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
