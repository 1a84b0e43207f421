//! `tdpshare-probe serve`: the probes as a Prometheus / OpenMetrics endpoint.
//!
//! Data flows one way: the live probes (the loader the recorder and sharetop use) → events →
//! the [`registry::Registry`] (counters, histograms, per VM) → scrapes, rendered by
//! [`metrics::FAMILIES`] in the format the scraper asks for. The source runs on a thread of
//! its own; the HTTP server never reaches back into it.
//!
//! Locking: one mutex around the registry ([`Shared`]); the source holds it per batch of
//! events (and once a second to sweep), a scrape while it renders. A poisoned lock (a crashed
//! source) is still read: scrapes never fail because the source did.

pub mod http;
pub mod metrics;
pub mod registry;
pub mod text;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::loader::{LoadOptions, ProbeState as LoaderState, Session, kernel_release};
use registry::{Host, Limits, ProbeState, ProcHost, Registry};

/// The default port: outside 9100–9999, the range the Prometheus project's default-port list
/// allocates (and which that list had given out entirely by 2023), so it collides with no
/// exporter there; see docs/exporter.md.
pub const DEFAULT_PORT: u16 = 10143;

/// `serve`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address and port to listen on (this host only by default; `0.0.0.0:10143` for every
    /// interface, `127.0.0.1:0` for any free port).
    #[arg(long, default_value = "127.0.0.1:10143")]
    pub listen: SocketAddr,
    /// Only this VMM process (it must be running).
    #[arg(long, value_parser = crate::args::pid)]
    pub pid: Option<u32>,
    /// VMs tracked one by one; events of further VMs are summed into `vm="other"`.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_vms: u64,
    /// Seconds an exited VM's series stay (so the scrapes after its exit see its last counts)
    /// before they are removed.
    #[arg(long, default_value_t = 300.0, value_parser = grace)]
    pub vm_grace: f64,
    /// The kernel-side event buffer in MiB (a power of two): raise it when
    /// tdpshare_ring_buffer_drops_total grows.
    #[arg(long, default_value_t = 4, value_parser = crate::record::parse_ring_mib)]
    pub ring_mib: u32,
    /// Print the metric reference (Markdown) and exit.
    #[arg(long)]
    pub metrics: bool,
}

/// `--vm-grace`: seconds, at most a day (a longer one keeps dead VMs' series for no one).
fn grace(text: &str) -> Result<f64, String> {
    let s = crate::args::duration(text)?;
    if s > 86_400.0 {
        return Err(format!(
            "{text}: the grace period is at most 86400 s (a day)"
        ));
    }
    Ok(s)
}

/// What the source and the scrapes share.
#[derive(Debug)]
pub struct Shared {
    registry: Mutex<Registry>,
}

impl Shared {
    pub fn new(limits: Limits) -> Self {
        Self {
            registry: Mutex::new(Registry::new(limits)),
        }
    }

    /// The registry, also after a panic of whoever held it.
    pub fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The answer to one request.
    pub fn handle(&self, req: &http::Request) -> http::Response {
        match req.path.as_str() {
            "/metrics" => {
                let format = text::Format::negotiate(req.accept.as_deref());
                let process = metrics::Process::current();
                let reg = self.lock();
                let body = metrics::render(&metrics::Scrape::new(&reg, process), format);
                http::Response {
                    status: 200,
                    content_type: format.content_type(),
                    body: body.into_bytes(),
                }
            }
            "/healthz" => {
                let reg = self.lock();
                if reg.ready {
                    http::Response::text(200, "ok\n")
                } else {
                    http::Response::text(503, format!("{}\n", reg.not_ready))
                }
            }
            "/" => http::Response {
                status: 200,
                content_type: "text/html; charset=utf-8",
                body: b"<html><head><title>tdpshare exporter</title></head><body>\
                        <h1>tdpshare exporter</h1><p><a href=\"/metrics\">metrics</a> \
                        &middot; <a href=\"/healthz\">health</a></p></body></html>\n"
                    .to_vec(),
            },
            _ => http::Response::text(404, "not found: try /metrics\n"),
        }
    }
}

/// A loader state as the `state` label spells it.
fn state_label(s: &LoaderState) -> &'static str {
    match s {
        LoaderState::Attached => "attached",
        LoaderState::Absent => "absent",
        LoaderState::Denied(_) => "denied",
        LoaderState::Failed(_) => "failed",
        LoaderState::NotBuilt(_) => "not_built",
    }
}

/// Events applied under one hold of the lock: a scrape waits for at most this many.
const BATCH: usize = 4096;

/// Applies `events` to the registry in batches, each VM's first event preceded by its name.
pub fn apply_all(
    shared: &Shared,
    events: &mut Vec<tdpshare::Event>,
    namer: &mut crate::vmm::Namer,
    host: &dyn Host,
    name_of: impl Fn(u32) -> Option<String>,
) {
    for chunk in events.chunks(BATCH) {
        // Names are read from /proc before the lock is taken: a scrape never waits on them.
        let named: Vec<Option<tdpshare::Event>> =
            chunk.iter().map(|e| namer.first(e, &name_of)).collect();
        let mut reg = shared.lock();
        for (e, named) in chunk.iter().zip(&named) {
            if let Some(named) = named {
                reg.apply(named, host);
            }
            reg.apply(e, host);
        }
    }
    events.clear();
}

/// The live source: attaches the probes, then feeds the registry until `stop`.
fn live_source(shared: &Shared, opts: &LoadOptions, stop: &AtomicBool) {
    let host = ProcHost;
    let mut session = Session::start(opts);
    for n in &session.notes {
        eprintln!("note: {n}");
    }
    let states: Vec<ProbeState> = session
        .statuses
        .iter()
        .map(|s| {
            let probe = format!("{}:{}", s.probe.system, s.probe.event);
            // One line per probe state: the journal says what became of each.
            eprintln!("probe {probe}: {}", s.state);
            ProbeState {
                probe,
                program: s.probe.program.to_owned(),
                state: state_label(&s.state),
            }
        })
        .collect();
    let attached = session.attached();
    {
        let mut reg = shared.lock();
        reg.probes = states;
        reg.kernel = kernel_release();
        if attached == 0 {
            reg.not_ready = "no probe attached (tdpshare_probe_state says why; the probes need \
                             CAP_BPF and CAP_PERFMON)"
                .into();
        } else {
            reg.ready = true;
        }
    }
    if attached == 0 {
        eprintln!("error: no probe attached; serving the probes' states only");
        return;
    }
    eprintln!("{attached} of {} probes attached", session.statuses.len());
    let mut namer = crate::vmm::Namer::default();
    let mut events = Vec::new();
    let mut last_sweep = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        session.poll(&mut events);
        apply_all(shared, &mut events, &mut namer, &host, crate::vmm::name);
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            let drops = session.counters().drops;
            let mut reg = shared.lock();
            reg.drops = drops;
            for vm in reg.sweep(last_sweep, &host) {
                namer.forget(vm);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `tdpshare-probe serve`: listens, attaches, serves until SIGTERM or SIGINT.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    if args.metrics {
        print!("{}", metrics::reference());
        return Ok(());
    }
    let listener = TcpListener::bind(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .context("installing the SIGINT/SIGTERM handlers")?;
    }
    let shared = Arc::new(Shared::new(Limits {
        max_vms: args.max_vms as usize,
        grace: Duration::from_secs_f64(args.vm_grace),
    }));
    eprintln!("tdpshare-probe serve: listening on http://{addr}/metrics");
    let opts = LoadOptions {
        pid: args.pid,
        ring_bytes: Some(args.ring_mib << 20),
        ..LoadOptions::default()
    };
    let source = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("tdpshare-source".into())
            .spawn(move || {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    live_source(&shared, &opts, &stop)
                }));
                if run.is_err() {
                    eprintln!("error: the probe source crashed; serving what it counted");
                    let mut reg = shared.lock();
                    reg.ready = false;
                    reg.not_ready = "the probe source crashed".into();
                }
            })
            .context("starting the probe source")?
    };
    let handler = {
        let shared = shared.clone();
        Arc::new(move |r: &http::Request| shared.handle(r))
    };
    http::serve(listener, stop.clone(), handler).context("serving HTTP")?;
    eprintln!("tdpshare-probe serve: stopping");
    stop.store(true, Ordering::SeqCst);
    let _ = source.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tdpshare::event::{EventKind, Source};

    struct Fake;
    impl Host for Fake {
        fn process_name(&self, pid: u32) -> Option<String> {
            Some(format!("qemu-{pid}"))
        }
        fn running(&self, _: u32) -> bool {
            true
        }
    }

    fn fed() -> Shared {
        let shared = Shared::new(Limits::default());
        let mut events = vec![
            tdpshare::Event::new(
                1,
                4242,
                Source::Live,
                EventKind::FastZap {
                    generation: 1,
                    pages: 3,
                },
            ),
            tdpshare::Event::new(
                2,
                4242,
                Source::Live,
                EventKind::SmmTransition { enter: true },
            ),
        ];
        let mut namer = crate::vmm::Namer::default();
        apply_all(&shared, &mut events, &mut namer, &Fake, |pid| {
            Some(format!("guest-{pid}"))
        });
        shared.lock().probes = vec![ProbeState {
            probe: "kvmmmu:kvm_mmu_get_page".into(),
            program: "kvm_mmu_get_page".into(),
            state: "attached",
        }];
        shared
    }

    fn get(shared: &Shared, path: &str, accept: Option<&str>) -> http::Response {
        shared.handle(&http::Request {
            method: "GET".into(),
            path: path.into(),
            accept: accept.map(str::to_owned),
        })
    }

    #[test]
    fn a_scrape_shows_the_vm_by_pid_process_and_name() {
        let shared = fed();
        let r = get(&shared, "/metrics", None);
        assert_eq!(r.status, 200);
        assert!(r.content_type.starts_with("text/plain; version=0.0.4"));
        let body = String::from_utf8(r.body).unwrap();
        assert!(
            body.contains("tdpshare_fast_zaps_total{vm=\"4242\",vmm=\"qemu-4242\"} 1\n"),
            "{body}"
        );
        assert!(
            body.contains(
                "tdpshare_vm_info{vm=\"4242\",vmm=\"qemu-4242\",name=\"guest-4242\"} 1\n"
            )
        );
        assert!(body.contains(
            "tdpshare_probe_up{probe=\"kvmmmu:kvm_mmu_get_page\",program=\"kvm_mmu_get_page\"} 1\n"
        ));
        assert!(body.contains("tdpshare_exporter_events_total 2\n"));
        assert!(body.contains("# TYPE tdpshare_build_info gauge\n"));
        assert!(!body.contains("# EOF"));
    }

    #[test]
    fn openmetrics_when_asked() {
        let shared = fed();
        let r = get(
            &shared,
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
        );
        assert!(r.content_type.starts_with("application/openmetrics-text"));
        let body = String::from_utf8(r.body).unwrap();
        assert!(body.ends_with("# EOF\n"));
        assert!(body.contains("# TYPE tdpshare_fast_zaps counter\n"));
        assert!(body.contains("# TYPE tdpshare_build info\n"));
        assert!(body.contains("# UNIT tdpshare_prepopulation_seconds seconds\n"));
    }

    #[test]
    fn health_follows_the_source_and_a_poisoned_lock_still_scrapes() {
        let shared = Arc::new(Shared::new(Limits::default()));
        let r = get(&shared, "/healthz", None);
        assert_eq!(r.status, 503);
        assert!(String::from_utf8_lossy(&r.body).contains("starting"));
        shared.lock().ready = true;
        assert_eq!(get(&shared, "/healthz", None).status, 200);
        // A source that panics holding the lock.
        let s = shared.clone();
        let _ = std::thread::spawn(move || {
            let _g = s.lock();
            panic!("source crashed");
        })
        .join();
        assert_eq!(get(&shared, "/metrics", None).status, 200);
        assert_eq!(get(&shared, "/nope", None).status, 404);
    }

    #[test]
    fn every_family_is_named_by_the_conventions() {
        let mut seen = std::collections::HashSet::new();
        for f in metrics::FAMILIES {
            assert!(seen.insert(f.name), "{} twice", f.name);
            assert!(
                f.name.starts_with("tdpshare_") || f.name.starts_with("process_"),
                "{}",
                f.name
            );
            assert!(
                !f.name.ends_with("_total"),
                "{}: the sample adds _total",
                f.name
            );
            if !f.unit.is_empty() {
                assert!(f.name.ends_with(&format!("_{}", f.unit)), "{}", f.name);
            }
            if f.kind == text::Kind::Histogram {
                assert_eq!(f.unit, "seconds", "{}", f.name);
            }
            assert!(f.help.ends_with('.'), "{}", f.name);
        }
    }
}
