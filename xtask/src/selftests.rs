//! `cargo xtask lab selftests`: the kernel's own KVM and iommufd selftests, written by their
//! maintainers, built from each kernel's tree and run in the lab's L1 on the stock and on the
//! patched kernel (docs/lab.md has the table).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::kernel::{self, Config, cache_dir};
use crate::lab::{self, Boot};
use crate::run;

/// One test: its binary (relative to its suite's output), arguments, and its time limit in
/// the L1 (nested TCG is ~50 times slower than hardware).
struct Test {
    suite: &'static str,
    path: &'static str,
    args: &'static str,
    timeout_s: u32,
}

const fn t(suite: &'static str, path: &'static str, args: &'static str, timeout_s: u32) -> Test {
    Test {
        suite,
        path,
        args,
        timeout_s,
    }
}

/// The tests run: the memslot, pre-fault, dirty-log, SMM and page-table paths the series
/// touches, a few basic vCPU tests, the series' own test of its ioctls, and iommufd's suite on
/// its mock driver. Arguments shrink
/// the long ones to what nested TCG finishes in minutes.
const TESTS: &[Test] = &[
    t("kvm", "set_memory_region_test", "", 300),
    t("kvm", "memslot_modification_stress_test", "-i 100", 300),
    t("kvm", "pre_fault_memory_test", "", 300),
    t("kvm", "dirty_log_test", "-i 3", 600),
    t("kvm", "kvm_page_table_test", "-b 64M", 300),
    t("kvm", "demand_paging_test", "-b 16M", 300),
    t("kvm", "memslot_perf_test", "-s 2 -f 1 -e 1", 600),
    t("kvm", "x86_64/smm_test", "", 300),
    t("kvm", "x86_64/set_sregs_test", "", 300),
    t("kvm", "x86_64/sync_regs_test", "", 300),
    t("kvm", "x86_64/userspace_io_test", "", 300),
    t("kvm", "x86_64/svm_vmcall_test", "", 300),
    t("kvm", "x86_64/state_test", "", 300),
    // The series' own (patches/0008): absent from the stock tree.
    t("kvm", "x86_64/tdp_share_test", "", 300),
    t("iommu", "iommufd", "", 1200),
    t("iommu", "iommufd_fail_nth", "", 600),
];

/// The series' own tests: the patched kernel must pass them (the stock tree has none).
const SERIES_TESTS: [&str; 1] = ["kvm/x86_64/tdp_share_test"];

/// 6.12.117's iommu selftests were updated by stable backports that use names of later uapi
/// headers (6.17's `IOMMU_HW_INFO_TYPE_DEFAULT`, `in_data_type`, `IOMMU_HW_INFO_FLAG_INPUT_TYPE`).
/// Defined to their 6.12 meaning (type 0, the reserved field, a flag only passed with a
/// non-default type) so `iommufd_fail_nth` builds; `iommufd` itself also needs the 6.13+ mock
/// driver (`MOCK_FLAGS_DEVICE_PASID`) and stays unbuilt.
const IOMMU_UAPI_SHIMS: &str = "-DIOMMU_HW_INFO_TYPE_DEFAULT=0 -Din_data_type=__reserved \
                                -DIOMMU_HW_INFO_FLAG_INPUT_TYPE=1";

/// Where a configuration's selftests are built.
fn out_dir(config: Config) -> PathBuf {
    cache_dir().join(format!("selftests-{}", config.name()))
}

/// Builds the KVM and iommu selftests from `config`'s tree against its exported headers.
fn build(config: Config) -> anyhow::Result<PathBuf> {
    let tree = kernel::tree_for(config)?;
    let out = out_dir(config);
    let headers = out.join("headers");
    std::fs::create_dir_all(&headers)?;
    let start = Instant::now();
    // From the kernel's build directory: a make in the source tree itself would leave it
    // unclean for the O= builds.
    run(Command::new("make")
        .arg("-C")
        .arg(&tree)
        .arg(format!("O={}", kernel::build_dir(config).display()))
        .arg(format!("INSTALL_HDR_PATH={}", headers.display()))
        .args(["-s", "headers_install"]))?;
    for suite in ["kvm", "iommu"] {
        let dir = out.join(suite);
        std::fs::create_dir_all(&dir)?;
        let mut khdr = format!("KHDR_INCLUDES=-isystem {}/include", headers.display());
        if suite == "iommu" {
            khdr.push(' ');
            khdr.push_str(IOMMU_UAPI_SHIMS);
        }
        // -k: a test that does not build is reported as such, the others still run.
        let status = Command::new("make")
            .arg("-C")
            .arg(tree.join("tools/testing/selftests").join(suite))
            .arg(format!("OUTPUT={}", dir.display()))
            .arg(&khdr)
            .args(["-s", "-k", "-j2"])
            .status()
            .context("running make for the selftests")?;
        if !status.success() {
            println!("selftests/{suite}: some programs did not build (reported per test)");
        }
    }
    println!(
        "selftests ({} tree) built in {:.0} s: {}",
        config.name(),
        start.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(out)
}

/// The script the L1 runs: each test under `timeout`, one result line each in
/// `/lab/results.txt` (`name exit-status seconds`), its output in `/lab/logs/`.
fn script() -> String {
    let mut s = String::from("mkdir -p /lab/logs; : > /lab/results.txt\n");
    for test in TESTS {
        let name = format!("{}/{}", test.suite, test.path);
        let log = name.replace('/', "_");
        s.push_str(&format!(
            "[ -x /lab/{name} ] || {{ echo \"{name} unbuilt 0 0\" >> /lab/results.txt; }}; \
             [ -x /lab/{name} ] && {{ echo \"selftest: {name} {args}\"; t0=$(cut -d' ' -f1 /proc/uptime); \
             timeout {to} /lab/{name} {args} > /lab/logs/{log}.log 2>&1; rc=$?; \
             t1=$(cut -d' ' -f1 /proc/uptime); \
             echo \"{name} $rc $t0 $t1\" >> /lab/results.txt; \
             echo \"selftest: {name} exit $rc\"; }}\n",
            args = test.args,
            to = test.timeout_s,
        ));
    }
    s.push_str("sync\n");
    s
}

/// What one test gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// kselftest's KSFT_SKIP (4): a prerequisite is missing.
    Skip,
    /// `timeout` ended it.
    Timeout,
    Fail(i32),
    /// No result line: the L1 ended first.
    Missing,
    /// The program did not build from this tree.
    Unbuilt,
}

impl Verdict {
    fn from_status(rc: i32) -> Verdict {
        match rc {
            0 => Verdict::Pass,
            4 => Verdict::Skip,
            124 | 143 => Verdict::Timeout,
            n => Verdict::Fail(n),
        }
    }

    fn text(&self) -> String {
        match self {
            Verdict::Pass => "pass".into(),
            Verdict::Skip => "skip".into(),
            Verdict::Timeout => "timeout".into(),
            Verdict::Fail(n) => format!("FAIL ({n})"),
            Verdict::Missing => "no result".into(),
            Verdict::Unbuilt => "not built".into(),
        }
    }
}

/// Test name → (verdict, seconds in the L1).
type Results = BTreeMap<String, (Verdict, f64)>;

/// `results.txt` → [`Results`].
fn parse_results(text: &str) -> Results {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [name, rc, t0, t1] = f[..] else { continue };
        if rc == "unbuilt" {
            out.insert(name.to_owned(), (Verdict::Unbuilt, 0.0));
            continue;
        }
        let (Ok(rc), Ok(t0), Ok(t1)) = (rc.parse::<i32>(), t0.parse::<f64>(), t1.parse::<f64>())
        else {
            continue;
        };
        out.insert(name.to_owned(), (Verdict::from_status(rc), t1 - t0));
    }
    out
}

/// A kselftest harness program exits 0 when every case was skipped: its log's
/// `# Totals: pass:0 fail:0 ... skip:N` line says so. Such a pass is a skip.
fn all_skipped(log: &str) -> bool {
    let Some(totals) = log.lines().rev().find_map(|l| l.strip_prefix("# Totals: ")) else {
        return false;
    };
    let field = |name: &str| {
        totals
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix(':')?.parse::<u64>().ok())
    };
    field("pass") == Some(0) && field("fail") == Some(0) && field("skip").is_some_and(|n| n > 0)
}

/// [`parse_results`], with passes whose log shows only skipped cases turned into skips.
fn read_results(dir: &Path) -> Results {
    let text = std::fs::read_to_string(dir.join("results.txt")).unwrap_or_default();
    let mut results = parse_results(&text);
    for (name, (verdict, _)) in results.iter_mut() {
        let log = dir
            .join("logs")
            .join(format!("{}.log", name.replace('/', "_")));
        if *verdict == Verdict::Pass && std::fs::read_to_string(log).is_ok_and(|l| all_skipped(&l))
        {
            *verdict = Verdict::Skip;
        }
    }
    results
}

/// Copies the built tests into `dir` (the L1's /lab), suite by suite; at least one must exist.
fn stage(built: &Path, dir: &Path) -> anyhow::Result<()> {
    let mut staged = 0;
    for test in TESTS {
        let from = built.join(test.suite).join(test.path);
        if !from.exists() {
            continue;
        }
        staged += 1;
        let to = dir.join(test.suite).join(test.path);
        std::fs::create_dir_all(to.parent().context("a test's directory")?)?;
        std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
    }
    ensure!(staged > 0, "no selftest was built in {}", built.display());
    Ok(())
}

/// `cargo xtask lab selftests`: builds and runs the selftests on the chosen kernels and prints
/// the table (test, stock, patched); fails when the patched kernel fails a test the stock one
/// passes.
pub fn selftests(configs: &[Config], mem_mib: u64, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    kernel::fetch()?;
    kernel::patches_apply()?;
    let mut results: Vec<(Config, Results, Duration)> = Vec::new();
    for &config in configs {
        kernel::build(config)?;
        let built = build(config)?;
        lab::build()?;
        let name = format!("selftests-{}", config.name());
        let outcome = lab::boot_with(
            &Boot {
                config,
                mem_mib,
                smp: 1,
                scalable: true,
                disk: None,
                timeout,
                command: "sh /lab/selftests.sh".into(),
                name: name.clone(),
            },
            |dir| {
                stage(&built, dir)?;
                std::fs::write(dir.join("selftests.sh"), script())?;
                Ok(())
            },
        )?;
        results.push((config, read_results(&outcome.results), outcome.wall));
    }
    let mut table = String::from("| test | arguments |");
    let mut rule = String::from("|---|---|");
    for (config, _, _) in &results {
        table.push_str(&format!(" {} |", label(*config)));
        rule.push_str("---|");
    }
    table.push('\n');
    table.push_str(&rule);
    table.push('\n');
    let mut regressions = Vec::new();
    for test in TESTS {
        let name = format!("{}/{}", test.suite, test.path);
        table.push_str(&format!("| `{}` | `{}` |", name, test.args));
        for (_, r, _) in &results {
            let (v, secs) = r.get(&name).cloned().unwrap_or((Verdict::Missing, 0.0));
            table.push_str(&format!(" {} ({secs:.0} s) |", v.text()));
        }
        table.push('\n');
        let verdict = |c: Config| {
            results
                .iter()
                .find(|(k, _, _)| *k == c)
                .map(|(_, r, _)| r.get(&name).map_or(Verdict::Missing, |(v, _)| v.clone()))
        };
        if let (Some(Verdict::Pass), Some(p)) = (verdict(Config::Stock), verdict(Config::Lab))
            && p != Verdict::Pass
        {
            regressions.push(name.clone());
        }
        if verdict(Config::Lab).is_some_and(|v| matches!(v, Verdict::Fail(_) | Verdict::Missing))
            && verdict(Config::Stock).is_none()
        {
            regressions.push(name);
        } else if SERIES_TESTS.contains(&name.as_str())
            && verdict(Config::Lab).is_some_and(|v| v != Verdict::Pass)
        {
            // The series' own test has nothing to compare with: it must pass.
            regressions.push(name);
        }
    }
    println!("\n{table}");
    for (config, _, wall) in &results {
        println!(
            "{}: one L1 run, {:.0} s",
            label(*config),
            wall.as_secs_f64()
        );
    }
    println!("in all {:.0} s", start.elapsed().as_secs_f64());
    let report = cache_dir().join("lab/selftests.md");
    std::fs::write(&report, &table)?;
    println!("table: {}", report.display());
    if !regressions.is_empty() {
        bail!(
            "the patched kernel fails what the stock kernel passes, or its own tests: {}",
            regressions.join(", ")
        );
    }
    Ok(())
}

fn label(config: Config) -> &'static str {
    if config == Config::Stock {
        "stock"
    } else {
        "patched"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_lines_become_verdicts() {
        let r = parse_results(
            "kvm/set_memory_region_test 0 10.5 20.5\nkvm/x86_64/smm_test 4 1 2\n\
             iommu/iommufd 1 3 9\nkvm/dirty_log_test 124 0 600\ngarbage\n\
             iommu/iommufd_fail_nth unbuilt 0 0\n",
        );
        assert_eq!(r["kvm/set_memory_region_test"], (Verdict::Pass, 10.0));
        assert_eq!(r["kvm/x86_64/smm_test"].0, Verdict::Skip);
        assert_eq!(r["iommu/iommufd"].0, Verdict::Fail(1));
        assert_eq!(r["kvm/dirty_log_test"].0, Verdict::Timeout);
        assert_eq!(r["iommu/iommufd_fail_nth"].0, Verdict::Unbuilt);
        assert_eq!(r.len(), 5);
    }

    #[test]
    fn a_harness_run_that_skipped_every_case_is_a_skip() {
        assert!(all_skipped(
            "ok 7 x # SKIP no\n# PASSED: 7 / 7 tests passed.\n\
             # Totals: pass:0 fail:0 xfail:0 xpass:0 skip:7 error:0"
        ));
        assert!(!all_skipped(
            "# Totals: pass:3 fail:0 xfail:0 xpass:0 skip:7 error:0"
        ));
        assert!(!all_skipped("no totals here"));
    }

    #[test]
    fn the_script_runs_every_test_under_its_timeout() {
        let s = script();
        for test in TESTS {
            assert!(s.contains(&format!(
                "timeout {} /lab/{}/{}",
                test.timeout_s, test.suite, test.path
            )));
        }
    }
}
