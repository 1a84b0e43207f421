//! `sharetop`: the live view of IOMMU/TDP page-table sharing — per VM, per path.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
use sharetop::app::{Action, App, CLASSES};
use sharetop::overview;
use sharetop::sources::{self, Pace, Sources};
use tdpshare::event::ShareMode;
use tdpshare::sim::Scenario;
use tdpshare_probes::args;

/// The scenario `--demo` simulates, built in so the demo runs from anywhere.
const BOOT_8G: &str = include_str!("../../kmod/scenarios/boot-8g.toml");

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

/// sharetop: pre-population, root updates and IOTLB flushes of IOMMU/TDP page-table sharing,
/// per VM. Sources: the live kernel (root), a recorded trace, or the simulator.
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Record live events into a trace file, without the TUI (needs root).
    Record(tdpshare_probes::record::RecordArgs),
    /// Print a shell completion script (`cargo xtask dist` writes them all).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page, sharetop(1), as roff.
    Manpage,
}

#[derive(Debug, Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Replay a trace file (tdpshare format) instead of watching the live kernel.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["simulate", "demo"])]
    replay: Option<PathBuf>,
    /// Replay speed: event time runs N times faster than wall time.
    #[arg(long, default_value_t = 1.0, value_name = "N", value_parser = args::positive)]
    speed: f64,
    /// Replay one event per press of `n`.
    #[arg(long)]
    step: bool,
    /// Run the simulator on a scenario (no root needed).
    #[arg(long, value_name = "SCENARIO", conflicts_with = "demo")]
    simulate: Option<PathBuf>,
    /// Sharing mode(s) to simulate (default: the scenario's).
    #[arg(long, value_enum, value_name = "MODE")]
    mode: Vec<ShareMode>,
    /// Wall-clock seconds a simulation is played over.
    #[arg(long, default_value_t = 20.0, value_name = "S", value_parser = args::positive)]
    sim_seconds: f64,
    /// The tour: a real QEMU/KVM guest watched live (where root and /dev/kvm allow) next to
    /// simulated 8 GiB boots in the 2021 design and ours.
    #[arg(long)]
    demo: bool,
    /// Live: only this VMM process (it must be running).
    #[arg(long, value_parser = args::pid)]
    pid: Option<u32>,
    /// Print the overview once and exit (a replay or simulation is read to its end first).
    #[arg(long)]
    once: bool,
    /// Print the overview every S seconds (headless; at least 0.05).
    #[arg(long, value_name = "S", value_parser = args::interval)]
    interval: Option<f64>,
    /// With --interval: stop after N prints.
    #[arg(long, value_name = "N", requires = "interval", value_parser = args::count)]
    count: Option<u64>,
    /// Headless output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Sort rows by this column (headless and initial TUI sort).
    #[arg(long, short)]
    sort: Option<String>,
    /// Skip events of types this build does not know instead of stopping the replay.
    #[arg(long)]
    skip_unknown: bool,
}

fn load_scenario(path: &std::path::Path) -> anyhow::Result<Scenario> {
    Scenario::load(path).map_err(|e| {
        let mut text = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            text.push_str(&format!(": {s}"));
            src = s.source();
        }
        anyhow::anyhow!(text)
    })
}

/// Starts the sources the command line asks for; returns the app's source label.
fn start(
    cli: &Cli,
    srcs: &mut Sources,
    tx: mpsc::Sender<Action>,
    headless_once: bool,
) -> anyhow::Result<String> {
    let pace = if headless_once {
        Pace::Unpaced
    } else if cli.step {
        Pace::Step
    } else {
        Pace::Speed(cli.speed)
    };
    if let Some(path) = &cli.replay {
        sources::replay(srcs, path.clone(), pace, cli.skip_unknown, tx)?;
        return Ok(format!("replay {}", path.display()));
    }
    if let Some(path) = &cli.simulate {
        let scenario = load_scenario(path)?;
        let mut modes = if cli.mode.is_empty() {
            scenario.sharing.modes.clone()
        } else {
            cli.mode.clone()
        };
        // `--mode X --mode X` is one VM, not two rows of the same run.
        let mut seen = Vec::new();
        modes.retain(|m| {
            let new = !seen.contains(m);
            seen.push(*m);
            new
        });
        let label = format!("simulate {}", scenario.name);
        sources::simulate(srcs, scenario, modes, pace, cli.sim_seconds, tx);
        return Ok(label);
    }
    if cli.demo {
        let scenario = Scenario::parse(std::path::Path::new("boot-8g.toml"), BOOT_8G)
            .map_err(|e| anyhow::anyhow!("the built-in scenario: {e}"))?;
        let modes = vec![ShareMode::PinPrepopulate, ShareMode::Optimized];
        sources::simulate(srcs, scenario, modes, pace, cli.sim_seconds, tx.clone());
        match sources::live_guest_unavailable() {
            None => match sources::start_guest(srcs) {
                Some((pid, gate)) => sources::live(srcs, Some(pid), Some(gate), tx),
                None => {
                    let _ = tx.send(Action::Note("could not start the demo guest (QEMU)".into()));
                }
            },
            Some(why) => {
                let _ = tx.send(Action::Note(format!(
                    "no live guest in the demo ({why}): showing the simulated VMs only"
                )));
            }
        }
        return Ok("demo".into());
    }
    sources::live(srcs, cli.pid, None, tx);
    Ok("live".into())
}

/// Applies up to `max` pending actions; returns how many there were.
fn drain(app: &mut App, rx: &Receiver<Action>, max: usize) -> usize {
    let mut n = 0;
    while n < max {
        match rx.try_recv() {
            Ok(a) => app.update(a),
            Err(_) => break,
        }
        n += 1;
    }
    n
}

/// Prints the overview; `interval` (headless `--interval`) adds the time and the deltas.
fn print_overview(
    app: &App,
    format: Format,
    first: bool,
    interval: Option<&overview::Interval>,
) -> anyhow::Result<()> {
    let sort = app.sort_column();
    let mut out = std::io::stdout().lock();
    match format {
        Format::Table => {
            if !first {
                writeln!(out)?;
            }
            write!(out, "{}", app.overview.table_at(sort, interval))?;
        }
        Format::Csv => {
            let csv = app.overview.csv_at(sort, interval);
            let body = if first {
                csv.as_str()
            } else {
                csv.split_once('\n').map_or("", |(_, b)| b)
            };
            write!(out, "{body}")?;
        }
        Format::Json => writeln!(out, "{}", app.overview.json_at(sort, interval))?,
    }
    out.flush()?;
    Ok(())
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) is not an error.
fn print_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// Now in UTC, RFC 3339 to the second.
fn utc_now() -> String {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    tdpshare::event::clock::UtcTime::from_unix_ns(ns).to_string()
}

/// Headless output; returns what failed.
fn headless(
    cli: &Cli,
    mut app: App,
    rx: Receiver<Action>,
    srcs: Sources,
) -> anyhow::Result<Vec<String>> {
    if cli.once && cli.interval.is_none() {
        let live = cli.replay.is_none() && cli.simulate.is_none() && !cli.demo;
        let deadline = Instant::now() + Duration::from_secs(if live { 1 } else { 3600 });
        loop {
            let finished = srcs.finished();
            let took = drain(&mut app, &rx, usize::MAX);
            if (finished && took == 0) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        srcs.shutdown();
        // Rates over the whole run: the one printed interval.
        app.update(Action::Sample);
        for n in app.notes.iter().filter(|n| !n.starts_with("FAILED: ")) {
            eprintln!("{n}");
        }
        print_overview(&app, cli.format, true, None)?;
        return Ok(app.failures);
    }
    let every = Duration::from_secs_f64(cli.interval.unwrap_or(1.0));
    let mut printed = 0;
    let mut notes_shown = 0;
    let mut interval = overview::Interval::default();
    loop {
        std::thread::sleep(every);
        let finished = srcs.finished();
        drain(&mut app, &rx, usize::MAX);
        for n in app.notes.iter().skip(notes_shown) {
            if !n.starts_with("FAILED: ") {
                eprintln!("{n}");
            }
        }
        notes_shown = app.notes.len();
        // Rates over this printed interval, on each source's clock.
        app.update(Action::Sample);
        interval.time = utc_now();
        print_overview(&app, cli.format, printed == 0, Some(&interval))?;
        interval.printed(&app.overview);
        printed += 1;
        // A replay or simulation that ended (or failed) has nothing more to print.
        if cli.count.is_some_and(|c| printed >= c) || (cli.once && printed >= 1) || finished {
            break;
        }
    }
    srcs.shutdown();
    Ok(app.failures)
}

fn key_action(code: KeyCode, mods: KeyModifiers, app: &App) -> Option<Action> {
    if app.filter_input.is_some() {
        return match code {
            KeyCode::Enter => Some(Action::FilterApply),
            KeyCode::Esc => Some(Action::FilterCancel),
            KeyCode::Backspace => Some(Action::FilterBackspace),
            KeyCode::Char(c) => Some(Action::FilterInput(c)),
            _ => None,
        };
    }
    Some(match code {
        KeyCode::Char('c') if mods.contains(KeyModifiers::CONTROL) => Action::Quit,
        KeyCode::Char('q') => Action::Quit,
        KeyCode::Char('?') => Action::ToggleHelp,
        KeyCode::Tab => Action::NextView,
        KeyCode::BackTab => Action::PrevView,
        KeyCode::Up | KeyCode::Char('k') => Action::Up,
        KeyCode::Down | KeyCode::Char('j') => Action::Down,
        KeyCode::PageUp => Action::PageUp,
        KeyCode::Left | KeyCode::Char('h') => Action::Left,
        KeyCode::Right | KeyCode::Char('l') => Action::Right,
        KeyCode::PageDown => Action::PageDown,
        KeyCode::Enter => Action::Enter,
        KeyCode::Esc => Action::Back,
        KeyCode::Char('s') => Action::SortNext,
        KeyCode::Char('S') => Action::SortPrev,
        KeyCode::Char(' ') => Action::TogglePause,
        KeyCode::Char('/') => Action::FilterStart,
        KeyCode::Char('+') => Action::SetWindow(app.window * 2),
        KeyCode::Char('-') => Action::SetWindow(app.window / 2),
        KeyCode::Char(c @ '1'..='5') => Action::ToggleClass(CLASSES[c as usize - '1' as usize]),
        _ => return None,
    })
}

/// CPU seconds this process used so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// The interactive view; returns what failed.
fn tui(mut app: App, rx: Receiver<Action>, srcs: Sources) -> anyhow::Result<Vec<String>> {
    // ratatui::init: raw mode, alternate screen, and a panic hook that restores the terminal —
    // wrapped so that a source worker's panic leaves the running UI alone.
    let mut terminal = ratatui::init();
    sources::install_panic_hook();
    let result = (|| -> anyhow::Result<()> {
        let (mut cpu_at, mut cpu_then) = (Instant::now(), cpu_seconds());
        loop {
            drain(&mut app, &rx, 50_000);
            terminal.draw(|f| sharetop::ui::render(f, &app))?;
            if event::poll(Duration::from_millis(100))? {
                match event::read()? {
                    TermEvent::Key(k) if k.kind == KeyEventKind::Press => {
                        if k.code == KeyCode::Char('n') && app.filter_input.is_none() {
                            if let Some(step) = &srcs.step {
                                let _ = step.send(());
                            }
                        } else if let Some(a) = key_action(k.code, k.modifiers, &app) {
                            app.update(a);
                        }
                    }
                    _ => {} // a resize just redraws
                }
            }
            if cpu_at.elapsed() >= Duration::from_secs(1) {
                let now = cpu_seconds();
                app.update(Action::SelfCpu(
                    (now - cpu_then) * 100.0 / cpu_at.elapsed().as_secs_f64(),
                ));
                (cpu_at, cpu_then) = (Instant::now(), now);
            }
            if app.quit {
                return Ok(());
            }
        }
    })();
    ratatui::restore();
    srcs.shutdown();
    drain(&mut app, &rx, usize::MAX);
    result.map(|()| app.failures)
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Cmd::Record(args)) => {
            if !sources::is_root() {
                eprintln!("not root: the probes need CAP_BPF and CAP_PERFMON");
            }
            tdpshare_probes::record::run(args)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Cmd::Completions { shell }) => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            // Into a buffer first: clap_complete panics when its writer fails.
            let mut text = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "sharetop", &mut text);
            print_bytes(&text)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Cmd::Manpage) => {
            use clap::CommandFactory;
            let mut text = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut text)?;
            print_bytes(&text)?;
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    if cli.step && (cli.once || cli.interval.is_some()) {
        bail!("--step needs the interactive view; drop --once / --interval");
    }
    let is_headless = cli.once || cli.interval.is_some();
    if !is_headless {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
            eprintln!(
                "error: sharetop's view needs a terminal on stdin and stdout; without one, print \
                 the overview with --once, or every S seconds with --interval S"
            );
            return Ok(ExitCode::from(2));
        }
    }
    let (tx, rx) = mpsc::channel();
    let mut srcs = Sources::new();
    let label = start(&cli, &mut srcs, tx, cli.once && cli.interval.is_none())?;
    let mut app = App::new(label);
    app.sample_on_tick = !is_headless;
    if let Some(name) = &cli.sort {
        app.sort = overview::COLUMNS
            .iter()
            .position(|c| c.name == name)
            .with_context(|| {
                let names: Vec<_> = overview::COLUMNS.iter().map(|c| c.name).collect();
                format!("no column {name:?}; columns are {}", names.join(", "))
            })?;
    }
    let failures = if is_headless {
        sources::install_panic_hook();
        headless(&cli, app, rx, srcs)?
    } else {
        tui(app, rx, srcs)?
    };
    if failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for f in &failures {
        eprintln!("sharetop: {f}");
    }
    Ok(ExitCode::FAILURE)
}
