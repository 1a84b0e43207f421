//! Population throughput of the TDP MMU: an 8 GiB guest range mapped with 4 KiB leaves and with
//! 2 MiB leaves, as pre-population does. Prints leaves/s and the page-table footprint.
//!
//! `cargo bench -p tdpshare --features std --bench populate`
//!
//! "cold": a fresh arena each run, so first-touch page faults and zeroing are paid as the kernel
//! pays them in alloc_page; "warm": tables reused after the previous run's free.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tdpshare::decision::format::{LeafAttrs, MEMTYPE_WB, Perms};
use tdpshare::event::clock::ManualClock;
use tdpshare::event::{NullSink, RootCause};
use tdpshare::table::{Arena, Mapping, PageAllocator, RootRole, TdpMmu};
use tdpshare::{Gfn, Hpa, Level, PteFormat};

const GUEST: u64 = 8 << 30;
const HOST: Hpa = Hpa(0x40_0000_0000);
/// The 2021 kernel's pre-population rate, roughly 8.7e6 4 KiB leaves per second.
const SEED_LEAVES_PER_S: f64 = 8.7e6;

struct Run {
    elapsed: Duration,
    leaves: u64,
    pages: u64,
}

fn populate(arena: &Arena, level: Level) -> Run {
    let mut mmu = TdpMmu::new(arena, PteFormat::EPT4, NullSink, ManualClock::new(0), 1);
    let root = mmu
        .alloc_root(RootRole::NORMAL, RootCause::Initial)
        .unwrap();
    let mapping = Mapping {
        gfn: Gfn(0),
        frames: GUEST >> 12,
        hpa: HOST,
        level,
        perms: Perms::RWX,
        attrs: LeafAttrs {
            memtype: MEMTYPE_WB,
            snoop: true,
            pinned: true,
            ..LeafAttrs::default()
        },
    };
    let start = Instant::now();
    let out = mmu.map(root, black_box(&mapping)).unwrap();
    let elapsed = start.elapsed();
    let pages = arena.pages_in_use();
    mmu.free_root(root, RootCause::Released).unwrap();
    arena.reclaim();
    Run {
        elapsed,
        leaves: out.entries,
        pages,
    }
}

/// The ceiling: a plain loop storing the same leaf values into as many table pages, taken from
/// a fresh arena (cold) and then again (warm) — memory bandwidth and first-touch faults, no
/// page-table logic.
fn store_loop(arena: &Arena, pages: u64) -> Duration {
    let tables: Vec<_> = (0..pages)
        .map(|_| arena.alloc_table_to_fill().unwrap())
        .collect();
    let start = Instant::now();
    let mut e = HOST.0 | 0x7 | (1 << 59);
    for &pa in &tables {
        for sptep in arena.table(pa).unwrap() {
            sptep.store(e, std::sync::atomic::Ordering::Relaxed);
            e = e.wrapping_add(4096);
        }
    }
    let elapsed = start.elapsed();
    black_box(&tables);
    for pa in tables {
        arena.free_table(pa);
    }
    arena.reclaim();
    elapsed
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn report(name: &str, level: Level, runs: usize) {
    let capacity = 8192;
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let (mut leaves, mut pages) = (0, 0);
    for _ in 0..runs {
        let arena = Arena::new(capacity).unwrap();
        let r = populate(&arena, level);
        cold.push(r.elapsed);
        let r = populate(&arena, level);
        warm.push(r.elapsed);
        leaves = r.leaves;
        pages = r.pages;
    }
    // The same number of entries stored by a plain loop into as many pages.
    let (mut cold_ceiling, mut warm_ceiling) = (Vec::new(), Vec::new());
    let leaf_pages = leaves.div_ceil(512);
    for _ in 0..runs {
        let arena = Arena::new(capacity).unwrap();
        cold_ceiling.push(store_loop(&arena, leaf_pages));
        warm_ceiling.push(store_loop(&arena, leaf_pages));
    }
    for (label, times, ceiling) in [("cold", cold, cold_ceiling), ("warm", warm, warm_ceiling)] {
        let best = *times.iter().min().unwrap();
        let med = median(times);
        let rate = leaves as f64 / med.as_secs_f64();
        let ceiling = leaves as f64 / median(ceiling).as_secs_f64();
        println!(
            "{name} {label}: {leaves} leaves in {:.3} ms median ({:.3} ms best) = {:.3e} leaves/s; \
             a plain store loop: {:.3e}/s (ratio {:.2})",
            med.as_secs_f64() * 1e3,
            best.as_secs_f64() * 1e3,
            rate,
            ceiling,
            rate / ceiling,
        );
    }
    println!(
        "{name} footprint: {pages} table pages = {:.2} MiB for 8 GiB",
        pages as f64 * 4096.0 / (1 << 20) as f64
    );
}

fn main() {
    // `cargo test --benches` runs bench binaries with no arguments but `--bench` absent: keep
    // that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let runs = if quick { 1 } else { 15 };
    println!("TDP population, 8 GiB guest range, EPT 4-level, {runs} runs each");
    report("4K leaves", Level::L1, runs);
    report("2M leaves", Level::L2, runs * 4);
    let leaves_4k = (GUEST >> 12) as f64;
    println!(
        "reference: the 2021 kernel's ~{SEED_LEAVES_PER_S:.1e} 4K leaves/s would take {:.0} ms for this range",
        leaves_4k / SEED_LEAVES_PER_S * 1e3
    );
}
