//! Property tests of the TDP MMU: any sequence of map / zap / split / collapse / permission
//! changes keeps the table well-formed, leaks no page, and agrees with a simple reference model
//! of leaves — and the IOMMU's DMA walker translates exactly what the model says.
#![cfg(feature = "std")]

use std::collections::BTreeMap;

use proptest::prelude::*;
use tdpshare::decision::format::{LeafAttrs, Perms};
use tdpshare::event::clock::ManualClock;
use tdpshare::event::{NullSink, RootCause};
use tdpshare::iommu::{Access, DmaWalker};
use tdpshare::table::{Arena, Leaf, Mapping, PageAllocator, RootRole, TdpMmu};
use tdpshare::{Gfn, Hpa, Iova, Level, PteFormat};

/// The model keeps raw numbers; these give the MMU's types.
fn lvl(level: u8) -> Level {
    Level::new(level).expect("levels 1..=3")
}

/// Guest frames one leaf of `level` covers.
fn frames_of(level: u8) -> u64 {
    lvl(level).frames()
}

/// Bytes one leaf of `level` maps.
fn size_of(level: u8) -> u64 {
    lvl(level).size()
}

const HOST: u64 = 0x40_0000_0000;
/// The guest space the ops touch: two 1 GiB regions, ops clustered near their starts.
const REGIONS: [u64; 2] = [0, 1 << 18];

#[derive(Debug, Clone)]
enum Op {
    Map {
        gfn: u64,
        count: u64,
        level: u8,
        hpa: u64,
        perms: Perms,
        pinned: bool,
    },
    Zap {
        gfn: u64,
        frames: u64,
        tables: bool,
    },
    SetPerms {
        gfn: u64,
        frames: u64,
        perms: Perms,
    },
    Split {
        gfn: u64,
        level: u8,
    },
    Collapse {
        gfn: u64,
        level: u8,
    },
}

fn perms() -> impl Strategy<Value = Perms> {
    prop_oneof![
        Just(Perms::RW),
        Just(Perms::R),
        Just(Perms::RWX),
        Just(Perms::RX)
    ]
}

/// A guest frame near the start of a region, aligned to `level`.
fn gfn_at(level: u8) -> impl Strategy<Value = u64> {
    let frames = frames_of(level);
    (0..2usize, 0u64..6).prop_map(move |(r, k)| {
        let base = REGIONS[r];
        if frames >= 1 << 18 {
            base
        } else {
            base + k * frames.max(64) / frames * frames
        }
    })
}

fn op() -> impl Strategy<Value = Op> {
    let level = prop_oneof![3 => Just(1u8), 3 => Just(2u8), 1 => Just(3u8)];
    let map = (level, 1u64..4, 0u64..4, perms(), any::<bool>()).prop_flat_map(
        |(level, count, k, perms, pinned)| {
            gfn_at(level).prop_map(move |gfn| Op::Map {
                gfn,
                count,
                level,
                hpa: HOST + k * size_of(level) * 8 + (gfn << 12),
                perms,
                pinned,
            })
        },
    );
    let range = (0..2usize, 0u64..2048, 1u64..2048);
    prop_oneof![
        4 => map,
        2 => (range.clone(), any::<bool>()).prop_map(|((r, off, frames), tables)| Op::Zap {
            gfn: REGIONS[r] + off,
            frames,
            tables
        }),
        1 => (range, perms()).prop_map(|((r, off, frames), perms)| Op::SetPerms {
            gfn: REGIONS[r] + off,
            frames,
            perms
        }),
        2 => (2u8..=3).prop_flat_map(|level| gfn_at(level - 1).prop_map(move |gfn| Op::Split { gfn, level })),
        2 => (2u8..=3).prop_flat_map(|level| gfn_at(level).prop_map(move |gfn| Op::Collapse { gfn, level })),
    ]
}

/// The reference: non-overlapping leaves by first guest frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MLeaf {
    level: u8,
    hpa: u64,
    perms: Perms,
    pinned: bool,
}

#[derive(Debug, Default, Clone)]
struct Model {
    leaves: BTreeMap<u64, MLeaf>,
}

impl Model {
    fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, MLeaf)> {
        let from = start.saturating_sub(frames_of(3) - 1);
        self.leaves
            .range(from..end)
            .filter(|(b, l)| **b + frames_of(l.level) > start)
            .map(|(b, l)| (*b, *l))
            .collect()
    }

    /// Applies `op`; `false` when the MMU must refuse it (and the model is unchanged).
    fn apply(&mut self, op: &Op) -> bool {
        match *op {
            Op::Map {
                gfn,
                count,
                level,
                hpa,
                perms,
                pinned,
            } => {
                let f = frames_of(level);
                for i in 0..count {
                    let b = gfn + i * f;
                    let want = MLeaf {
                        level,
                        hpa: hpa + i * size_of(level),
                        perms,
                        pinned,
                    };
                    for (_, l) in self.overlapping(b, b + f) {
                        if l.level != level || (l.pinned && l != want) {
                            return false;
                        }
                    }
                }
                for i in 0..count {
                    self.leaves.insert(
                        gfn + i * f,
                        MLeaf {
                            level,
                            hpa: hpa + i * size_of(level),
                            perms,
                            pinned,
                        },
                    );
                }
                true
            }
            Op::Zap { gfn, frames, .. } => {
                let hit = self.overlapping(gfn, gfn + frames);
                if hit.iter().any(|(_, l)| l.pinned) {
                    return false;
                }
                for (b, _) in hit {
                    self.leaves.remove(&b);
                }
                true
            }
            Op::SetPerms { gfn, frames, perms } => {
                let hit = self.overlapping(gfn, gfn + frames);
                // A pinned leaf may gain rights but not lose read or write: DMA uses them.
                let dma = Perms::RW.bits();
                if hit
                    .iter()
                    .any(|(_, l)| l.pinned && l.perms.without(perms).bits() & dma != 0)
                {
                    return false;
                }
                for (b, _) in hit {
                    self.leaves.get_mut(&b).unwrap().perms = perms;
                }
                true
            }
            Op::Split { gfn, level } => {
                let Some((b, l)) = self.overlapping(gfn, gfn + 1).pop() else {
                    return false;
                };
                if l.level != level {
                    return false;
                }
                self.leaves.remove(&b);
                let small = level - 1;
                for i in 0..512 {
                    self.leaves.insert(
                        b + i * frames_of(small),
                        MLeaf {
                            level: small,
                            hpa: l.hpa + i * size_of(small),
                            ..l
                        },
                    );
                }
                true
            }
            Op::Collapse { gfn, level } => {
                let f = frames_of(level);
                let base = gfn & !(f - 1);
                let kids = self.overlapping(base, base + f);
                if kids.len() != 512 {
                    return false;
                }
                let (_, first) = kids[0];
                let small = level - 1;
                if first.hpa % size_of(level) != 0 {
                    return false;
                }
                for (i, (b, l)) in kids.iter().enumerate() {
                    let i = i as u64;
                    if l.level != small
                        || *b != base + i * frames_of(small)
                        || l.hpa != first.hpa + i * size_of(small)
                        || l.perms != first.perms
                        || l.pinned != first.pinned
                    {
                        return false;
                    }
                }
                for (b, _) in kids {
                    self.leaves.remove(&b);
                }
                self.leaves.insert(base, MLeaf { level, ..first });
                true
            }
        }
    }

    fn as_leaves(&self, attrs: LeafAttrs) -> Vec<(u64, u8, u64, Perms, bool)> {
        let _ = attrs;
        self.leaves
            .iter()
            .map(|(b, l)| (*b, l.level, l.hpa, l.perms, l.pinned))
            .collect()
    }
}

fn flatten(leaves: Vec<Leaf>) -> Vec<(u64, u8, u64, Perms, bool)> {
    leaves
        .into_iter()
        .map(|l| (l.gfn.0, l.level.get(), l.hpa.0, l.perms, l.attrs.pinned))
        .collect()
}

fn run(format: PteFormat, ops: &[Op]) -> Result<(), TestCaseError> {
    let arena = Arena::new(4096).unwrap();
    let mut mmu = TdpMmu::new(&arena, format, NullSink, ManualClock::new(0), 1);
    let root = mmu
        .alloc_root(RootRole::NORMAL, RootCause::Initial)
        .unwrap();
    let mut model = Model::default();
    let base = LeafAttrs::default();
    for op in ops {
        let before = mmu.leaves(root).unwrap();
        let result = match *op {
            Op::Map {
                gfn,
                count,
                level,
                hpa,
                perms,
                pinned,
            } => mmu.map(
                root,
                &Mapping {
                    gfn: Gfn(gfn),
                    frames: count * frames_of(level),
                    hpa: Hpa(hpa),
                    level: lvl(level),
                    perms,
                    attrs: LeafAttrs { pinned, ..base },
                },
            ),
            Op::Zap {
                gfn,
                frames,
                tables,
            } => mmu.zap(root, Gfn(gfn), frames, tables),
            Op::SetPerms { gfn, frames, perms } => mmu.set_perms(root, Gfn(gfn), frames, perms),
            Op::Split { gfn, level } => mmu.split(root, Gfn(gfn), lvl(level)),
            Op::Collapse { gfn, level } => mmu.collapse(root, Gfn(gfn), lvl(level)),
        };
        let allowed = model.apply(op);
        prop_assert_eq!(result.is_ok(), allowed, "{:?} gave {:?}", op, result);
        if result.is_err() {
            prop_assert_eq!(
                &mmu.leaves(root).unwrap(),
                &before,
                "refused {:?} changed the table",
                op
            );
        }
        prop_assert_eq!(
            flatten(mmu.leaves(root).unwrap()),
            model.as_leaves(base),
            "after {:?}",
            op
        );
        let census = mmu
            .check_well_formed(root)
            .map_err(|e| TestCaseError::fail(format!("after {op:?}: {e}")))?;
        prop_assert_eq!(
            census.tables,
            arena.pages_in_use(),
            "page leak after {:?}",
            op
        );
    }
    // The IOMMU translates exactly what the model maps.
    let walker = DmaWalker::native(&format, false);
    let root_pa = mmu.root(root).unwrap().pa;
    for region in REGIONS {
        for gfn in (region..region + 4096).step_by(37) {
            let iova = (gfn << 12) + 0x123;
            let want = model
                .overlapping(gfn, gfn + 1)
                .pop()
                .map(|(b, l)| (l.hpa + ((gfn - b) << 12) + 0x123, l.perms));
            for access in [Access::Read, Access::Write] {
                let got = walker
                    .translate(&arena, root_pa, Iova(iova), access)
                    .ok()
                    .map(|t| t.hpa.0);
                let need = if access == Access::Read {
                    Perms::R
                } else {
                    Perms::W
                };
                let expect = want.filter(|(_, p)| p.contains(need)).map(|(h, _)| h);
                prop_assert_eq!(got, expect, "{:?} of gfn {:#x}", access, gfn);
            }
        }
    }
    mmu.free_root(root, RootCause::Released).unwrap();
    prop_assert_eq!(arena.pages_in_use(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn ept4_agrees_with_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(PteFormat::EPT4, &ops)?;
    }

    #[test]
    fn npt5_agrees_with_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(PteFormat::NPT5, &ops)?;
    }
}

#[test]
fn the_generator_makes_every_op_succeed_sometimes() {
    // Guards the test's strength: ops that always fail would prove nothing.
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut ok = [0u32; 5];
    for _ in 0..300 {
        let ops = proptest::collection::vec(op(), 30)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let mut model = Model::default();
        for op in &ops {
            let i = match op {
                Op::Map { .. } => 0,
                Op::Zap { .. } => 1,
                Op::SetPerms { .. } => 2,
                Op::Split { .. } => 3,
                Op::Collapse { .. } => 4,
            };
            if model.apply(op) {
                ok[i] += 1;
            }
        }
    }
    println!("successes per op kind (map, zap, perms, split, collapse): {ok:?}");
    assert!(ok.iter().all(|&n| n >= 10), "successes per op kind: {ok:?}");
}
