//! The exporter as operators run it. What `deploy/` ships, checked against the exporter
//! itself: the Grafana dashboard and the alerting rules only use metrics it serves, the rules
//! pass promtool (syntax and their unit tests), the systemd unit asks for the capabilities the
//! integration test runs it with. Then (root) the integration test: the exporter, unprivileged
//! with the unit's capabilities, scraped by a real Prometheus while a QEMU/KVM guest boots.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use tdpshare_probes::exporter::metrics::{FAMILIES, sample_names};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// Every sample name the exporter serves, plus what Prometheus adds (`up`).
fn served() -> BTreeSet<String> {
    FAMILIES
        .iter()
        .flat_map(sample_names)
        .chain(["up".to_owned()])
        .collect()
}

/// The metric names a PromQL expression uses (identifiers followed by `{`, `[` or `)`, or
/// standing alone, that look like ours).
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_alphabetic() || bytes[i] == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let word = &expr[start..i];
            let prev = expr[..start].trim_end().chars().last();
            // A label name (inside braces or a by/without list) is followed by = or , or ).
            let next = expr[i..].trim_start().chars().next();
            let is_label = matches!(next, Some('=' | '!' | '~')) || prev == Some('$');
            if (word.starts_with("tdpshare_") || word.starts_with("process_") || word == "up")
                && !is_label
            {
                out.push(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn the_expression_scanner_finds_metrics_not_labels() {
    let e = r#"sum by (vm) (rate(tdpshare_fast_zaps_total{vm=~"$vm"}[5m])) / up"#;
    assert_eq!(metrics_in(e), ["tdpshare_fast_zaps_total", "up"]);
}

#[test]
fn the_dashboard_has_the_three_paths_and_only_served_metrics() {
    let text = std::fs::read_to_string(deploy("grafana/tdpshare.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(dash["uid"], "tdpshare");
    let panels = dash["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for want in [
        "Pre-populations per minute",
        "Root updates per second",
        "IOTLB flushes per second",
        "Pre-population p99",
        "IOTLB flush p99",
        "DMA map p99",
        "Probes attached",
        "Ring-buffer drops (range)",
        "Pre-populations per minute by host",
    ] {
        assert!(titles.contains(&want), "no panel {want:?}: {titles:?}");
    }
    let served = served();
    let mut used = 0;
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            for m in metrics_in(expr) {
                assert!(served.contains(&m), "{}: {m} is not served", p["title"]);
                used += 1;
            }
        }
        // Panels do not overlap the 24-column grid.
        if let Some(g) = p.get("gridPos") {
            assert!(g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24);
        }
    }
    assert!(used >= 20, "{used} metric uses");
    // Variables the expressions use exist.
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["datasource", "instance", "vm"] {
        assert!(vars.contains(&v), "{vars:?}");
    }
}

/// `cargo xtask test` requires the Prometheus tests to run (TDPSHARE_REQUIRE_PROMETHEUS=1).
fn required() -> bool {
    std::env::var("TDPSHARE_REQUIRE_PROMETHEUS").as_deref() == Ok("1")
}

/// promtool, or `None` (skipped) — unless TDPSHARE_REQUIRE_PROMETHEUS=1 (`cargo xtask test`).
fn promtool() -> Option<&'static str> {
    if Command::new("promtool").arg("--version").output().is_ok() {
        return Some("promtool");
    }
    assert!(
        !required(),
        "promtool is missing (cargo xtask setup installs Debian's prometheus)"
    );
    println!("skipped: promtool is not installed");
    None
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests_and_use_served_metrics() {
    let rules = std::fs::read_to_string(deploy("prometheus/rules.yml")).unwrap();
    let served = served();
    let mut exprs = 0;
    // `expr:` values, single-line or folded (`>-` and the indented lines after it).
    let lines: Vec<&str> = rules.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let Some(rest) = l.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let mut expr = rest.trim().to_owned();
        if expr.starts_with('>') || expr.starts_with('|') {
            let indent = l.len() - l.trim_start().len();
            expr = lines[i + 1..]
                .iter()
                .take_while(|n| n.len() - n.trim_start().len() > indent)
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
        }
        for m in metrics_in(&expr) {
            assert!(
                served.contains(&m),
                "rules.yml line {}: {m} is not served",
                i + 1
            );
        }
        exprs += 1;
    }
    assert_eq!(exprs, 5);
    let Some(promtool) = promtool() else {
        return;
    };
    let dir = deploy("prometheus");
    for args in [
        ["check", "rules", "rules.yml"],
        ["test", "rules", "rules_test.yml"],
    ] {
        let out = Command::new(promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The unit's capabilities, as the integration test grants them.
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(deploy("tdpshare-exporter.service")).unwrap();
    unit.lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities= in the unit")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_unit_runs_the_exporter_unprivileged_with_bounded_capabilities() {
    let unit = std::fs::read_to_string(deploy("tdpshare-exporter.service")).unwrap();
    let caps = unit_capabilities();
    assert_eq!(caps, ["CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH"]);
    let bounding = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap();
    assert_eq!(bounding.split_whitespace().collect::<Vec<_>>(), caps);
    for line in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "KillSignal=SIGTERM",
        "ExecStart=/usr/local/bin/tdpshare-probe serve --listen 127.0.0.1:10143",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing");
    }
    assert_eq!(
        tdpshare_probes::exporter::DEFAULT_PORT,
        10143,
        "the unit, the docs and the default agree"
    );
    // systemd's own check, where systemd-analyze exists (it objects only to the binary's
    // absence from /usr/local/bin here).
    if let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(deploy("tdpshare-exporter.service"))
        .output()
    {
        let err = String::from_utf8_lossy(&out.stderr);
        for l in err.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                l.contains("/usr/local/bin/tdpshare-probe"),
                "systemd-analyze: {l}"
            );
        }
    }
}

/// Percent-encodes a query parameter.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Why the live test cannot run here (root, /dev/kvm, QEMU, setpriv).
fn live_skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("no /dev/kvm".into());
    }
    for tool in ["qemu-system-x86_64", "setpriv"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child killed (and reaped) when dropped, whatever the test's outcome.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Prometheus's instant query: the result vector, or `None` while it has nothing.
fn query(prom: std::net::SocketAddr, q: &str) -> Option<Vec<serde_json::Value>> {
    let path = format!("/api/v1/query?query={}", urlencode(q));
    let (status, _, body) = tdpshare_probes::exporter::http::get(prom, &path, None).ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    assert_eq!(v["status"], "success", "{q}: HTTP {status}: {body}");
    let result = v["data"]["result"].as_array()?.clone();
    (!result.is_empty()).then_some(result)
}

/// The first sample's value of `q` once it is above zero, waiting up to `secs`.
fn wait_positive(prom: std::net::SocketAddr, q: &str, secs: u64) -> f64 {
    let start = std::time::Instant::now();
    loop {
        let v = query(prom, q)
            .and_then(|r| r[0]["value"][1].as_str()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if v > 0.0 || start.elapsed().as_secs() >= secs {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

#[test]
fn prometheus_scrapes_a_booting_guest_from_the_unprivileged_exporter() {
    use std::io::{BufRead, Write};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    if let Some(reason) = live_skip_reason() {
        println!("skipped: {reason}");
        return;
    }
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            !required(),
            "prometheus is missing (cargo xtask setup installs Debian's package)"
        );
        println!("skipped: prometheus is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("tdpshare-exporter-it-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The binary where user nobody can run it (the clone may be in a private directory).
    let bin = dir.join("tdpshare-probe");
    std::fs::copy(env!("CARGO_BIN_EXE_tdpshare-probe"), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

    // A guest that waits for the exporter before QEMU's first ioctl.
    let mut qemu = Killed(
        Command::new("sh")
            .args([
                "-c",
                "read go; exec qemu-system-x86_64 -name guest=prom-guest -enable-kvm -m 256M \
                 -nographic -nodefaults -display none",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = qemu.0.id();

    // The exporter as the unit runs it: user nobody, only the unit's capabilities.
    let caps = unit_capabilities()
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let mut exporter = Killed(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .arg(&bin)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let (log, stderr) = (log.clone(), exporter.0.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                log.lock().unwrap().push(line);
            }
        });
    }
    let lines = || log.lock().unwrap().join("\n");
    let start = Instant::now();
    let addr: std::net::SocketAddr = loop {
        let found = log.lock().unwrap().iter().find_map(|l| {
            l.strip_prefix("tdpshare-probe serve: listening on http://")?
                .strip_suffix("/metrics")?
                .parse()
                .ok()
        });
        if let Some(a) = found {
            break a;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{}", lines());
        std::thread::sleep(Duration::from_millis(50));
    };
    // Healthy once the probes are attached.
    let healthy = loop {
        let (status, _, _) = tdpshare_probes::exporter::http::get(addr, "/healthz", None).unwrap();
        if status == 200 || start.elapsed() > Duration::from_secs(30) {
            break status == 200;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if lines().contains("not built") {
        println!("skipped: eBPF programs not built");
        return;
    }
    assert!(healthy, "not healthy as nobody with {caps}:\n{}", lines());

    // Prometheus, scraping every second.
    let prom_port = free_port();
    let prom: std::net::SocketAddr = format!("127.0.0.1:{prom_port}").parse().unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - \
             job_name: tdpshare\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let ready = loop {
        let ok = tdpshare_probes::exporter::http::get(prom, "/-/ready", None)
            .is_ok_and(|(s, _, _)| s == 200);
        if ok || start.elapsed() > Duration::from_secs(60) {
            break ok;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        ready,
        "{}",
        std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
    );

    // Boot the guest; Prometheus must see its memslot operations and fast zaps under its pid.
    qemu.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let vm = format!("vm=\"{pid}\"");
    let memslots = wait_positive(
        prom,
        &format!("sum(tdpshare_memslot_operations_total{{{vm}}})"),
        60,
    );
    let fast_zaps = wait_positive(prom, &format!("sum(tdpshare_fast_zaps_total{{{vm}}})"), 60);
    assert!(
        memslots > 0.0,
        "no memslot operations of VM {pid}:\n{}",
        lines()
    );
    assert!(fast_zaps > 0.0, "no fast zaps of VM {pid}:\n{}", lines());
    let info = query(prom, &format!("tdpshare_vm_info{{{vm}}}")).expect("the VM's info");
    assert_eq!(info[0]["metric"]["name"], "prom-guest");
    assert_eq!(info[0]["metric"]["vmm"], "qemu-system-x86");
    // Prometheus negotiated OpenMetrics and took every sample.
    assert_eq!(wait_positive(prom, "up{job=\"tdpshare\"}", 10), 1.0);
    assert!(wait_positive(prom, "scrape_samples_scraped{job=\"tdpshare\"}", 10) > 100.0);

    // Every dashboard query evaluates in this Prometheus; the three paths' panels have series.
    let text = std::fs::read_to_string(deploy("grafana/tdpshare.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$instance", ".*")
                .replace("$vm", ".*");
            let title = p["title"].as_str().unwrap_or("");
            let must_have = [
                "Pre-populations per minute",
                "Root updates per second",
                "IOTLB flushes per second",
            ]
            .contains(&title);
            // A rate needs two scrapes of a series: wait for them where a series must come.
            let asked = Instant::now();
            let mut result = query(prom, &expr);
            while must_have && result.is_none() && asked.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(500));
                result = query(prom, &expr);
            }
            assert!(
                !must_have || result.is_some(),
                "{title}: no series for {expr}"
            );
        }
    }

    // promtool accepts a live scrape in the Prometheus text format.
    let (_, _, body) = tdpshare_probes::exporter::http::get(addr, "/metrics", None).unwrap();
    assert!(body.contains(&format!(
        "tdpshare_fast_zaps_total{{{vm},vmm=\"qemu-system-x86\"}}"
    )));
    if let Some(promtool) = promtool() {
        let mut check = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        check
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // SIGTERM ends the exporter cleanly, promptly.
    // SAFETY: kill on our own child's pid.
    let sent = unsafe { libc::kill(exporter.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let stopped = Instant::now();
    let status = loop {
        if let Some(s) = exporter.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}:\n{}", lines());
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        lines().contains("tdpshare-probe serve: stopping"),
        "{}",
        lines()
    );
    drop(qemu);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_docs_carry_the_current_metric_reference() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/exporter.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (begin, end) = ("<!-- metrics:begin -->\n", "<!-- metrics:end -->");
    let start = doc.find(begin).expect("metrics:begin marker") + begin.len();
    let stop = doc.find(end).expect("metrics:end marker");
    let current = tdpshare_probes::exporter::metrics::reference();
    if std::env::var("TDPSHARE_BLESS").as_deref() == Ok("1") {
        let updated = format!("{}{current}{}", &doc[..start], &doc[stop..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    assert!(
        doc[start..stop] == current,
        "docs/exporter.md's metric reference is not `tdpshare-probe serve --metrics`; rerun \
         with TDPSHARE_BLESS=1"
    );
}
