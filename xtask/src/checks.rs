//! The checks that keep kmod's structure true to the architecture:
//!
//! - [`check_layers`]: every `crate::…` path in kmod points down the layers (decision → event →
//!   table → iommu → sharing → sim), and no two files import each other in a cycle;
//! - [`check_decision_layer`]: the decision layer compiles alone under the kernel's Rust rules
//!   (the flags of Linux 6.12's `Makefile` and `scripts/Makefile.build` for a built-in object:
//!   edition 2021, `core` only, overflow checks, `-Dwarnings`, missing docs; and clippy with the
//!   kernel's lints, Rust 1.78 as the MSRV).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// kmod's layers, bottom first: a file may use its own layer and those before it.
pub const LAYERS: [&str; 6] = ["decision", "event", "table", "iommu", "sharing", "sim"];

fn rank(layer: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == layer)
}

/// `text` with comments removed and string and character literals emptied, so that what is
/// left is code (`"{"` in a format string is no brace, `// crate::x` no path). Line breaks stay
/// where they were.
pub fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    if b[i] == b'\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
                i += 2;
            }
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                // r"…" or r#"…"#
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                j += 1;
                loop {
                    if j >= b.len() {
                        break;
                    }
                    if b[j] == b'"' && (0..hashes).all(|h| b.get(j + 1 + h) == Some(&b'#')) {
                        j += 1 + hashes;
                        break;
                    }
                    if b[j] == b'\n' {
                        out.push('\n');
                    }
                    j += 1;
                }
                out.push_str("\"\"");
                i = j;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    if b.get(i) == Some(&b'\n') {
                        out.push('\n');
                    }
                    i += 1;
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' => {
                // A character literal ('x', '\n', '\u{1f}'), or a lifetime ('a).
                let end = if b.get(i + 1) == Some(&b'\\') {
                    b[i + 2..]
                        .iter()
                        .position(|&c| c == b'\'')
                        .map(|p| i + 2 + p)
                } else {
                    let len = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                    (b.get(i + 1 + len) == Some(&b'\'')).then_some(i + 1 + len)
                };
                match end {
                    Some(e) => {
                        out.push_str("' '");
                        i = e + 1;
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            _ => {
                let len = text[i..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&text[i..i + len]);
                i += len;
            }
        }
    }
    out
}

/// `code` without its `#[cfg(test)]` / `#[cfg(all(test, …))]` modules (tests may reach
/// further than the code they test).
pub fn without_test_modules(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(") {
        let attr_end = rest[at..].find(']').map_or(rest.len(), |e| at + e + 1);
        let attr = &rest[at..attr_end];
        let is_test = attr.contains("(test") || attr.contains(" test");
        let after = rest[attr_end..].trim_start();
        let is_mod = after.starts_with("mod ")
            || after.starts_with("pub mod ")
            || after.starts_with("pub(crate) mod ")
            || after.starts_with("#[allow");
        if !(is_test && is_mod) {
            out.push_str(&rest[..attr_end]);
            rest = &rest[attr_end..];
            continue;
        }
        out.push_str(&rest[..at]);
        // Skip to the module's closing brace (or its `;`), keeping line breaks.
        let body = &rest[attr_end..];
        let mut depth = 0usize;
        let mut end = body.len();
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        out.extend(body[..end].chars().filter(|&c| c == '\n'));
        rest = &body[end..];
    }
    out.push_str(rest);
    out
}

/// Every `crate::a::b…` path in `code`, with its 1-based line: the identifiers after `crate::`.
fn crate_paths(code: &str) -> Vec<(usize, Vec<String>)> {
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let before_ok = at == 0 || {
                let c = rest.as_bytes()[at - 1];
                !(c.is_ascii_alphanumeric() || c == b'_')
            };
            rest = &rest[at + "crate::".len()..];
            if !before_ok {
                continue;
            }
            let mut segments = Vec::new();
            let mut tail = rest;
            loop {
                let ident: String = tail
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if ident.is_empty() {
                    break;
                }
                tail = &tail[ident.len()..];
                segments.push(ident);
                match tail.strip_prefix("::") {
                    Some(t) => tail = t,
                    None => break,
                }
            }
            found.push((n + 1, segments));
        }
    }
    found
}

/// The module path a file under `src` defines (`sharing/engine.rs` → `sharing::engine`,
/// `sharing/mod.rs` → `sharing`).
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, found)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
    Ok(())
}

/// Checks the crate whose sources are in `src`: no path points up a layer, no file-level
/// import cycle. Returns every violation found.
pub fn layer_violations(src: &Path) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    files.sort();
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| f.strip_prefix(src).ok())
        .map(module_of)
        .collect();
    let mut problems = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(src)?;
        let Some(layer) = rel.iter().next().map(|l| l.to_string_lossy().into_owned()) else {
            continue;
        };
        let Some(own) = rank(&layer) else {
            continue; // lib.rs: the crate root re-exports every layer
        };
        let text =
            fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let code = without_test_modules(&code_only(&text));
        let this = module_of(rel);
        for (line, path) in crate_paths(&code) {
            let Some(target) = path.first() else { continue };
            match rank(target) {
                Some(r) if r > own => problems.push(format!(
                    "kmod/src/{}:{line}: `crate::{}` points up from layer {layer} to layer {target}",
                    rel.display(),
                    path.join("::")
                )),
                Some(_) => {
                    // The deepest module of the path that is a file.
                    let dest = (1..=path.len())
                        .rev()
                        .map(|n| path[..n].join("::"))
                        .find(|m| modules.contains(m));
                    if let Some(dest) = dest.filter(|d| *d != this) {
                        edges.entry(this.clone()).or_default().insert(dest);
                    }
                }
                None => {}
            }
        }
    }
    // Cycles between files (a layer's mod.rs re-exporting its files is not an import).
    let is_mod = |m: &str| !m.contains("::");
    let mut seen = BTreeSet::new();
    for start in edges.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((at, trail)) = stack.pop() {
            for next in edges.get(&at).into_iter().flatten() {
                if is_mod(next) {
                    continue;
                }
                if next == start {
                    let mut cycle = trail.clone();
                    cycle.push(next.clone());
                    let mut key = trail.clone();
                    key.sort();
                    if seen.insert(key) {
                        problems.push(format!("import cycle: {}", cycle.join(" → ")));
                    }
                } else if !trail.contains(next) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
    Ok(problems)
}

/// Fails when kmod's layering is broken.
pub fn check_layers(root: &Path) -> anyhow::Result<()> {
    let problems = layer_violations(&root.join("kmod/src"))?;
    if !problems.is_empty() {
        bail!(
            "kmod's layers (bottom first: {}) are broken:\n  {}",
            LAYERS.join(" → "),
            problems.join("\n  ")
        );
    }
    println!(
        "ok: kmod's imports point down the layers ({}), no import cycle",
        LAYERS.join(" → ")
    );
    Ok(())
}

/// `rustc`'s sysroot library directory of the host target.
fn sysroot_lib() -> anyhow::Result<PathBuf> {
    let sysroot = crate::output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let version = crate::output(Command::new("rustc").arg("-vV"))?;
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("rustc -vV names no host")?;
    Ok(Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("lib"))
}

fn rmeta(lib: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let prefix = format!("lib{name}-");
    fs::read_dir(lib)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(&prefix))
                && p.extension().is_some_and(|e| e == "rmeta")
        })
        .with_context(|| format!("no {prefix}*.rmeta in {}", lib.display()))
}

/// The kernel's rustc flags for a built-in object (Linux 6.12: `rust_common_flags` and
/// `KBUILD_RUSTFLAGS` in `Makefile`, `rust_common_cmd` in `scripts/Makefile.build`, with
/// `CONFIG_RUST_OVERFLOW_CHECKS` and `CONFIG_WERROR`), but no unstable feature allowed and only
/// `core` (and `compiler_builtins`) to link against — the kernel's `rust/` builds no `alloc`.
fn kernel_rustc_args(crate_root: &Path, out: &Path, lib: &Path) -> anyhow::Result<Vec<String>> {
    let core = rmeta(lib, "core")?;
    let builtins = rmeta(lib, "compiler_builtins")?;
    let empty = out.join("empty-sysroot");
    fs::create_dir_all(&empty)?;
    let mut args: Vec<String> = [
        "--edition=2021",
        "-Astable_features",
        "-Dnon_ascii_idents",
        "-Dunsafe_op_in_unsafe_fn",
        "-Wmissing_docs",
        "-Wrust_2018_idioms",
        "-Wunreachable_pub",
        "-Cpanic=abort",
        "-Coverflow-checks=y",
        "-Cdebug-assertions=n",
        "-Dwarnings",
        "-Zallow-features=",
        "-Zcrate-attr=no_std",
        "--crate-type=rlib",
        "--crate-name=tdpshare_decision",
        "--emit=metadata",
        "--cfg=CONFIG_RUST",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("--sysroot={}", empty.display()));
    args.push(format!("--extern=core={}", core.display()));
    args.push(format!("--extern=compiler_builtins={}", builtins.display()));
    args.push(format!("--out-dir={}", out.display()));
    args.push(crate_root.display().to_string());
    Ok(args)
}

/// The kernel's clippy lints (`rust_common_flags`, `KBUILD_RUSTFLAGS`), then this layer's own
/// rules (also stated in `decision/mod.rs`); `-Dwarnings` makes them errors.
const KERNEL_CLIPPY: [&str; 17] = [
    "-Wclippy::all",
    "-Aclippy::collapsible_if",
    "-Aclippy::collapsible_match",
    "-Wclippy::ignored_unit_patterns",
    "-Wclippy::mut_mut",
    "-Wclippy::needless_bitwise_bool",
    "-Aclippy::needless_lifetimes",
    "-Wclippy::no_mangle_with_rust_abi",
    "-Wclippy::undocumented_unsafe_blocks",
    "-Aclippy::uninlined_format_args",
    "-Wclippy::unnecessary_safety_comment",
    "-Wclippy::unnecessary_safety_doc",
    "-Aclippy::unwrap_or_default",
    "-Wclippy::float_arithmetic",
    "-Wclippy::incompatible_msrv",
    "-Wclippy::arithmetic_side_effects",
    "-Wclippy::indexing_slicing",
];

/// The minimum Rust version Linux 6.12 supports (`scripts/min-tool-version.sh`).
pub const KERNEL_MIN_RUST: &str = "1.78.0";

/// Compiles the decision layer rooted at `crate_root` alone, as the kernel would, then lints it
/// with clippy as the kernel does, against Rust 1.78. Returns the compilers' complaints.
pub fn decision_layer_errors(crate_root: &Path, out: &Path) -> anyhow::Result<Option<String>> {
    fs::create_dir_all(out)?;
    let lib = sysroot_lib()?;
    let args = kernel_rustc_args(crate_root, out, &lib)?;
    let rustc = Command::new("rustc")
        .args(&args)
        .env("RUSTC_BOOTSTRAP", "1")
        .env_remove("CARGO_PKG_RUST_VERSION")
        .output()
        .context("running rustc")?;
    if !rustc.status.success() {
        return Ok(Some(String::from_utf8_lossy(&rustc.stderr).into_owned()));
    }
    let conf = out.join("clippy-conf");
    fs::create_dir_all(&conf)?;
    fs::write(
        conf.join("clippy.toml"),
        format!("msrv = \"{KERNEL_MIN_RUST}\"\n"),
    )?;
    let clippy = Command::new("clippy-driver")
        .args(&args)
        .args(KERNEL_CLIPPY)
        .env("RUSTC_BOOTSTRAP", "1")
        .env_remove("CARGO_PKG_RUST_VERSION")
        .env("CLIPPY_CONF_DIR", &conf)
        .output()
        .context("running clippy-driver (rustup component clippy)")?;
    if !clippy.status.success() {
        return Ok(Some(String::from_utf8_lossy(&clippy.stderr).into_owned()));
    }
    Ok(None)
}

/// Fails when the decision layer would not build in the kernel.
pub fn check_decision_layer(root: &Path) -> anyhow::Result<()> {
    let crate_root = root.join("kmod/src/decision/mod.rs");
    let out = root.join("target/xtask/decision");
    if let Some(errors) = decision_layer_errors(&crate_root, &out)? {
        bail!(
            "kmod/src/decision does not compile under the kernel's Rust rules (edition 2021, \
             Rust {KERNEL_MIN_RUST}, core only, overflow checks, no floats, no panicking \
             arithmetic or indexing):\n{errors}"
        );
    }
    println!(
        "ok: kmod/src/decision compiles under the kernel's Rust rules (edition 2021, Rust \
         {KERNEL_MIN_RUST}, core only, overflow checks) and passes the kernel's clippy lints"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tdpshare-xtask-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(dir: &Path, rel: &str, text: &str) {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn code_only_drops_comments_and_literals() {
        let code = code_only(
            "let s = \"// crate::sim {\"; // crate::sim\nlet c = '{'; /* crate::sim */ let l: &'a u8;\nlet r = r#\"crate::sim\"#;",
        );
        assert!(!code.contains("crate::sim"), "{code}");
        assert!(!code.contains('{'), "{code}");
        assert!(code.contains("&'a u8"), "{code}");
        assert_eq!(code.lines().count(), 3);
    }

    #[test]
    fn test_modules_are_skipped() {
        let code = "use crate::a;\n#[cfg(test)]\nmod tests {\n    use crate::sim;\n    fn f() { if x { } }\n}\nuse crate::b;\n";
        let kept = without_test_modules(code);
        assert!(kept.contains("crate::a") && kept.contains("crate::b"));
        assert!(!kept.contains("crate::sim"));
        assert_eq!(kept.lines().count(), code.lines().count());
    }

    #[test]
    fn an_upward_import_and_a_cycle_are_found() {
        let dir = scratch("layers");
        write(&dir, "lib.rs", "pub mod table; pub mod sharing;\n");
        write(&dir, "table/mod.rs", "pub mod mmu;\npub mod iter;\n");
        write(&dir, "table/iter.rs", "use crate::table::mmu::X;\n");
        write(
            &dir,
            "table/mmu.rs",
            "use crate::decision::addr::Gfn;\nuse crate::table::iter::Y;\n// crate::sim is fine in a comment\nfn f() { crate::sharing::engine::go(); }\n",
        );
        write(&dir, "sharing/mod.rs", "pub mod engine;\n");
        write(&dir, "sharing/engine.rs", "use crate::table::mmu::X;\n");
        let problems = layer_violations(&dir).unwrap();
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(
            problems[0].starts_with("kmod/src/table/mmu.rs:4: `crate::sharing::engine::go`"),
            "{problems:#?}"
        );
        assert!(problems[1].contains("import cycle"), "{problems:#?}");
        assert!(problems[1].contains("table::iter") && problems[1].contains("table::mmu"));
        // kmod itself is clean.
        let kmod = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kmod/src");
        assert_eq!(layer_violations(&kmod).unwrap(), Vec::<String>::new());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A copy of the decision layer with `edit` applied to `file`, compiled the kernel's way.
    fn decision_with(name: &str, file: &str, edit: impl Fn(String) -> String) -> Option<String> {
        let dir = scratch(name);
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kmod/src/decision");
        for entry in fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let text = fs::read_to_string(&path).unwrap();
            let text = if path.file_name().unwrap() == file {
                edit(text)
            } else {
                text
            };
            fs::write(dir.join(path.file_name().unwrap()), text).unwrap();
        }
        let errors = decision_layer_errors(&dir.join("mod.rs"), &dir.join("out")).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        errors
    }

    #[test]
    fn the_kernel_rules_hold_and_catch_what_the_kernel_refuses() {
        assert_eq!(decision_with("clean", "mod.rs", |t| t), None);
        let append = |extra: &'static str| move |t: String| format!("{t}\n{extra}\n");
        let cases: [(&str, &str, &str); 5] = [
            (
                "letchain",
                "/// x\npub fn x(a: Option<u8>) -> bool { if let Some(v) = a && v > 1 { true } else { false } }",
                "let chains are only allowed in Rust 2024",
            ),
            (
                "alloc",
                "extern crate alloc;\n/// x\npub fn x(v: &mut alloc::vec::Vec<u8>) { v.push(1) }",
                "can't find crate for `alloc`",
            ),
            (
                "vecpush",
                "/// x\npub fn x(v: &mut Vec<u8>) { v.push(1) }",
                "cannot find type `Vec`",
            ),
            (
                "msrv",
                "/// x\npub fn x(a: Option<u8>) -> bool { a.is_none_or(|v| v > 1) }",
                "incompatible_msrv",
            ),
            (
                "overflow",
                "/// x\npub fn x(a: u64, b: u64) -> u64 { a + b }",
                "arithmetic_side_effects",
            ),
        ];
        for (name, extra, want) in cases {
            let errors = decision_with(name, "policy.rs", append(extra))
                .unwrap_or_else(|| panic!("{name}: the kernel rules let it through"));
            assert!(errors.contains(want), "{name}: {errors}");
        }
    }
}
