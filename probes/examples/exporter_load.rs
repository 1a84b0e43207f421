//! The exporter under a flood: the simulator's events (every mode of `boot-8g`, replicated
//! over many VMs) applied as fast as one thread can, while `/metrics` is scraped over HTTP ten
//! times a second, and the VMs are replaced by new ones every second (short-lived VMs: the
//! cap and the grace period must keep the series, and the memory, bounded).
//!
//! `cargo run --release -p tdpshare-probes --example exporter_load -- [--seconds 30] [--vms 64]`
//!
//! Prints a Markdown row for docs/performance.md; exits 1 when a target is missed: at least
//! 1 M events/s applied, scrape p99 under 100 ms, resident memory at the end within 20 % of
//! what it was after the first five seconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tdpshare::ShareMode;
use tdpshare::sim::{RunOptions, Scenario, run_mode};
use tdpshare_probes::exporter::registry::{Host, Limits};
use tdpshare_probes::exporter::{Shared, http};

/// VMs of the current generation run; older ones have exited.
struct Churn {
    generation: AtomicU64,
    vms: u64,
}

impl Host for Churn {
    fn process_name(&self, _: u32) -> Option<String> {
        Some("qemu-system-x86".into())
    }
    fn running(&self, pid: u32) -> bool {
        u64::from(pid) / self.vms == self.generation.load(Ordering::Relaxed)
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let seconds = arg("--seconds", 30);
    let vms = arg("--vms", 64).max(1);
    let scenario = Scenario::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../kmod/scenarios/boot-8g.toml"
    )))?;
    let mut template = Vec::new();
    for mode in ShareMode::ALL {
        template.extend(run_mode(&scenario, mode, 0, RunOptions::default())?.events);
    }
    eprintln!(
        "{} simulated events per VM (boot-8g, every mode), {vms} VMs at a time",
        template.len()
    );

    let host = Arc::new(Churn {
        generation: AtomicU64::new(0),
        vms,
    });
    let shared = Arc::new(Shared::new(Limits {
        max_vms: 128,
        grace: Duration::from_secs(2),
    }));
    shared.lock().ready = true;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            http::serve(
                listener,
                stop,
                Arc::new(move |r: &http::Request| shared.handle(r)),
            )
        })
    };

    // The flood: every VM's copy of the template, over and over, in batches under the lock.
    let applied = Arc::new(AtomicU64::new(0));
    let feeder = {
        let (shared, stop, applied, host) =
            (shared.clone(), stop.clone(), applied.clone(), host.clone());
        std::thread::spawn(move || {
            let mut last_sweep = Instant::now();
            let mut batch = Vec::with_capacity(4096);
            'run: loop {
                for e in &template {
                    let generation = host.generation.load(Ordering::Relaxed);
                    for v in 0..vms {
                        let mut e = e.clone();
                        e.vm = generation * vms + v;
                        batch.push(e);
                    }
                    if batch.len() >= 4096 {
                        let n = batch.len() as u64;
                        let mut reg = shared.lock();
                        for e in batch.drain(..) {
                            reg.apply(&e, host.as_ref());
                        }
                        drop(reg);
                        applied.fetch_add(n, Ordering::Relaxed);
                    }
                    if last_sweep.elapsed() >= Duration::from_secs(1) {
                        last_sweep = Instant::now();
                        // New VMs replace the old: they have exited.
                        host.generation.fetch_add(1, Ordering::Relaxed);
                        let _ = shared.lock().sweep(last_sweep, host.as_ref());
                    }
                    if stop.load(Ordering::Relaxed) {
                        break 'run;
                    }
                }
            }
        })
    };

    // Scrapes, ten a second, in OpenMetrics as Prometheus asks.
    let start = Instant::now();
    let mut latencies = Vec::new();
    let mut rss_early = 0;
    let mut body_len = 0;
    let mut series = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        let t = Instant::now();
        let (status, _, body) = http::get(
            addr,
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0"),
        )?;
        latencies.push(t.elapsed());
        anyhow::ensure!(status == 200, "scrape answered {status}");
        body_len = body.len();
        series = body.lines().filter(|l| !l.starts_with('#')).count();
        if rss_early == 0 && start.elapsed() >= Duration::from_secs(5) {
            rss_early = rss_kib();
        }
        std::thread::sleep(Duration::from_millis(100).saturating_sub(t.elapsed()));
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    feeder.join().expect("the feeder");
    server.join().expect("the server")?;
    let rss_end = rss_kib();
    let rate = applied.load(Ordering::Relaxed) as f64 / elapsed;
    latencies.sort();
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    let (p50, p99, max) = (q(0.5), q(0.99), q(1.0));
    let reg = shared.lock();
    println!(
        "| {seconds} s, {vms} VMs replaced every second | {:.2} M events/s | {} scrapes: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms | {series} series, {:.0} KiB | RSS {:.1} MiB after 5 s, {:.1} MiB at the end | {} VMs tracked, {} expired, {} folded |",
        rate / 1e6,
        latencies.len(),
        body_len as f64 / 1024.0,
        rss_early as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        reg.tracked(),
        reg.expired_total,
        reg.folded_total,
    );
    let mut missed = Vec::new();
    if rate < 1e6 {
        missed.push(format!("{:.2} M events/s is below 1 M/s", rate / 1e6));
    }
    if p99 >= 100.0 {
        missed.push(format!("scrape p99 {p99:.1} ms is not under 100 ms"));
    }
    if rss_early > 0 && rss_end as f64 > rss_early as f64 * 1.2 {
        missed.push(format!("memory grew from {rss_early} KiB to {rss_end} KiB"));
    }
    if missed.is_empty() {
        Ok(())
    } else {
        for m in &missed {
            eprintln!("missed: {m}");
        }
        std::process::exit(1);
    }
}
