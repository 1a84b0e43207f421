//! The reports on traces with known answers: simulator traces built for them, and recordings
//! made on this project's machines; the Parquet dataset read back by polars and by DuckDB.

use std::path::{Path, PathBuf};
use std::process::Command;

use tdpshare::sim::{RunOptions, Scenario, run_mode};
use tdpshare::{Event, Header, ShareMode, Source, TraceFile, TraceReader};
use tdpshare_analysis::dataset::{self, Dataset, LoadOptions};
use tdpshare_analysis::frame;
use tdpshare_analysis::report::{huge, roots, whatif};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/traces")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tdpshare-reports-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_trace(path: &Path, source: Source, events: &[Event]) {
    let mut header = Header::new(source, "");
    header.start_unix_ns = 1_795_867_200_000_000_000;
    let mut t = TraceFile::create(path, &header).unwrap();
    for e in events {
        t.write(e).unwrap();
    }
    t.finish().unwrap();
}

fn read(path: &Path) -> Vec<Event> {
    TraceReader::open(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A 4 GiB guest sharing in `mode` whose VMM deletes (and re-adds) a slot `n` times.
fn deletions_scenario(n: usize) -> Scenario {
    let mut toml = String::from(
        r#"
name = "deletions"
[vm]
vcpus = 1
huge_pages = true
[[timeline]]
at_us = 0
do = "memslot_add"
slot = 0
as_id = 0
gpa = 0x0
size = 0xc0000000
hpa = 0x7f0000000000
[[timeline]]
at_us = 0
do = "memslot_add"
slot = 1
as_id = 0
gpa = 0x100000000
size = 0x40000000
hpa = 0x7f1000000000
[[timeline]]
at_us = 10
do = "share_start"
"#,
    );
    for i in 0..n {
        let at = 1000 * (i + 1);
        toml += &format!(
            r#"
[[timeline]]
at_us = {at}
do = "memslot_add"
slot = 2
as_id = 0
gpa = 0xfd000000
size = 0x1000000
hpa = 0x7f2000000000
[[timeline]]
at_us = {}
do = "memslot_delete"
slot = 2
as_id = 0
"#,
            at + 500
        );
    }
    Scenario::parse(Path::new("deletions.toml"), &toml).unwrap()
}

fn simulate(scenario: &Scenario, mode: ShareMode, dir: &Path) -> PathBuf {
    let run = run_mode(scenario, mode, 7, RunOptions::default()).unwrap();
    let path = dir.join(format!("{}-{}.jsonl", scenario.name, mode.name()));
    write_trace(&path, Source::Simulator, &run.events);
    path
}

fn open(paths: &[PathBuf]) -> Dataset {
    Dataset::open(paths, &LoadOptions::default()).unwrap()
}

#[test]
fn five_deletions_are_five_attributed_root_updates() {
    let dir = scratch("five");
    let trace = simulate(&deletions_scenario(5), ShareMode::PinPrepopulate, &dir);
    let all = roots::attribute(&open(&[trace]), 1_000_000_000).unwrap();
    let zaps: Vec<_> = all.iter().filter(|a| a.update == "fast_zap").collect();
    assert_eq!(zaps.len(), 5);
    assert!(zaps.iter().all(|a| a.class == "memslot_delete"));
    let new_roots: Vec<_> = all
        .iter()
        .filter(|a| a.update == "root_alloc" && a.class != "initial")
        .collect();
    assert_eq!(new_roots.len(), 5, "{new_roots:#?}");
    assert!(
        new_roots
            .iter()
            .all(|a| a.class == "memslot_delete" && a.via_fast_zap)
    );
    // The 2021 design re-pre-populates after each: five full pre-populations, each named.
    let prepops: Vec<_> = all
        .iter()
        .filter(|a| a.update == "prepopulate_end")
        .collect();
    assert_eq!(prepops.len(), 5);
    assert!(
        prepops
            .iter()
            .all(|a| a.class == "memslot_delete" && a.entries > 0)
    );
    // Each deletion named is slot 2 at 0xfd000000.
    assert!(zaps.iter().all(|a| {
        a.trigger
            .as_ref()
            .unwrap()
            .detail
            .starts_with("slot 2 as 0 at 0xfd000000")
    }));
}

#[test]
fn every_fast_zap_of_a_live_seabios_boot_follows_its_deletion() {
    for (name, zaps) in [
        ("live-seabios-qemu-512m.jsonl", 12),
        ("linux-boot-q35-8g.seabios.jsonl", 33),
        ("linux-boot-q35-8g.linux.jsonl", 61),
    ] {
        let all = roots::attribute(&open(&[fixture(name)]), 1_000_000_000).unwrap();
        let z: Vec<_> = all.iter().filter(|a| a.update == "fast_zap").collect();
        assert_eq!(z.len(), zaps, "{name}");
        for a in &z {
            assert_eq!(a.class, "memslot_delete", "{name} at {} ns", a.ts_ns);
            // Right before: KVM zaps within the deletion's ioctl (milliseconds in the TCG lab).
            assert!(a.gap_ns().unwrap() < 20_000_000, "{name}: {a:?}");
        }
        assert!(
            all.iter()
                .filter(|a| a.update == "root_alloc")
                .all(|a| a.class != "unattributed"),
            "{name}"
        );
    }
}

#[test]
fn a_trigger_outside_the_window_is_not_taken() {
    // The same recording with a 1 us window: the fast zaps come 7-74 us after their deletion.
    let all = roots::attribute(&open(&[fixture("live-seabios-qemu-512m.jsonl")]), 1_000).unwrap();
    assert!(
        all.iter()
            .filter(|a| a.update == "fast_zap")
            .all(|a| a.class == "unattributed")
    );
}

#[test]
fn boot_8g_in_the_2021_mode_names_causes_savings_and_coverage() {
    let dir = scratch("boot8g");
    let scenario = Scenario::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../kmod/scenarios/boot-8g.toml"),
    )
    .unwrap();
    let trace = simulate(&scenario, ShareMode::PinPrepopulate, &dir);
    let ds = open(&[trace]);
    let all = roots::attribute(&ds, 1_000_000_000).unwrap();
    let prepops: Vec<_> = all
        .iter()
        .filter(|a| a.update == "prepopulate_end")
        .collect();
    // 12 pre-populations after new roots, every one caused by a memslot deletion.
    assert_eq!(prepops.len(), 12);
    assert!(prepops.iter().all(|a| a.class == "memslot_delete"));
    // What-if: the optimized mode needs one full pre-population (at sharing start).
    let runs = whatif::replay(
        &ds,
        &[ShareMode::PinPrepopulate, ShareMode::Optimized],
        whatif::WhatIfOptions::default(),
    )
    .unwrap();
    let full = |m: ShareMode| {
        runs.iter()
            .find(|r| r.mode == m)
            .unwrap()
            .run
            .as_ref()
            .unwrap()
            .stats
            .full_prepopulations
    };
    assert_eq!(full(ShareMode::PinPrepopulate), 13);
    assert_eq!(full(ShareMode::Optimized), 1);
    // Huge pages: 8 GiB of RAM pinned, mapped with 2M leaves but for the first MiB; the
    // dirty-logging round splits the 2.5 GiB slot's 2M leaves, each attributed to it.
    let vms = huge::walk(&ds, 1_000_000_000).unwrap();
    assert_eq!(vms.len(), 1);
    let v = &vms[0];
    let first_full = *v.timeline.iter().find(|c| c.total() > 0).unwrap();
    assert!(first_full.bytes[1] >= 8 << 30, "{first_full:?}");
    assert!(first_full.bytes[0] < 2 << 20, "{first_full:?}");
    assert_eq!(v.splits.len(), 2560);
    assert!(
        v.splits
            .iter()
            .all(|s| s.reason == huge::SplitReason::DirtyLogging && s.level == 2)
    );
    let peak = v.timeline.iter().map(|c| c.total()).max().unwrap();
    assert!((8 << 30..9 << 30).contains(&peak), "{peak}");
}

#[test]
fn rows_turn_back_into_the_same_events() {
    let dir = scratch("rows");
    let scenario = deletions_scenario(2);
    let mut inputs = vec![
        fixture("live-seabios-qemu-512m.jsonl"),
        fixture("linux-boot-q35-8g.linux.jsonl"),
        // One event of every type (the trace reader's fuzz seed).
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/seeds/trace_reader/every-kind.jsonl"),
    ];
    for mode in ShareMode::ALL {
        inputs.push(simulate(&scenario, mode, &dir));
    }
    for path in inputs {
        let original = read(&path);
        let mut b = frame::Builder::new();
        let origin = frame::Origin {
            trace: "t".into(),
            host: "h".into(),
            start_unix_ns: 0,
        };
        for e in &original {
            b.push(&origin, e);
        }
        let df = b.take().unwrap();
        assert_eq!(frame::events(&df).unwrap(), original, "{}", path.display());
    }
}

#[test]
fn the_parquet_dataset_reads_back_in_polars_and_duckdb() {
    let dir = scratch("parquet");
    let sim = simulate(&deletions_scenario(3), ShareMode::Optimized, &dir);
    let traces = vec![
        fixture("live-seabios-qemu-512m.jsonl"),
        fixture("linux-boot-q35-8g.linux.jsonl"),
        sim,
    ];
    let out = dir.join("dataset");
    let opts = LoadOptions {
        host: Some("lab host".into()),
        ..Default::default()
    };
    let summary = dataset::export(&traces, &out, &opts).unwrap();
    let total: usize = traces.iter().map(|t| read(t).len()).sum();
    assert_eq!(summary.events as usize, total);
    // Hive layout: host=…/date=…/<trace>.parquet, the host escaped.
    for (file, _) in &summary.files {
        let rel = file
            .strip_prefix(&out)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(rel.starts_with("host=lab%20host/date=20"), "{rel}");
    }
    // polars: the same rows as loading the traces directly, partition columns included.
    let direct = Dataset::open(&traces, &opts)
        .unwrap()
        .sorted()
        .unwrap()
        .collect()
        .unwrap();
    let back = open(std::slice::from_ref(&out))
        .sorted()
        .unwrap()
        .collect()
        .unwrap();
    assert_eq!(back.height(), total);
    assert!(back.equals_missing(&direct), "{back:?}\n{direct:?}");
    assert_eq!(
        frame::events(&back).unwrap(),
        frame::events(&direct).unwrap()
    );
    // Exporting again replaces the files instead of adding rows.
    dataset::export(&traces, &out, &opts).unwrap();
    assert_eq!(
        open(std::slice::from_ref(&out))
            .lazy()
            .unwrap()
            .collect()
            .unwrap()
            .height(),
        total
    );

    // DuckDB, from the venv `cargo xtask setup` makes.
    let Some(python) = std::env::var_os("TDPSHARE_DUCKDB_PYTHON") else {
        eprintln!(
            "TDPSHARE_DUCKDB_PYTHON not set: `cargo xtask test` sets it (DuckDB part skipped)"
        );
        return;
    };
    let query = format!(
        "import duckdb\n\
         r = duckdb.sql(\"select host, type, count(*) as n, sum(coalesce(entries, 0)) as e, \
         min(date) as d from read_parquet('{}/**/*.parquet', hive_partitioning = true) \
         group by all order by all\").fetchall()\n\
         for row in r: print('|'.join(str(x) for x in row))\n",
        out.display()
    );
    let o = Command::new(python).args(["-c", &query]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let duck = String::from_utf8(o.stdout).unwrap();
    // The same counts from polars.
    use polars::prelude::*;
    let expect = direct
        .lazy()
        .group_by([col("host"), col("type")])
        .agg([
            len().alias("n"),
            col("entries").fill_null(lit(0u64)).sum().alias("e"),
            col("date").min().alias("d"),
        ])
        .sort(["host", "type"], Default::default())
        .collect()
        .unwrap();
    let mut lines = Vec::new();
    for i in 0..expect.height() {
        let row = expect.get_row(i).unwrap().0;
        let s: Vec<String> = row
            .iter()
            .map(|v| v.to_string().trim_matches('"').to_owned())
            .collect();
        lines.push(s.join("|"));
    }
    assert_eq!(duck.trim_end(), lines.join("\n"));
}

#[test]
fn a_bad_line_fails_the_load_with_its_number() {
    let dir = scratch("bad");
    let good = read(&fixture("live-seabios-qemu-512m.jsonl"));
    let path = dir.join("bad.jsonl");
    write_trace(&path, Source::Live, &good[..3]);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text += "{\"ts_ns\": 5, \"vm\": 1, \"source\": \"live\", \"kind\": {\"type\": \"fast_zap\"}}\n";
    std::fs::write(&path, &text).unwrap();
    let err = Dataset::open(std::slice::from_ref(&path), &LoadOptions::default()).unwrap_err();
    let msg = format!("{:#}", anyhow::Error::new(err));
    assert!(msg.contains("line 5") && msg.contains("fast_zap"), "{msg}");
    // The command line says so and exits non-zero, writing nothing.
    let out = dir.join("report.md");
    let o = Command::new(env!("CARGO_BIN_EXE_tdpshare-analyze"))
        .arg("report")
        .arg(&path)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 5"));
    assert!(!out.exists());
    // A missing input too.
    let o = Command::new(env!("CARGO_BIN_EXE_tdpshare-analyze"))
        .args(["summary", "/nonexistent/trace.jsonl"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such file"));
}

#[test]
fn a_large_trace_spills_and_reports_the_same() {
    // Batches of 1000 rows, spilling past 2000: the linux boot (599 events) and a simulated
    // 8 GiB boot (about 10 000) go through the spill files; every report query sees the same.
    let dir = scratch("spill");
    let scenario = Scenario::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../kmod/scenarios/boot-8g.toml"),
    )
    .unwrap();
    let inputs = vec![
        fixture("linux-boot-q35-8g.linux.jsonl"),
        simulate(&scenario, ShareMode::PinPrepopulate, &dir),
    ];
    let small = LoadOptions {
        spill_rows: Some(2000),
        batch_rows: Some(1000),
        ..Default::default()
    };
    let spilled = Dataset::open(&inputs, &small).unwrap();
    let spill = spilled.spill_dir().unwrap().to_path_buf();
    assert!(std::fs::read_dir(&spill).unwrap().count() >= 9);
    let memory = open(&inputs);
    assert!(memory.spill_dir().is_none());
    let a = spilled.sorted().unwrap().collect().unwrap();
    let b = memory.sorted().unwrap().collect().unwrap();
    assert!(a.equals_missing(&b));
    assert_eq!(
        roots::attribute(&spilled, 1_000_000_000).unwrap(),
        roots::attribute(&memory, 1_000_000_000).unwrap()
    );
    drop(spilled);
    assert!(
        !spill.exists(),
        "the spill directory is removed with the dataset"
    );
}

fn ev(ts_ns: u64, kind: tdpshare::EventKind) -> Event {
    Event::new(ts_ns, 9, Source::Live, kind)
}

fn slot(s: u16, gpa: u64, size: u64, flags: u32) -> tdpshare::event::Memslot {
    tdpshare::event::Memslot {
        slot: s,
        as_id: 0,
        gpa: tdpshare::Gpa(gpa),
        size,
        flags,
        ua: 0x7f00_0000_0000 + gpa,
    }
}

#[test]
fn splits_get_the_reason_that_came_before_them() {
    use tdpshare::EventKind as K;
    use tdpshare::Gfn;
    let dir = scratch("splits");
    let path = dir.join("splits.jsonl");
    let two_m = 512u64;
    write_trace(
        &path,
        Source::Live,
        &[
            // Slot 1: 0..1 GiB; slot 2 starts at 1 GiB + 1 MiB (a boundary inside a 2M page).
            ev(0, K::MemslotAdd(slot(1, 0, 1 << 30, 0))),
            ev(1, K::MemslotAdd(slot(2, (1 << 30) + (1 << 20), 1 << 30, 0))),
            // An instruction fetch in the 2M page at gfn 512, then its split.
            ev(
                10,
                K::PageFault {
                    gfn: Gfn(two_m + 3),
                    error_code: 0x14,
                },
            ),
            ev(
                11,
                K::HugePageSplit {
                    gfn: Gfn(two_m),
                    level: 2,
                },
            ),
            // A split with nothing before it.
            ev(
                20,
                K::HugePageSplit {
                    gfn: Gfn(4 * two_m),
                    level: 2,
                },
            ),
            // Across the boundary at 1 GiB + 1 MiB.
            ev(
                30,
                K::HugePageSplit {
                    gfn: Gfn((1 << 30) >> 12),
                    level: 2,
                },
            ),
            // Dirty logging on slot 2, then a split in it.
            ev(
                40,
                K::MemslotFlags {
                    old_flags: 0,
                    slot: slot(2, (1 << 30) + (1 << 20), 1 << 30, 1),
                },
            ),
            ev(
                41,
                K::HugePageSplit {
                    gfn: Gfn(((1 << 30) >> 12) + 3 * two_m),
                    level: 2,
                },
            ),
            // A huge leaf loses write access, then splits.
            ev(
                50,
                K::SpteSet {
                    gfn: Gfn(8 * two_m),
                    level: 2,
                    old: tdpshare::event::SpteFlags::parse("prwxh----").unwrap(),
                    new: tdpshare::event::SpteFlags::parse("pr-xh----").unwrap(),
                },
            ),
            ev(
                51,
                K::HugePageSplit {
                    gfn: Gfn(8 * two_m),
                    level: 2,
                },
            ),
        ],
    );
    let vms = huge::walk(&open(&[path]), 1_000_000_000).unwrap();
    let reasons: Vec<_> = vms[0].splits.iter().map(|s| s.reason).collect();
    use huge::SplitReason as R;
    assert_eq!(
        reasons,
        [
            R::NxHugepage,
            R::Other,
            R::MemslotBoundary,
            R::DirtyLogging,
            R::PermissionChange
        ]
    );
    // NX-hugepage and dirty-logging splits are the ones an exempt IOMMU side keeps huge.
    let exempt: u64 = vms[0]
        .splits
        .iter()
        .filter(|s| s.reason.iommu_exempt())
        .map(|s| s.bytes())
        .sum();
    assert_eq!(exempt, 2 * (2 << 20));
}

#[test]
fn iotlb_and_dma_reports_count_what_they_say() {
    use tdpshare::EventKind as K;
    use tdpshare::event::{FlushScope, GpaRange};
    let dir = scratch("iotlb");
    let path = dir.join("flushes.jsonl");
    let range = |start: u64| Some(GpaRange::new(tdpshare::Gpa(start), 4096));
    let flush = |ts: u64, domain: u32, start: u64| {
        ev(
            ts,
            K::IotlbFlush {
                scope: FlushScope::Range,
                domain: Some(domain),
                range: range(start),
                ns: 1000,
            },
        )
    };
    let map = |ts: u64, iova: u64, size: u64, ns: u64| {
        ev(
            ts,
            K::IommuMap {
                iova: tdpshare::Iova(iova),
                size,
                ns,
            },
        )
    };
    write_trace(
        &path,
        Source::Live,
        &[
            // Domain 1: three within 10 us of each other (two batchable), one 1 ms later.
            flush(0, 1, 0),
            flush(2_000, 1, 4096),
            flush(4_000, 1, 8192),
            flush(1_004_000, 1, 0),
            // Domain 2, interleaved: its own first flush is not batchable.
            flush(3_000, 2, 0),
            ev(
                5_000,
                K::IotlbFlush {
                    scope: FlushScope::Domain,
                    domain: Some(1),
                    range: None,
                    ns: 3000,
                },
            ),
            // Two timed 2 MiB maps at 2M-aligned IOVAs, one untimed 4K map.
            map(10_000, 2 << 20, 2 << 20, 40_000),
            map(20_000, 4 << 20, 2 << 20, 60_000),
            map(30_000, 4096, 4096, 0),
        ],
    );
    let ds = open(&[path]);
    let s = tdpshare_analysis::report::iotlb::section(&ds, 10_000).unwrap();
    assert!(s.finding.starts_with("6 IOTLB flushes"), "{}", s.finding);
    assert!(
        s.finding.contains("5 range flushes, of which 2 (40%)"),
        "{}",
        s.finding
    );
    let d = tdpshare_analysis::report::dma::section(&ds).unwrap();
    let rows = &d.tables[0].rows;
    assert_eq!(rows.len(), 1, "{rows:?}");
    use tdpshare_analysis::report::Cell;
    assert_eq!(rows[0][1], Cell::text("2M"));
    assert_eq!(rows[0][2], Cell::Int(2));
    assert_eq!(rows[0][3], Cell::Float(50.0, 2));
    assert!(d.finding.contains("1 more were not timed"), "{}", d.finding);
}

#[test]
fn a_reader_that_goes_away_is_not_an_error() {
    // `tdpshare-analyze report … | head`: the report (hundreds of KB with every split) meets
    // a closed pipe; the command ends quietly with success, as Unix tools do.
    let dir = scratch("pipe");
    let scenario = Scenario::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../kmod/scenarios/boot-8g.toml"),
    )
    .unwrap();
    let trace = simulate(&scenario, ShareMode::PinPrepopulate, &dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tdpshare-analyze"))
        .args(["report", "--only", "huge"])
        .arg(&trace)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn the_summary_names_each_vm_and_does_not_count_its_name() {
    let every =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/trace_reader/every-kind.jsonl");
    let rows = tdpshare_analysis::report::summary::metrics(&open(&[every])).unwrap();
    let live = rows.iter().find(|r| r.1 == 136).expect("the live VM");
    assert_eq!(live.2, "seabios-512m");
    // Seven events besides its name.
    assert_eq!(live.4[0], 7.0);
    let sim = rows.iter().find(|r| r.1 == 1).expect("the simulated VM");
    assert_eq!(sim.2, "");
}
