//! Render snapshots of every view at 80x24 and 160x48, fed by a fixed trace: the live
//! recording of a QEMU/KVM guest on this project's machine, plus a fixed set of
//! simulator-style events (pre-population, flushes, pins, maps) so every pane has data.

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use sharetop::app::{Action, App, ProbeRow, View};
use tdpshare::TraceReader;
use tdpshare::event::{
    Event, EventKind, FlushScope, GpaRange, PageSize, PrepopCause, Root, RootCause, Source,
};

fn fixture_app() -> App {
    let mut app = App::new("replay fixtures/traces/live-seabios-qemu-512m.jsonl");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/traces/live-seabios-qemu-512m.jsonl"
    );
    for e in TraceReader::open(path).unwrap() {
        app.update(Action::Event(e.unwrap()));
    }
    app.update(Action::VmName(17765, "seabios".into()));
    let sim = 1000;
    app.update(Action::VmName(sim, "sim pin_prepopulate".into()));
    let ev = |ts: u64, kind| Action::Event(Event::new(ts, sim, Source::Simulator, kind));
    app.update(Action::Tick(Source::Simulator, 0));
    for i in 0..12u64 {
        let ts = i * 1_000_000_000;
        app.update(ev(
            ts,
            EventKind::RootAlloc(Root {
                root: i + 1,
                level: 4,
                smm: false,
                cause: RootCause::MemslotChange,
            }),
        ));
        app.update(ev(
            ts + 1,
            EventKind::PrepopulateEnd {
                range: GpaRange::new(tdpshare::Gpa(0), 8 << 30),
                page_size: PageSize::Size2M,
                cause: PrepopCause::NewRoot,
                entries: 4096 + i * 100,
                leaves: None,
                ns: 700_000 + i * 20_000,
            },
        ));
        for k in 0..(i % 4 + 1) {
            app.update(ev(
                ts + 2 + k,
                EventKind::IotlbFlush {
                    scope: FlushScope::Domain,
                    domain: Some(1),
                    range: None,
                    ns: 1_100,
                },
            ));
        }
        app.update(ev(
            ts + 10,
            EventKind::IommuMap {
                iova: tdpshare::Iova(i << 30),
                size: 1 << 30,
                ns: 2_000_000 + i * 50_000,
            },
        ));
        if i > 0 {
            app.update(ev(
                ts + 11,
                EventKind::RootFree(Root {
                    root: i,
                    level: 4,
                    smm: false,
                    cause: RootCause::MemslotChange,
                }),
            ));
        }
        app.update(Action::Tick(Source::Simulator, ts + 999_999_999));
    }
    app.update(ev(
        12_000_000_000,
        EventKind::Pin {
            range: GpaRange::new(tdpshare::Gpa(0), 8 << 30),
            pages: 2 << 20,
        },
    ));
    app.update(Action::Probes(vec![
        ProbeRow {
            tracepoint: "kvmmmu:kvm_mmu_get_page".into(),
            path: "RootUpdate".into(),
            state: "attached".into(),
        },
        ProbeRow {
            tracepoint: "intel_iommu:qi_submit".into(),
            path: "Iommu".into(),
            state: "absent".into(),
        },
        ProbeRow {
            tracepoint: "tdpshare:prepopulate".into(),
            path: "Prepopulation".into(),
            state: "absent".into(),
        },
    ]));
    app.update(Action::Drops(3));
    app.update(Action::SelfCpu(1.5));
    app.update(Action::Note("recorded on this project's machine".into()));
    app
}

fn render(app: &App, w: u16, h: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
    terminal.draw(|f| sharetop::ui::render(f, app)).unwrap();
    terminal.backend().to_string()
}

fn snapshots(size: (u16, u16)) {
    let (w, h) = size;
    let mut app = fixture_app();
    // Overview, sorted by pre-populations; the simulated VM selected.
    while sharetop::overview::COLUMNS[app.sort].name != "prepops" {
        app.update(Action::SortNext);
    }
    app.selected = Some(1000);
    insta::assert_snapshot!(format!("overview_{w}x{h}"), render(&app, w, h));
    app.update(Action::Enter);
    assert_eq!(app.view, View::Detail);
    insta::assert_snapshot!(format!("detail_{w}x{h}"), render(&app, w, h));
    app.update(Action::NextView);
    app.update(Action::FilterStart);
    for c in "memslot_add".chars() {
        app.update(Action::FilterInput(c));
    }
    app.update(Action::FilterApply);
    insta::assert_snapshot!(format!("log_{w}x{h}"), render(&app, w, h));
    app.update(Action::NextView);
    insta::assert_snapshot!(format!("probes_{w}x{h}"), render(&app, w, h));
    app.update(Action::ToggleHelp);
    insta::assert_snapshot!(format!("help_{w}x{h}"), render(&app, w, h));
}

#[test]
fn views_at_80x24() {
    snapshots((80, 24));
}

#[test]
fn views_at_160x48() {
    snapshots((160, 48));
}

#[test]
fn tiny_terminals_do_not_panic() {
    let app = fixture_app();
    for (w, h) in [(1, 1), (10, 3), (20, 5), (40, 8)] {
        render(&app, w, h);
    }
}

#[test]
fn the_three_paths_fit_80_columns_and_the_rest_scroll_in() {
    let mut app = fixture_app();
    let screen = render(&app, 80, 24);
    let header = screen.lines().nth(3).unwrap_or_default().to_owned();
    for title in ["prepops", "roots", "flushes"] {
        assert!(
            header.contains(title),
            "{title} missing at 80 columns: {header}"
        );
    }
    assert!(!header.contains("memslots"), "{header}");
    // Past the 14 columns before `memslots`; VM and name stay.
    for _ in 0..14 {
        app.update(Action::Right);
    }
    let scrolled = render(&app, 80, 24);
    let header = scrolled.lines().nth(3).unwrap_or_default().to_owned();
    assert!(
        header.contains("VM") && header.contains("memslots") && header.contains("sharing"),
        "{header}"
    );
}

#[test]
fn the_help_scrolls_to_its_last_line_at_80x24() {
    let mut app = fixture_app();
    app.update(Action::ToggleHelp);
    let first = render(&app, 80, 24);
    assert!(first.contains("lines 1–19 of"), "{first}");
    assert!(!first.contains("sharing state"), "{first}");
    for _ in 0..100 {
        app.update(Action::Down);
        render(&app, 80, 24);
    }
    let last = render(&app, 80, 24);
    assert!(last.contains("sharing state"), "{last}");
    assert!(!last.contains("│q            quit"), "{last}");
    // Back up a page at a time, to the top.
    for _ in 0..3 {
        app.update(Action::PageUp);
    }
    assert!(render(&app, 80, 24).contains("│q            quit"));
    // The selection did not move while the help scrolled.
    assert_eq!(app.selected, Some(17765));
}

#[test]
fn the_summary_line_keeps_what_matters_most_when_narrow() {
    let mut app = fixture_app();
    app.update(Action::Progress(Source::Simulator, 0.5));
    let wide = render(&app, 160, 48);
    let line = wide.lines().nth(1).unwrap();
    for piece in [
        "simulator 12.0 s 50%",
        "prepops 12 roots 17 fast zaps 12 flushes 30",
        "drops 3",
        "probes 1/3",
        "2 VMs, 135 events",
        "cpu 1.5%",
    ] {
        assert!(line.contains(piece), "{piece:?} missing: {line}");
    }
    let narrow = render(&app, 80, 24);
    let line = narrow.lines().nth(1).unwrap();
    assert!(line.contains("live 4.9 s"), "{line}");
    assert!(line.contains("flushes 30"), "{line}");
    assert!(!line.contains("cpu"), "{line}");
}

#[test]
fn every_vm_gets_its_sparklines_in_the_free_rows() {
    let app = fixture_app();
    let screen = render(&app, 160, 48);
    let panel: Vec<&str> = screen
        .lines()
        .skip_while(|l| !l.contains("newest right"))
        .collect();
    assert!(!panel.is_empty(), "{screen}");
    assert!(panel.iter().any(|l| l.contains("1000 sim pin_prep")));
    assert!(panel.iter().any(|l| l.contains("17765 seabios")));
    // The simulated VM's 5196 entries peak, and bars.
    assert!(panel.iter().any(|l| l.contains("5196")), "{screen}");
    assert!(panel.iter().any(|l| l.contains('█')));
    // Too few free rows: no panel, the table keeps the space.
    let small = render(&app, 80, 10);
    assert!(!small.contains("newest right"), "{small}");
}
