//! `tdpshare-analyze` as a user runs it.

use std::path::Path;
use std::process::Command;

fn analyze() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tdpshare-analyze"))
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/traces")
        .join(name)
}

#[test]
fn filter_keeps_the_named_types_and_the_header() {
    let dir = std::env::temp_dir().join(format!("tdpshare-filter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("deletes.jsonl");
    let input = fixture("linux-boot-q35-8g.linux.jsonl");
    let status = analyze()
        .arg("filter")
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .args(["--type", "memslot_delete", "--type", "smm_transition"])
        .status()
        .unwrap();
    assert!(status.success());
    let kept = tdpshare::TraceReader::open(&out).unwrap();
    let header = kept.header().clone();
    let events: Vec<_> = kept.collect::<Result<_, _>>().unwrap();
    assert_eq!(
        header,
        tdpshare::TraceReader::open(&input)
            .unwrap()
            .header()
            .clone()
    );
    let names: std::collections::BTreeSet<_> = events.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["memslot_delete", "smm_transition"]
    );
    assert_eq!(events.len(), 61 + 6);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn filter_names_an_unknown_type_and_writes_nothing() {
    let dir = std::env::temp_dir().join(format!("tdpshare-filter-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("x.jsonl");
    let result = analyze()
        .arg("filter")
        .arg(fixture("linux-boot-q35-8g.linux.jsonl"))
        .arg("-o")
        .arg(&out)
        .args(["--type", "memslot_remove"])
        .output()
        .unwrap();
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("unknown event type `memslot_remove`"),
        "{stderr}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_scenario_for_a_vm_the_trace_lacks_is_an_error() {
    let out = analyze()
        .arg("scenario")
        .arg(fixture("live-seabios-qemu-512m.jsonl"))
        .args(["--vm", "42"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no event of VM 42") && err.contains("its VMs: 17765"),
        "{err}"
    );
}
