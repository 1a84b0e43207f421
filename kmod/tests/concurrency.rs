//! Concurrency proof: DMA through the shared table while KVM's writers change it, with
//! `mmu_lock` as a reader-writer lock as in Linux 6.12.
//!
//! - Under the read lock, concurrently: a vCPU thread faults the unpinned range in (linking
//!   tables by compare-and-swap), zaps single leaves atomically (frozen until their flush) and
//!   faults below pinned huge pages (which splits them); an eager-split thread splits pinned
//!   huge pages, changes their rights and clears their dirty bits.
//! - Under the write lock: collapses of the split pinned pages, unmaps of the unpinned range
//!   (zap + flush), and root switches (a fresh root, the IOMMU re-pointed, the old root freed).
//!
//! The IOTLB caches table entries too (paging-structure caches): a table the writer unlinks is
//! retired only after the non-leaf invalidation that covers it.
//!
//! Required: zero DMA faults and zero wrong translations on pinned ranges; after an unmap's
//! IOTLB flush has returned, zero translations to the unmapped frames; at the end a well-formed
//! table and no page leaked.
//!
//! `cargo test -p tdpshare --features std --test concurrency` runs a short variant;
//! `cargo test --release -p tdpshare --features std --test concurrency -- --ignored --nocapture`
//! runs ten million translations and prints the counts.
#![cfg(feature = "std")]

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use tdpshare::decision::format::{LeafAttrs, MEMTYPE_WB, Perms};
use tdpshare::event::clock::ManualClock;
use tdpshare::event::{NullSink, RootCause};
use tdpshare::iommu::{Access, CostModel, DmaWalker, FlushRequest, IommuDomain, Iotlb};
use tdpshare::table::{
    Arena, Fault, FaultResult, Mapping, MmuError, PageAllocator, RootRole, TdpMmu,
};
use tdpshare::{Gfn, Hpa, Iova, Level, PteFormat};

/// Pinned: guest [0, 32 MiB) → host PINNED_HPA, 2 MiB leaves.
const PINNED_HUGE: u64 = 16;
const PINNED_HPA: u64 = 0x40_0000_0000;
/// Unpinned: guest [1 GiB, 1 GiB + 4 MiB), faulted in by the vCPU thread and mapped to a fresh
/// host range after each unmap round.
const UNPINNED_GFN: u64 = 1 << 18;
const UNPINNED_FRAMES: u64 = 1024;
const UNPINNED_HPA: u64 = 0x80_0000_0000;
const DOMAIN: u16 = 7;

type Mmu<'a> = TdpMmu<&'a Arena, NullSink, ManualClock>;

#[derive(Debug, Default)]
struct Report {
    translations: u64,
    pinned_faults: u64,
    pinned_wrong: u64,
    stale_after_flush: u64,
    unmapped_faults: u64,
    // Read-lock writers.
    faults_mapped: u64,
    faults_spurious: u64,
    faults_retried: u64,
    atomic_zaps: u64,
    eager_splits: u64,
    perm_changes: u64,
    dirty_clears: u64,
    // Write-lock writer.
    collapses: u64,
    unmap_rounds: u64,
    root_switches: u64,
    flushes: u64,
    table_hits: u64,
}

fn round_hpa(round: u64, gfn: Gfn) -> Hpa {
    Hpa(UNPINNED_HPA + round * (UNPINNED_FRAMES << 12) + ((gfn.0 - UNPINNED_GFN) << 12))
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn wb() -> LeafAttrs {
    LeafAttrs {
        memtype: MEMTYPE_WB,
        snoop: true,
        ..LeafAttrs::default()
    }
}

fn pinned() -> LeafAttrs {
    LeafAttrs {
        pinned: true,
        ..wb()
    }
}

fn pinned_mapping() -> Mapping {
    Mapping {
        gfn: Gfn(0),
        frames: PINNED_HUGE * 512,
        hpa: Hpa(PINNED_HPA),
        level: Level::L2,
        perms: Perms::RW,
        attrs: pinned(),
    }
}

fn range_flush(domain: &IommuDomain<'_>, gfn: Gfn, frames: u64, leaf_only: bool) {
    domain.flush(FlushRequest::Range {
        domain: DOMAIN,
        iova: gfn.iova(),
        size: frames << 12,
        leaf_only,
    });
}

/// One DMA thread: random reads and writes to the pinned and the unpinned range.
fn dma_thread(
    t: u64,
    domain: &IommuDomain<'_>,
    arena: &Arena,
    flushed_rounds: &AtomicU64,
    keep_going: impl Fn(u64) -> bool,
) -> Report {
    let mut r = Report::default();
    let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (t + 1);
    let mut n = 0u64;
    while keep_going(n) {
        n += 1;
        let x = xorshift(&mut seed);
        let access = if x & 1 == 0 {
            Access::Read
        } else {
            Access::Write
        };
        let offset = (x >> 8) % (PINNED_HUGE << 21);
        if x & 2 == 0 {
            match domain.dma(arena, Iova(offset), access) {
                Ok(tr) if tr.hpa == Hpa(PINNED_HPA + offset) => {}
                Ok(_) => r.pinned_wrong += 1,
                Err(_) => r.pinned_faults += 1,
            }
        } else {
            let iova = (UNPINNED_GFN << 12) + offset % (UNPINNED_FRAMES << 12);
            let done_before = flushed_rounds.load(Ordering::SeqCst);
            match domain.dma(arena, Iova(iova), access) {
                Ok(tr) => {
                    let round = (tr.hpa.0 - UNPINNED_HPA) / (UNPINNED_FRAMES << 12);
                    if round < done_before {
                        r.stale_after_flush += 1;
                    }
                }
                Err(_) => r.unmapped_faults += 1,
            }
        }
    }
    r.translations = n;
    r
}

/// The vCPU thread, `mmu_lock` for read: faults, atomic zaps, faults below huge pages.
fn vcpu_thread(
    mmu: &RwLock<Mmu<'_>>,
    root: &AtomicU64,
    round: &AtomicU64,
    domain: &IommuDomain<'_>,
    stop: &AtomicBool,
) -> Report {
    let mut r = Report::default();
    let mut seed = 0x1234_5678_9abc_def1;
    while !stop.load(Ordering::Relaxed) {
        let m = mmu.read().unwrap();
        let root = tdpshare::table::RootId(root.load(Ordering::Acquire));
        let round = round.load(Ordering::Acquire);
        for _ in 0..64 {
            let x = xorshift(&mut seed);
            let gfn = Gfn(UNPINNED_GFN + x % UNPINNED_FRAMES);
            let result = if x & 0x300 == 0 {
                // A fault below a pinned huge page: splits it (or finds it split).
                let g = Gfn((x >> 12) % (PINNED_HUGE * 512));
                m.fault_in(
                    root,
                    &Fault {
                        gfn: g,
                        hpa: Hpa(PINNED_HPA + (g.0 << 12)),
                        goal: Level::L1,
                        perms: Perms::RW,
                        attrs: pinned(),
                    },
                )
            } else if x & 0xc00 == 0 {
                let zapped = m
                    .zap_leaf_atomic(root, gfn, |g, level| {
                        range_flush(domain, g, level.frames(), true)
                    })
                    .expect("zap of an unpinned leaf");
                r.atomic_zaps += u64::from(zapped);
                continue;
            } else {
                m.fault_in(
                    root,
                    &Fault {
                        gfn,
                        hpa: round_hpa(round, gfn),
                        goal: Level::L1,
                        perms: Perms::RW,
                        attrs: wb(),
                    },
                )
            };
            match result {
                Ok(FaultResult::Mapped { .. }) => r.faults_mapped += 1,
                Ok(FaultResult::Spurious { .. }) => r.faults_spurious += 1,
                Ok(FaultResult::Retry) => r.faults_retried += 1,
                Err(e) => panic!("fault at {gfn}: {e}"),
            }
        }
    }
    r
}

/// The eager-split thread, `mmu_lock` for read: splits, rights changes and dirty clearing
/// on the pinned huge pages.
fn splitter_thread(
    mmu: &RwLock<Mmu<'_>>,
    root: &AtomicU64,
    domain: &IommuDomain<'_>,
    stop: &AtomicBool,
) -> Report {
    let mut r = Report::default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let m = mmu.read().unwrap();
        let root = tdpshare::table::RootId(root.load(Ordering::Acquire));
        let gfn = Gfn((i % PINNED_HUGE) * 512);
        i += 1;
        match m.split(root, gfn, Level::L2) {
            Ok(_) => {
                r.eager_splits += 1;
                range_flush(domain, gfn, 512, true);
            }
            Err(MmuError::NotHuge { .. }) => {}
            Err(e) => panic!("split at {gfn}: {e}"),
        }
        // Execute on and off: rights change present → present, never through a hole.
        m.set_perms(root, gfn, 512, Perms::RWX).unwrap();
        range_flush(domain, gfn, 512, true);
        m.set_perms(root, gfn, 512, Perms::RW).unwrap();
        range_flush(domain, gfn, 512, true);
        r.perm_changes += 2;
        // A pinned leaf cannot lose write access.
        assert!(matches!(
            m.set_perms(root, gfn, 512, Perms::R),
            Err(MmuError::PinnedRights { .. })
        ));
        m.clear_dirty(root, gfn, 512).unwrap();
        range_flush(domain, gfn, 512, true);
        r.dirty_clears += 1;
    }
    r
}

fn stress(total_translations: u64, dma_threads: u64, min_cycles: u64) -> Report {
    let format = PteFormat::EPT4;
    let arena = Arena::new(16384).unwrap();
    let iotlb = Iotlb::new(512, CostModel::default());
    // Hardware A/D updates race with every compare-and-swap of the writers.
    let walker = DmaWalker::native(&format, true);
    let domain = IommuDomain::new(DOMAIN, walker, &iotlb);
    let mut m = TdpMmu::new(&arena, format, NullSink, ManualClock::new(0), 1);
    // An IOMMU walks this MMU's roots: unlinked tables wait for a non-leaf invalidation.
    m.set_defer_free(true);
    let first = m.alloc_root(RootRole::NORMAL, RootCause::Initial).unwrap();
    m.map(first, &pinned_mapping()).unwrap();
    domain.set_root(Some(m.root(first).unwrap().pa));
    let mmu = RwLock::new(m);
    let root = AtomicU64::new(first.0);
    let round = AtomicU64::new(0);

    // Unmap rounds completed: frames of rounds below this were zapped and flushed.
    let flushed_rounds = AtomicU64::new(0);
    let writer_cycles = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let per_thread = total_translations.div_ceil(dma_threads);

    let mut report = Report::default();
    thread::scope(|s| {
        let dma: Vec<_> = (0..dma_threads)
            .map(|t| {
                let (domain, arena) = (&domain, &arena);
                let (flushed_rounds, writer_cycles) = (&flushed_rounds, &writer_cycles);
                s.spawn(move || {
                    dma_thread(t, domain, arena, flushed_rounds, |n| {
                        n < per_thread || writer_cycles.load(Ordering::Relaxed) < min_cycles
                    })
                })
            })
            .collect();
        let vcpu = s.spawn(|| vcpu_thread(&mmu, &root, &round, &domain, &stop));
        let splitter = s.spawn(|| splitter_thread(&mmu, &root, &domain, &stop));

        // The writer with `mmu_lock` held for write.
        let mut w = Report::default();
        let mut cycle = 0u64;
        while !stop.load(Ordering::Relaxed) {
            {
                let mut m = mmu.write().unwrap();
                let id = tdpshare::table::RootId(root.load(Ordering::Acquire));
                // Collapse what the readers split: the tables of small leaves are unlinked, a
                // full invalidation covers them, then they are retired.
                for h in 0..PINNED_HUGE {
                    let gfn = Gfn(h * 512);
                    match m.collapse(id, gfn, Level::L2) {
                        Ok(_) => w.collapses += 1,
                        Err(MmuError::NotCollapsible {
                            why: "no table there",
                            ..
                        }) => {}
                        Err(e) => panic!("collapse at {gfn}: {e}"),
                    }
                }
                range_flush(&domain, Gfn(0), PINNED_HUGE * 512, false);
                m.release_unlinked(Some((Gfn(0), Gfn(PINNED_HUGE * 512))));

                if cycle % 4 == 3 {
                    // Unmap the unpinned range, flush, publish; faults map the next round.
                    let r = round.load(Ordering::Acquire);
                    m.zap(id, Gfn(UNPINNED_GFN), UNPINNED_FRAMES, cycle % 8 == 7)
                        .unwrap();
                    range_flush(&domain, Gfn(UNPINNED_GFN), UNPINNED_FRAMES, false);
                    let span = Gfn(UNPINNED_GFN) + UNPINNED_FRAMES;
                    m.release_unlinked(Some((Gfn(UNPINNED_GFN), span)));
                    round.store(r + 1, Ordering::Release);
                    flushed_rounds.store(r + 1, Ordering::SeqCst);
                    w.unmap_rounds += 1;
                }
                if cycle % 16 == 15 {
                    // A root update: a fresh root with the pinned content, the IOMMU switched
                    // to it (which drops every cached entry of the domain), the old root freed
                    // at once — DMA walks that read the old pointer are still inside their
                    // read-side section, which keeps its pages from reuse.
                    let fresh = m
                        .alloc_root(RootRole::NORMAL, RootCause::MemslotChange)
                        .unwrap();
                    m.map(fresh, &pinned_mapping()).unwrap();
                    domain.set_root(Some(m.root(fresh).unwrap().pa));
                    m.free_root(id, RootCause::Released).unwrap();
                    m.release_unlinked(None);
                    root.store(fresh.0, Ordering::Release);
                    w.root_switches += 1;
                }
            }
            cycle += 1;
            writer_cycles.store(cycle, Ordering::Relaxed);
            // Let the readers in.
            for _ in 0..4 {
                thread::yield_now();
            }
            if dma.iter().all(|h| h.is_finished()) {
                stop.store(true, Ordering::Relaxed);
            }
        }
        for h in dma {
            let r = h.join().unwrap();
            report.translations += r.translations;
            report.pinned_faults += r.pinned_faults;
            report.pinned_wrong += r.pinned_wrong;
            report.stale_after_flush += r.stale_after_flush;
            report.unmapped_faults += r.unmapped_faults;
        }
        let v = vcpu.join().unwrap();
        let sp = splitter.join().unwrap();
        report.faults_mapped = v.faults_mapped;
        report.faults_spurious = v.faults_spurious;
        report.faults_retried = v.faults_retried;
        report.atomic_zaps = v.atomic_zaps;
        report.eager_splits = sp.eager_splits;
        report.perm_changes = sp.perm_changes;
        report.dirty_clears = sp.dirty_clears;
        report.collapses = w.collapses;
        report.unmap_rounds = w.unmap_rounds;
        report.root_switches = w.root_switches;
    });
    report.flushes = iotlb.stats.flushes.load(Ordering::Relaxed);
    report.table_hits = iotlb.stats.table_hits.load(Ordering::Relaxed);
    let mut m = mmu.into_inner().unwrap();
    let id = tdpshare::table::RootId(root.load(Ordering::Acquire));
    let census = m
        .check_well_formed(id)
        .expect("table well-formed after the run");
    m.release_unlinked(None);
    // Every page in use is a table of the one live root.
    assert_eq!(
        arena.pages_in_use(),
        census.tables,
        "table pages leaked or linked twice"
    );
    report
}

fn check(report: &Report, min_cycles: u64) {
    println!("{report:#?}");
    assert_eq!(report.pinned_faults, 0, "DMA faulted on pinned memory");
    assert_eq!(
        report.pinned_wrong, 0,
        "DMA translated pinned memory wrongly"
    );
    assert_eq!(
        report.stale_after_flush, 0,
        "translation to unmapped frames after the flush"
    );
    assert!(report.unmap_rounds >= min_cycles / 4);
    assert!(report.root_switches >= min_cycles / 16);
    assert!(
        report.faults_mapped > 0 && report.eager_splits > 0 && report.atomic_zaps > 0,
        "the read-lock writers did not run"
    );
    assert!(report.collapses > 0, "nothing was split to collapse");
    assert!(
        report.unmapped_faults > 0,
        "no DMA ever raced with an unmap: the test saw nothing"
    );
    assert!(
        report.table_hits > 0,
        "no walk started from a cached table entry: the paging-structure cache saw no use"
    );
}

#[test]
fn dma_during_concurrent_writers_collapses_unmaps_and_root_switches() {
    let report = stress(300_000, 3, 200);
    check(&report, 200);
}

#[test]
#[ignore = "ten million translations: run in release with --ignored"]
fn stress_ten_million_translations() {
    let report = stress(10_000_000, 3, 600);
    check(&report, 600);
    assert!(report.translations >= 10_000_000);
}
