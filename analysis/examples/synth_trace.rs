//! Writes a large live-like trace for the analysis's scale benchmark (docs/performance.md):
//! 8 VMs booting over and over — memslot deletions each followed by a fast zap and a new root,
//! SMM transitions, CR writes — between runs of TDP entry changes (the bulk, as
//! `kvm_tdp_mmu_spte_changed` gives on a live kernel), page faults and IOTLB range flushes.
//!
//! ```text
//! cargo run --release -p tdpshare-analysis --example synth_trace -- OUT.jsonl [EVENTS]
//! ```
//! EVENTS defaults to 10 000 000. The content is deterministic.

use std::process::ExitCode;

use tdpshare::event::{FlushScope, GpaRange, Memslot, Root, RootCause, SpteFlags};
use tdpshare::{Event, EventKind, Gfn, Gpa, Header, Source, TraceFile};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first() else {
        eprintln!("usage: synth_trace OUT.jsonl [EVENTS]");
        return ExitCode::from(2);
    };
    let total: u64 = match args.get(1).map(|s| s.parse()) {
        None => 10_000_000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("EVENTS: {e}");
            return ExitCode::from(2);
        }
    };
    match write(out, total) {
        Ok(n) => {
            println!("{n} events -> {out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{out}: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Gen {
    t: TraceFile,
    ts: u64,
    n: u64,
}

impl Gen {
    fn emit(&mut self, vm: u64, kind: EventKind) -> Result<(), tdpshare::TraceError> {
        self.ts += 250;
        self.n += 1;
        self.t
            .write(&Event::new(self.ts, 1000 + vm, Source::Live, kind))
    }
}

fn write(out: &str, total: u64) -> Result<u64, tdpshare::TraceError> {
    let mut header = Header::new(Source::Live, "synthetic");
    header.start_unix_ns = 1_795_867_200_000_000_000;
    header.host = "synth".into();
    let mut g = Gen {
        t: TraceFile::create(out, &header)?,
        ts: 0,
        n: 0,
    };
    let mut root = 0x1000u64;
    let slot = |s: u16, gpa: u64, size: u64| Memslot {
        slot: s,
        as_id: 0,
        gpa: Gpa(gpa),
        size,
        flags: 0,
        ua: 0x7f00_0000_0000 + gpa,
    };
    let leaf = SpteFlags::PRESENT | SpteFlags::READ | SpteFlags::WRITE | SpteFlags::EXEC;
    'outer: loop {
        for vm in 1..=8u64 {
            g.emit(vm, EventKind::MemslotAdd(slot(2, 0xc0000, 0x20000)))?;
            g.emit(vm, EventKind::MemslotDelete(slot(2, 0xc0000, 0x20000)))?;
            g.emit(
                vm,
                EventKind::FastZap {
                    generation: g.n,
                    pages: 12,
                },
            )?;
            root += 0x1000;
            g.emit(
                vm,
                EventKind::RootAlloc(Root {
                    root,
                    level: 4,
                    smm: false,
                    cause: RootCause::Unknown,
                }),
            )?;
            g.emit(vm, EventKind::SmmTransition { enter: true })?;
            g.emit(vm, EventKind::SmmTransition { enter: false })?;
            g.emit(
                vm,
                EventKind::CrWrite {
                    cr: 0,
                    value: Some(0x8000_0011),
                },
            )?;
            for i in 0..4000u64 {
                let gfn = Gfn((g.n * 7 + i) % (1 << 21));
                g.emit(
                    vm,
                    EventKind::SpteSet {
                        gfn,
                        level: 1,
                        old: SpteFlags::empty(),
                        new: leaf,
                    },
                )?;
                if i % 16 == 0 {
                    g.emit(
                        vm,
                        EventKind::PageFault {
                            gfn,
                            error_code: 0x6,
                        },
                    )?;
                }
                if i % 64 == 0 {
                    g.emit(
                        vm,
                        EventKind::IotlbFlush {
                            scope: FlushScope::Range,
                            domain: Some(vm as u32),
                            range: Some(GpaRange::of_frames(gfn, 16)),
                            ns: 900 + i % 300,
                        },
                    )?;
                }
                if g.n >= total {
                    break 'outer;
                }
            }
        }
    }
    g.t.finish()
}
