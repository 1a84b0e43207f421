//! Just enough of a BTF reader to find bitfield positions of a kernel type: the kernel's own
//! description of its types (`/sys/kernel/btf/vmlinux`, and split BTF for modules).
//!
//! Used to decode `union kvm_mmu_page_role` from the `role` word of `kvmmmu` tracepoint records
//! with the bit positions of the running kernel, not ones compiled in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: &'static str },
    #[error("no type {name:?} in the kernel's BTF")]
    NoType { name: String },
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// One struct or union member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub type_id: u32,
    /// Offset in bits from the start of the aggregate.
    pub bit_offset: u32,
    /// Bitfield width in bits, 0 for a plain member.
    pub bit_size: u32,
}

/// A struct or union.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    pub name: String,
    pub union: bool,
    pub size: u32,
    pub members: Vec<Member>,
}

/// The structs and unions of one BTF blob (plus its base, for split BTF).
#[derive(Debug, Default)]
pub struct Btf {
    aggregates: HashMap<u32, Aggregate>,
    by_name: HashMap<String, Vec<u32>>,
    /// Types in this blob and its base.
    type_count: u32,
    strings: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

impl Btf {
    /// Parses a BTF blob; `base` for split BTF (a module's, on top of vmlinux).
    pub fn parse(path: &Path, data: &[u8], base: Option<&Btf>) -> Result<Self, BtfError> {
        let bad = |what| BtfError::Format {
            path: path.to_path_buf(),
            what,
        };
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(bad("not BTF (bad magic; big-endian BTF is not supported)"));
        }
        let hdr_len = u32_at(data, 4).ok_or(bad("short header"))? as usize;
        let type_off = u32_at(data, 8).ok_or(bad("short header"))? as usize;
        let type_len = u32_at(data, 12).ok_or(bad("short header"))? as usize;
        let str_off = u32_at(data, 16).ok_or(bad("short header"))? as usize;
        let str_len = u32_at(data, 20).ok_or(bad("short header"))? as usize;
        let types = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(bad("type section out of bounds"))?;
        let own_strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(bad("string section out of bounds"))?;
        let mut btf = Btf::default();
        let (base_types, mut strings) = match base {
            Some(b) => (b.type_count, b.strings.clone()),
            None => (0, Vec::new()),
        };
        strings.extend_from_slice(own_strings);
        btf.strings = strings;
        let mut at = 0;
        let mut id = base_types;
        while at + 12 <= types.len() {
            id += 1;
            let name_off = u32_at(types, at).ok_or(bad("truncated type"))?;
            let info = u32_at(types, at + 4).ok_or(bad("truncated type"))?;
            let size = u32_at(types, at + 8).ok_or(bad("truncated type"))?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(bad("unknown BTF kind")),
            };
            if kind == KIND_STRUCT || kind == KIND_UNION {
                let mut members = Vec::with_capacity(vlen);
                for m in 0..vlen {
                    let p = at + m * 12;
                    let m_name = u32_at(types, p).ok_or(bad("truncated member"))?;
                    let m_type = u32_at(types, p + 4).ok_or(bad("truncated member"))?;
                    let m_off = u32_at(types, p + 8).ok_or(bad("truncated member"))?;
                    let (bit_offset, bit_size) = if kind_flag {
                        (m_off & 0xff_ffff, m_off >> 24)
                    } else {
                        (m_off, 0)
                    };
                    members.push(Member {
                        name: btf.string(m_name).to_owned(),
                        type_id: m_type,
                        bit_offset,
                        bit_size,
                    });
                }
                let name = btf.string(name_off).to_owned();
                if !name.is_empty() {
                    btf.by_name.entry(name.clone()).or_default().push(id);
                }
                btf.aggregates.insert(
                    id,
                    Aggregate {
                        name,
                        union: kind == KIND_UNION,
                        size,
                        members,
                    },
                );
            }
            at += extra;
        }
        btf.type_count = id;
        if let Some(b) = base {
            // Keep the base's aggregates reachable (members may refer to them).
            for (k, v) in &b.aggregates {
                btf.aggregates.entry(*k).or_insert_with(|| v.clone());
            }
            for (k, v) in &b.by_name {
                btf.by_name.entry(k.clone()).or_default().extend(v);
            }
        }
        Ok(btf)
    }

    /// Reads a BTF file.
    pub fn load(path: &Path, base: Option<&Btf>) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &data, base)
    }

    fn string(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// The struct or union called `name`.
    pub fn aggregate(&self, name: &str) -> Result<&Aggregate, BtfError> {
        self.by_name
            .get(name)
            .and_then(|ids| ids.iter().find_map(|id| self.aggregates.get(id)))
            .ok_or_else(|| BtfError::NoType {
                name: name.to_owned(),
            })
    }

    /// Bitfields of `name` and of the anonymous structs inside it, flattened:
    /// member name → (bit offset, width).
    pub fn bitfields(&self, name: &str) -> Result<HashMap<String, (u32, u32)>, BtfError> {
        let mut out = HashMap::new();
        self.collect(self.aggregate(name)?, 0, &mut out);
        Ok(out)
    }

    fn collect(&self, agg: &Aggregate, base: u32, out: &mut HashMap<String, (u32, u32)>) {
        for m in &agg.members {
            if m.name.is_empty() {
                if let Some(inner) = self.aggregates.get(&m.type_id) {
                    self.collect(inner, base + m.bit_offset, out);
                }
            } else {
                out.insert(m.name.clone(), (base + m.bit_offset, m.bit_size));
            }
        }
    }
}

/// Where the fields of `union kvm_mmu_page_role` sit in its 32-bit word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleLayout {
    pub level: (u32, u32),
    pub direct: (u32, u32),
    pub invalid: (u32, u32),
    pub guest_mode: (u32, u32),
    pub smm: (u32, u32),
    /// Read from the running kernel's BTF (else Linux 6.x's layout, which the caller reports).
    pub from_btf: bool,
}

impl RoleLayout {
    /// Linux 6.x (`arch/x86/include/asm/kvm_host.h`), used only when the BTF lacks the type.
    pub const LINUX_6: RoleLayout = RoleLayout {
        level: (0, 4),
        direct: (7, 1),
        invalid: (11, 1),
        guest_mode: (17, 1),
        smm: (24, 8),
        from_btf: false,
    };

    /// The layout described by `btf`.
    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let f = btf.bitfields("kvm_mmu_page_role")?;
        let get = |n: &str| {
            f.get(n).copied().ok_or_else(|| BtfError::NoType {
                name: format!("kvm_mmu_page_role.{n}"),
            })
        };
        Ok(RoleLayout {
            level: get("level")?,
            direct: get("direct")?,
            invalid: get("invalid")?,
            guest_mode: get("guest_mode")?,
            smm: get("smm")?,
            from_btf: true,
        })
    }

    /// From the running kernel: vmlinux, then KVM's module BTF if KVM is modular.
    pub fn of_running_kernel() -> (Self, Option<String>) {
        let dir = Path::new("/sys/kernel/btf");
        let vmlinux = match Btf::load(&dir.join("vmlinux"), None) {
            Ok(b) => b,
            Err(e) => return (Self::LINUX_6, Some(e.to_string())),
        };
        if let Ok(l) = Self::from_btf(&vmlinux) {
            return (l, None);
        }
        for module in ["kvm", "kvm_intel", "kvm_amd"] {
            if let Ok(b) = Btf::load(&dir.join(module), Some(&vmlinux))
                && let Ok(l) = Self::from_btf(&b)
            {
                return (l, None);
            }
        }
        (
            Self::LINUX_6,
            Some("kvm_mmu_page_role is not in the kernel's BTF".into()),
        )
    }

    fn field(word: u32, (off, size): (u32, u32)) -> u32 {
        let size = size.max(1);
        (word >> off)
            & if size >= 32 {
                u32::MAX
            } else {
                (1 << size) - 1
            }
    }

    pub fn level(&self, word: u32) -> u8 {
        Self::field(word, self.level) as u8
    }
    pub fn direct(&self, word: u32) -> bool {
        Self::field(word, self.direct) != 0
    }
    pub fn invalid(&self, word: u32) -> bool {
        Self::field(word, self.invalid) != 0
    }
    pub fn guest_mode(&self, word: u32) -> bool {
        Self::field(word, self.guest_mode) != 0
    }
    pub fn smm(&self, word: u32) -> bool {
        Self::field(word, self.smm) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `union kvm_mmu_page_role { u32 word; struct { level:4; ...; smm:8 } }`.
    fn blob() -> Vec<u8> {
        let mut strings =
            b"\0kvm_mmu_page_role\0word\0level\0direct\0invalid\0guest_mode\0smm\0unsigned int\0"
                .to_vec();
        strings.push(0);
        let off = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int "unsigned int", 4 bytes
        push(&[off("unsigned int"), 1 << 24, 4, 32]);
        // 2: anonymous struct, kind_flag, 5 bitfield members
        push(&[0, (1 << 31) | (4 << 24) | 5, 4]);
        for (name, bit, size) in [
            ("level", 0, 4),
            ("direct", 7, 1),
            ("invalid", 11, 1),
            ("guest_mode", 17, 1),
            ("smm", 24, 8),
        ] {
            push(&[off(name), 1, (size << 24) | bit]);
        }
        // 3: union kvm_mmu_page_role { word; <struct 2>; }
        push(&[off("kvm_mmu_page_role"), (5 << 24) | 2, 4]);
        push(&[off("word"), 1, 0]);
        push(&[0, 2, 0]);
        let mut data = Vec::new();
        for w in [
            u32::from(MAGIC) | (1 << 16),
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(&strings);
        data
    }

    #[test]
    fn reads_bitfields_of_an_anonymous_struct_in_a_union() {
        let btf = Btf::parse(Path::new("t"), &blob(), None).unwrap();
        let layout = RoleLayout::from_btf(&btf).unwrap();
        assert_eq!(
            layout,
            RoleLayout {
                from_btf: true,
                ..RoleLayout::LINUX_6
            }
        );
        let word = 4 | (1 << 7) | (1 << 24);
        assert_eq!(layout.level(word), 4);
        assert!(layout.direct(word) && layout.smm(word) && !layout.invalid(word));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Btf::parse(Path::new("x"), b"not btf at all, not at all", None).is_err());
        let btf = Btf::parse(Path::new("t"), &blob(), None).unwrap();
        assert!(matches!(
            btf.aggregate("nope"),
            Err(BtfError::NoType { .. })
        ));
    }

    #[test]
    fn the_running_kernel_describes_the_role() {
        let (layout, problem) = RoleLayout::of_running_kernel();
        match problem {
            None => assert!(layout.from_btf),
            Some(p) => println!("skipped: {p}"),
        }
    }
}
