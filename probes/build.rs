//! Builds the eBPF programs (`probes/ebpf`) for `bpfel-unknown-none` with the nightly toolchain
//! and bpf-linker, and the CO-RE C program (`probes/core`) with clang against libbpf's headers
//! (libbpf-sys's), into OUT_DIR. Nothing built is ever checked in.
//!
//! Without a toolchain the crate still builds, with an empty object in its place: the loader
//! then reports those probes as "not built" and why. `TDPSHARE_REQUIRE_EBPF=1` (CI) makes that
//! an error.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const OBJECT: &str = "tdpshare-probes.bpf.o";
const CORE_OBJECT: &str = "mmu_page.bpf.o";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets it"));
    for p in [
        "ebpf/src",
        "ebpf/Cargo.toml",
        "ebpf/Cargo.lock",
        "common/src",
        "core",
    ] {
        println!("cargo:rerun-if-changed={}", manifest.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=TDPSHARE_REQUIRE_EBPF");
    let required = env::var("TDPSHARE_REQUIRE_EBPF").is_ok_and(|v| v == "1");
    let core = out.join(CORE_OBJECT);
    match build_core(&manifest.join("core"), &core) {
        Ok(()) => println!("cargo:rustc-env=TDPSHARE_CORE_MISSING="),
        Err(reason) => {
            if required {
                panic!("cannot build the CO-RE program: {reason}");
            }
            println!("cargo:warning=tdpshare probes built without the CO-RE program: {reason}");
            std::fs::write(&core, b"").expect("write an empty placeholder");
            println!("cargo:rustc-env=TDPSHARE_CORE_MISSING={reason}");
        }
    }
    let object = out.join(OBJECT);
    match build(&manifest.join("ebpf"), &out) {
        Ok(built) => {
            std::fs::copy(&built, &object).expect("copy the eBPF object into OUT_DIR");
            println!("cargo:rustc-env=TDPSHARE_EBPF_MISSING=");
        }
        Err(reason) => {
            if required {
                panic!("cannot build the eBPF programs: {reason}");
            }
            println!("cargo:warning=tdpshare probes built without eBPF programs: {reason}");
            std::fs::write(&object, b"").expect("write an empty placeholder");
            println!("cargo:rustc-env=TDPSHARE_EBPF_MISSING={reason}");
        }
    }
}

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn on_path(tool: &str) -> bool {
    let home_bin = env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(home_bin)
        .any(|d| d.join(tool).is_file())
}

/// The CO-RE program: clang's BPF target with BTF (-g), libbpf's headers from libbpf-sys
/// (`links = "bpf"` gives its include directory to this crate, which depends on it directly).
fn build_core(dir: &Path, object: &Path) -> Result<(), String> {
    if !on_path("clang") {
        return Err("clang is not installed; run `cargo xtask setup`".into());
    }
    let include = env::var("DEP_BPF_INCLUDE")
        .map_err(|_| "libbpf-sys gave no include directory (DEP_BPF_INCLUDE)".to_string())?;
    output(
        Command::new("clang")
            .args([
                "-g",
                "-O2",
                "-target",
                "bpf",
                "-D__TARGET_ARCH_x86",
                "-Wall",
                "-Werror",
            ])
            .arg(format!("-I{include}"))
            .arg("-c")
            .arg(dir.join("mmu_page.bpf.c"))
            .arg("-o")
            .arg(object),
    )?;
    Ok(())
}

fn build(crate_dir: &Path, out: &Path) -> Result<PathBuf, String> {
    let hint = "run `cargo xtask setup`";
    let version = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
        .map_err(|e| format!("no nightly toolchain ({e}); {hint}"))?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("?");
    if !llvm.starts_with("22.") {
        return Err(format!(
            "the nightly toolchain uses LLVM {llvm}, but bpf-linker is built against LLVM 22 \
             (bitcode from another LLVM fails with \"Invalid record\"); install a nightly with LLVM 22"
        ));
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        return Err(format!("the nightly toolchain lacks rust-src; {hint}"));
    }
    if !on_path("bpf-linker") {
        return Err(format!("bpf-linker is not installed; {hint}"));
    }
    let target_dir = out.join("ebpf-target");
    let flags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(crate_dir)
        .args(["run", "nightly", "cargo", "build", "--locked", "--release"])
        .args(["-Z", "build-std=core", "--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags);
    // The outer build's toolchain settings must not leak into the nightly one.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(key);
    }
    if let Some(home) = env::var_os("HOME") {
        let path = env::var_os("PATH").unwrap_or_default();
        let mut paths: Vec<PathBuf> = env::split_paths(&path).collect();
        paths.push(PathBuf::from(home).join(".cargo/bin"));
        cmd.env("PATH", env::join_paths(paths).map_err(|e| e.to_string())?);
    }
    output(&mut cmd)?;
    let built = target_dir.join("bpfel-unknown-none/release/tdpshare-probes");
    if !built.is_file() {
        return Err(format!("the eBPF build produced no {}", built.display()));
    }
    Ok(built)
}
