//! Tracepoint record layouts, parsed from tracefs `events/<system>/<event>/format` files.
//!
//! A format file lists each field of the raw record as
//! `field:<C declaration>;\toffset:<n>;\tsize:<n>;\tsigned:<0|1>;`. The layout differs between
//! kernel builds, so it is always read from the running kernel, never assumed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where tracefs is normally mounted, newest first.
pub const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("tracepoint {system}:{event} is absent (no {path})")]
    Absent {
        system: String,
        event: String,
        path: PathBuf,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("format of {name}, line {line}: {what}")]
    Parse {
        name: String,
        line: usize,
        what: &'static str,
    },
    #[error("tracepoint {name} has no field {field:?}")]
    NoField { name: String, field: String },
    #[error("field {field:?} of {name} is {size} bytes, expected {expected}")]
    FieldSize {
        name: String,
        field: String,
        size: usize,
        expected: usize,
    },
}

/// One field of a tracepoint record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The C type as written, e.g. `unsigned int`, `u64`, `__u8`, `char[16]`.
    pub c_type: String,
    pub name: String,
    pub offset: usize,
    pub size: usize,
    pub signed: bool,
    /// The `common_*` header fields every record starts with.
    pub common: bool,
}

/// The record layout of one tracepoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    pub system: String,
    pub name: String,
    /// The tracepoint id (what `perf_event_open` and raw tracepoint records use).
    pub id: u32,
    pub fields: Vec<Field>,
}

impl Format {
    /// Parses the text of a format file of tracepoint `system:<name>`.
    pub fn parse(system: &str, text: &str) -> Result<Self, FormatError> {
        let mut name = None;
        let mut id = None;
        let mut fields = Vec::new();
        let label = |n: &Option<String>| format!("{system}:{}", n.as_deref().unwrap_or("?"));
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let err = |what| FormatError::Parse {
                name: label(&name),
                line: i + 1,
                what,
            };
            if let Some(rest) = line.strip_prefix("name:") {
                name = Some(rest.trim().to_owned());
            } else if let Some(rest) = line.strip_prefix("ID:") {
                id = Some(rest.trim().parse().map_err(|_| err("ID is not a number"))?);
            } else if line.starts_with("field:") {
                fields.push(parse_field(line).ok_or_else(|| err("malformed field line"))?);
            }
        }
        let name = name.ok_or(FormatError::Parse {
            name: format!("{system}:?"),
            line: 0,
            what: "no `name:` line",
        })?;
        let id = id.ok_or_else(|| FormatError::Parse {
            name: format!("{system}:{name}"),
            line: 0,
            what: "no `ID:` line",
        })?;
        if fields.is_empty() {
            return Err(FormatError::Parse {
                name: format!("{system}:{name}"),
                line: 0,
                what: "no fields",
            });
        }
        Ok(Self {
            system: system.to_owned(),
            name,
            id,
            fields,
        })
    }

    /// Reads `events/<system>/<event>/format` below a tracefs root.
    pub fn load(tracefs: &Path, system: &str, event: &str) -> Result<Self, FormatError> {
        let path = tracefs
            .join("events")
            .join(system)
            .join(event)
            .join("format");
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(FormatError::Absent {
                    system: system.to_owned(),
                    event: event.to_owned(),
                    path,
                });
            }
            Err(source) => return Err(FormatError::Read { path, source }),
        };
        Self::parse(system, &text)
    }

    /// The field called `name`.
    pub fn field(&self, name: &str) -> Result<&Field, FormatError> {
        self.fields
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| FormatError::NoField {
                name: self.qualified_name(),
                field: name.to_owned(),
            })
    }

    /// The offset of field `name`, checking that it is `size` bytes wide (what the eBPF side reads).
    pub fn offset_of(&self, name: &str, size: usize) -> Result<usize, FormatError> {
        let field = self.field(name)?;
        if field.size != size {
            return Err(FormatError::FieldSize {
                name: self.qualified_name(),
                field: name.to_owned(),
                size: field.size,
                expected: size,
            });
        }
        Ok(field.offset)
    }

    /// Reads unsigned field `name` out of a raw record (little-endian, 1/2/4/8 bytes).
    pub fn read_u64(&self, record: &[u8], name: &str) -> Result<Option<u64>, FormatError> {
        let field = self.field(name)?;
        let Some(bytes) = record.get(field.offset..field.offset + field.size) else {
            return Ok(None);
        };
        let mut le = [0u8; 8];
        match field.size {
            1 | 2 | 4 | 8 => le[..field.size].copy_from_slice(bytes),
            _ => return Ok(None),
        }
        Ok(Some(u64::from_le_bytes(le)))
    }

    /// `system:name`.
    pub fn qualified_name(&self) -> String {
        format!("{}:{}", self.system, self.name)
    }
}

/// `field:unsigned int mmu_used_pages;\toffset:12;\tsize:4;\tsigned:0;`
fn parse_field(line: &str) -> Option<Field> {
    let mut decl = None;
    let (mut offset, mut size, mut signed) = (None, None, None);
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once(':')?;
        match key.trim() {
            "field" => decl = Some(value.trim()),
            "offset" => offset = value.trim().parse().ok(),
            "size" => size = value.trim().parse().ok(),
            "signed" => signed = Some(value.trim() == "1"),
            _ => {}
        }
    }
    // The name is the last identifier of the declaration, before an array suffix:
    // `u64 gfn`, `char comm[16]`, `__data_loc char[] device`, `const char * name`.
    let decl = decl?;
    let (base, suffix) = match decl.rfind('[') {
        Some(open) if decl.ends_with(']') => decl.split_at(open),
        _ => (decl, ""),
    };
    // Split after the separator character, whatever its width: a format file is the running
    // kernel's text, and `char::is_whitespace` takes more than ASCII spaces (U+00A0 is two
    // bytes).
    let (at, sep) = base
        .char_indices()
        .rev()
        .find(|&(_, c)| c.is_whitespace() || c == '*')?;
    let split = at + sep.len_utf8();
    let (c_type, name) = (base[..split].trim(), base[split..].trim());
    let c_type = format!("{c_type}{suffix}");
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    Some(Field {
        common: name.starts_with("common_"),
        c_type,
        name: name.to_owned(),
        offset: offset?,
        size: size?,
        signed: signed?,
    })
}

/// The first tracefs root that exists on this machine.
pub fn tracefs_root() -> Option<PathBuf> {
    TRACEFS_ROOTS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(file: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/tracefs-6.18")
            .join(file);
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn get_page_layout_of_6_18() {
        let f = Format::parse("kvmmmu", &fixture("kvmmmu_kvm_mmu_get_page.format")).unwrap();
        assert_eq!(f.name, "kvm_mmu_get_page");
        assert_eq!(f.id, 128);
        assert_eq!(f.offset_of("gfn", 8).unwrap(), 16);
        assert_eq!(f.offset_of("role", 4).unwrap(), 24);
        assert_eq!(f.offset_of("root_count", 4).unwrap(), 28);
        assert_eq!(f.offset_of("created", 1).unwrap(), 33);
        let pid = f.field("common_pid").unwrap();
        assert!(pid.common && pid.signed && pid.offset == 4 && pid.c_type == "int");
        assert_eq!(f.field("role").unwrap().c_type, "__u32");
    }

    #[test]
    fn every_fixture_parses_with_nonempty_payload() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tracefs-6.18");
        let mut n = 0;
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let system = stem.split('_').next().unwrap();
            let f = Format::parse(system, &fs::read_to_string(&path).unwrap()).unwrap();
            assert!(stem.ends_with(&f.name), "{stem} vs {}", f.name);
            assert!(f.fields.iter().any(|x| !x.common), "{stem} has no payload");
            // Fields never overlap.
            let mut spans: Vec<_> = f.fields.iter().map(|x| (x.offset, x.size)).collect();
            spans.sort();
            for w in spans.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0, "{stem}: overlapping fields");
            }
            n += 1;
        }
        assert!(n >= 14);
    }

    #[test]
    fn wrong_width_and_missing_field_are_named() {
        let f = Format::parse("kvmmmu", &fixture("kvmmmu_kvm_mmu_zap_all_fast.format")).unwrap();
        let err = f.offset_of("mmu_used_pages", 8).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field \"mmu_used_pages\" of kvmmmu:kvm_mmu_zap_all_fast is 4 bytes, expected 8"
        );
        assert!(matches!(f.field("nope"), Err(FormatError::NoField { .. })));
    }

    #[test]
    fn reads_fields_out_of_a_record() {
        let f =
            Format::parse("kvmmmu", &fixture("kvmmmu_kvm_tdp_mmu_spte_changed.format")).unwrap();
        let mut rec = vec![0u8; 40];
        rec[8..16].copy_from_slice(&0x1234u64.to_le_bytes());
        rec[32] = 2;
        assert_eq!(f.read_u64(&rec, "gfn").unwrap(), Some(0x1234));
        assert_eq!(f.read_u64(&rec, "level").unwrap(), Some(2));
        assert_eq!(f.read_u64(&rec[..20], "level").unwrap(), None);
    }

    #[test]
    fn array_and_data_loc_fields() {
        let f = parse_field("field:char comm[16];\toffset:8;\tsize:16;\tsigned:0;").unwrap();
        assert_eq!((f.name.as_str(), f.c_type.as_str()), ("comm", "char[16]"));
        let f =
            parse_field("field:__data_loc char[] device;\toffset:8;\tsize:4;\tsigned:0;").unwrap();
        assert_eq!(
            (f.name.as_str(), f.c_type.as_str()),
            ("device", "__data_loc char[]")
        );
        assert!(parse_field("field:u64;\toffset:8;\tsize:8;\tsigned:0;").is_none());
    }

    /// Found by the tracefs_format fuzz target: a declaration split at a two-byte whitespace
    /// character (U+00A0) sliced inside it and panicked.
    #[test]
    fn a_wide_whitespace_character_in_a_declaration_splits_cleanly() {
        let f = parse_field("field:u64\u{a0}gfn;\toffset:8;\tsize:8;\tsigned:0;").unwrap();
        assert_eq!((f.c_type.as_str(), f.name.as_str()), ("u64", "gfn"));
        assert!(parse_field("field:\u{a0}_;\toffset:0;\tsize:-;\tsigned:0;").is_none());
        let text = "name: x\nID: 1\nformat:\n\tfield:ign\u{a0}_lfie\u{a0}<;\toffset:2;\tsize:8;\tsigned:0;\n";
        let _ = Format::parse("kvm", text);
    }

    #[test]
    fn garbage_is_an_error() {
        let err = Format::parse("x", "name: y\nID: nope\n").unwrap_err();
        assert_eq!(err.to_string(), "format of x:y, line 2: ID is not a number");
        assert!(Format::parse("x", "hello").is_err());
        assert!(matches!(
            Format::load(Path::new("/nonexistent"), "kvm", "kvm_exit"),
            Err(FormatError::Absent { .. })
        ));
    }
}
