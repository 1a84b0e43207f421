//! Assembles the lab's L2 payload (`payload/payload.s`) with GNU as and objcopy into a flat
//! binary in OUT_DIR, which `tdpshare-lab` includes. Nothing built is checked in.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (binutils is needed)"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets it"));
    let source = manifest.join("payload/payload.s");
    println!("cargo:rerun-if-changed={}", source.display());
    let object = out.join("payload.o");
    run(Command::new("as")
        .arg("--32")
        .arg("-o")
        .arg(&object)
        .arg(&source));
    run(Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&object)
        .arg(out.join("payload.bin")));
}
