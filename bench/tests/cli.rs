//! `tdpshare-bench` as a user runs it: bad input is refused with its cause, nothing written.

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tdpshare-bench"))
}

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tdpshare-bench-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn an_existing_report_directory_is_never_overwritten() {
    let dir = temp("exists");
    std::fs::write(dir.join("report.md"), "keep me").unwrap();
    let out = bench().arg("run").arg("--out").arg(&dir).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists: give a new directory"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("report.md")).unwrap(),
        "keep me"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn compare_names_a_file_that_is_not_a_result() {
    let dir = temp("compare");
    let bad = dir.join("results.json");
    std::fs::write(&bad, "[1, 2]").unwrap();
    let out = bench().arg("compare").arg(&bad).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a results.json"), "{err}");
    let missing = bench()
        .arg("compare")
        .arg(dir.join("nope.json"))
        .arg(&bad)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("reading"));
    std::fs::remove_dir_all(&dir).unwrap();
}
