//! Concurrency proof: DMA through the shared table while the TDP MMU's writer splits, collapses
//! and changes permissions of pinned huge pages, unmaps (zap + IOTLB flush) unpinned memory, and
//! switches the IOMMU to a fresh root and frees the old one.
//!
//! The IOTLB caches table entries too (paging-structure caches): a table the writer unlinks is
//! retired only after the non-leaf invalidation that covers it, as KVM must do for an IOMMU.
//!
//! Required: zero DMA faults and zero wrong translations on pinned ranges; after an unmap's
//! IOTLB flush has returned, zero translations to the unmapped frames.
//!
//! `cargo test -p tdpshare --features std --test concurrency` runs a short variant;
//! `cargo test --release -p tdpshare --features std --test concurrency -- --ignored --nocapture`
//! runs ten million translations and prints the counts.
#![cfg(feature = "std")]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use tdpshare::decision::format::{LeafAttrs, MEMTYPE_WB, Perms};
use tdpshare::event::clock::ManualClock;
use tdpshare::event::{NullSink, RootCause};
use tdpshare::iommu::{Access, CostModel, DmaWalker, FlushRequest, IommuDomain, Iotlb};
use tdpshare::table::{Arena, Mapping, TdpMmu};
use tdpshare::{Gfn, Hpa, Iova, Level, PteFormat};

/// Pinned: guest [0, 32 MiB) → host PINNED_HPA, 2 MiB leaves.
const PINNED_HUGE: u64 = 16;
const PINNED_HPA: u64 = 0x40_0000_0000;
/// Unpinned: guest [1 GiB, 1 GiB + 4 MiB), remapped to a fresh host range each round.
const UNPINNED_GFN: u64 = 1 << 18;
const UNPINNED_FRAMES: u64 = 1024;
const UNPINNED_HPA: u64 = 0x80_0000_0000;
const DOMAIN: u16 = 7;

#[derive(Debug, Default)]
struct Report {
    translations: u64,
    pinned_faults: u64,
    pinned_wrong: u64,
    stale_after_flush: u64,
    unmapped_faults: u64,
    splits: u64,
    collapses: u64,
    perm_changes: u64,
    unmap_rounds: u64,
    root_switches: u64,
    flushes: u64,
    table_hits: u64,
}

fn round_range(round: u64) -> (u64, u64) {
    let size = UNPINNED_FRAMES << 12;
    let start = UNPINNED_HPA + round * size;
    (start, start + size)
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn stress(total_translations: u64, dma_threads: u64, min_cycles: u64) -> Report {
    let format = PteFormat::EPT4;
    let arena = Arena::new(8192).unwrap();
    let iotlb = Iotlb::new(512, CostModel::default());
    // Hardware A/D updates race with every compare-and-swap of the writer.
    let walker = DmaWalker::native(&format, true);
    let domain = IommuDomain::new(DOMAIN, walker, &iotlb);
    let mut mmu = TdpMmu::new(&arena, format, NullSink, ManualClock::new(0), 1);
    // An IOMMU walks this MMU's roots: unlinked tables wait for a non-leaf invalidation.
    mmu.set_defer_free(true);
    let mut root = mmu.alloc_root(false, RootCause::Initial).unwrap();
    let wb = LeafAttrs {
        memtype: MEMTYPE_WB,
        snoop: true,
        ..LeafAttrs::default()
    };
    let pinned = LeafAttrs { pinned: true, ..wb };
    // The whole content of a root: the pinned huge pages and the unpinned range of `round`.
    let populate = |mmu: &mut TdpMmu<_, _, _>, root, round| {
        mmu.map(
            root,
            &Mapping {
                gfn: Gfn(0),
                frames: PINNED_HUGE * 512,
                hpa: Hpa(PINNED_HPA),
                level: Level::L2,
                perms: Perms::RW,
                attrs: pinned,
            },
        )
        .unwrap();
        mmu.map(
            root,
            &Mapping {
                gfn: Gfn(UNPINNED_GFN),
                frames: UNPINNED_FRAMES,
                hpa: Hpa(round_range(round).0),
                level: Level::L1,
                perms: Perms::RW,
                attrs: wb,
            },
        )
        .unwrap();
    };
    populate(&mut mmu, root, 0);
    domain.set_root(Some(mmu.root(root).unwrap().pa));

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
                    let mut r = Report::default();
                    let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (t + 1);
                    let mut n = 0u64;
                    while n < per_thread || writer_cycles.load(Ordering::Relaxed) < min_cycles {
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
                })
            })
            .collect();

        // The writer: this thread, holding the MMU (`&mut`, KVM's mmu_lock for write).
        let mut w = Report::default();
        let mut cycle = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let huge = cycle % PINNED_HUGE;
            let gfn = Gfn(huge * 512);
            // Only leaves changed: the invalidation hint keeps the paging-structure caches.
            let leaf_flush = || {
                domain.flush(FlushRequest::Range {
                    domain: DOMAIN,
                    iova: gfn.iova(),
                    size: 512 << 12,
                    leaf_only: true,
                })
            };
            mmu.split(root, gfn, Level::L2)
                .expect("split of a pinned huge page");
            leaf_flush();
            w.splits += 1;
            // Permission changes on pinned entries, both on the small leaves and (below) the
            // huge one: never through a non-present value.
            mmu.set_perms(root, gfn, 512, Perms::RWX).unwrap();
            leaf_flush();
            mmu.set_perms(root, gfn, 512, Perms::RW).unwrap();
            leaf_flush();
            // The collapse unlinks the table of small leaves: a full invalidation of the range,
            // and only then is the table retired.
            mmu.collapse(root, gfn, Level::L2).expect("collapse back");
            domain.flush(FlushRequest::Range {
                domain: DOMAIN,
                iova: gfn.iova(),
                size: 512 << 12,
                leaf_only: false,
            });
            mmu.release_unlinked(Some((gfn, gfn + 512)));
            w.collapses += 1;
            mmu.set_perms(root, gfn, 512, Perms::RWX).unwrap();
            mmu.set_perms(root, gfn, 512, Perms::RW).unwrap();
            leaf_flush();
            w.perm_changes += 4;

            if cycle % 4 == 3 {
                // Unmap the unpinned range, flush, publish; then map it to fresh frames.
                let round = w.unmap_rounds;
                mmu.zap(root, Gfn(UNPINNED_GFN), UNPINNED_FRAMES, cycle % 8 == 7)
                    .unwrap();
                domain.flush(FlushRequest::Range {
                    domain: DOMAIN,
                    iova: Gfn(UNPINNED_GFN).iova(),
                    size: UNPINNED_FRAMES << 12,
                    leaf_only: false,
                });
                let span = Gfn(UNPINNED_GFN) + UNPINNED_FRAMES;
                mmu.release_unlinked(Some((Gfn(UNPINNED_GFN), span)));
                flushed_rounds.store(round + 1, Ordering::SeqCst);
                w.unmap_rounds += 1;
                mmu.map(
                    root,
                    &Mapping {
                        gfn: Gfn(UNPINNED_GFN),
                        frames: UNPINNED_FRAMES,
                        hpa: Hpa(round_range(round + 1).0),
                        level: Level::L1,
                        perms: Perms::RW,
                        attrs: wb,
                    },
                )
                .unwrap();
            }
            if cycle % 16 == 15 {
                // A root update: a fresh root with the same content, the IOMMU switched to it
                // (which drops every cached entry of the domain), the old root freed at once.
                // DMA walks that read the old root pointer are still inside their read-side
                // section, which keeps its pages from reuse.
                let fresh = mmu.alloc_root(false, RootCause::MemslotChange).unwrap();
                populate(&mut mmu, fresh, w.unmap_rounds);
                domain.set_root(Some(mmu.root(fresh).unwrap().pa));
                mmu.free_root(root, RootCause::Released).unwrap();
                mmu.release_unlinked(None);
                root = fresh;
                w.root_switches += 1;
            }
            cycle += 1;
            writer_cycles.store(cycle, Ordering::Relaxed);
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
        report.splits = w.splits;
        report.collapses = w.collapses;
        report.perm_changes = w.perm_changes;
        report.unmap_rounds = w.unmap_rounds;
        report.root_switches = w.root_switches;
    });
    report.flushes = iotlb.stats.flushes.load(Ordering::Relaxed);
    report.table_hits = iotlb.stats.table_hits.load(Ordering::Relaxed);
    mmu.check_well_formed(root)
        .expect("table well-formed after the run");
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
    assert!(report.splits >= min_cycles && report.unmap_rounds >= min_cycles / 4);
    assert!(report.root_switches >= min_cycles / 16);
    assert!(
        report.table_hits > 0,
        "no walk started from a cached table entry: the paging-structure cache saw no use"
    );
    assert!(
        report.unmapped_faults > 0,
        "no DMA ever raced with an unmap: the test saw nothing"
    );
}

#[test]
fn dma_during_splits_collapses_and_unmaps() {
    let report = stress(300_000, 3, 200);
    check(&report, 200);
}

#[test]
#[ignore = "ten million translations: run in release with --ignored"]
fn stress_ten_million_translations() {
    let report = stress(10_000_000, 3, 2_000);
    check(&report, 2_000);
    assert!(report.translations >= 10_000_000);
}
