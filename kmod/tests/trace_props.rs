//! Property tests of the trace format: any event sequence survives a write/read round trip, and
//! any corruption of a trace yields an error (with a line number where one applies), never a panic.
#![cfg(feature = "std")]

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use tdpshare::event::trace::{
    FORMAT_NAME, FORMAT_VERSION, Header, TraceError, TraceReader, TraceWriter,
};
use tdpshare::event::*;
use tdpshare::{Gfn, Gpa, Iova};

fn range() -> impl Strategy<Value = GpaRange> {
    (any::<u64>(), any::<u64>()).prop_map(|(start, size)| GpaRange {
        start: Gpa(start),
        size,
    })
}

fn page_size() -> impl Strategy<Value = PageSize> {
    prop_oneof![
        Just(PageSize::Size4K),
        Just(PageSize::Size2M),
        Just(PageSize::Size1G)
    ]
}

fn prepop_cause() -> impl Strategy<Value = PrepopCause> {
    prop_oneof![
        Just(PrepopCause::SharingStart),
        Just(PrepopCause::NewRoot),
        Just(PrepopCause::MemslotAdd),
        Just(PrepopCause::HugePageSplit),
        Just(PrepopCause::PreFault),
    ]
}

fn root() -> impl Strategy<Value = Root> {
    let cause = prop_oneof![
        Just(RootCause::Initial),
        Just(RootCause::MemslotChange),
        Just(RootCause::Smm),
        Just(RootCause::ContextReset),
        Just(RootCause::Released),
        Just(RootCause::Unknown),
    ];
    (any::<u64>(), 1u8..=5, any::<bool>(), cause).prop_map(|(root, level, smm, cause)| Root {
        root,
        level,
        smm,
        cause,
    })
}

fn memslot() -> impl Strategy<Value = Memslot> {
    (
        any::<u16>(),
        0u8..2,
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(|(slot, as_id, gpa, size, flags, ua)| Memslot {
            slot,
            as_id,
            gpa: Gpa(gpa),
            size,
            flags,
            ua,
        })
}

fn flags() -> impl Strategy<Value = SpteFlags> {
    any::<u16>().prop_map(SpteFlags::from_bits_truncate)
}

fn mode() -> impl Strategy<Value = ShareMode> {
    proptest::sample::select(ShareMode::ALL.to_vec())
}

fn kind() -> impl Strategy<Value = EventKind> {
    let scope = prop_oneof![
        Just(FlushScope::All),
        Just(FlushScope::Domain),
        Just(FlushScope::Range),
        Just(FlushScope::RangeLeaves)
    ];
    prop_oneof![
        (range(), page_size(), prepop_cause()).prop_map(|(range, page_size, cause)| {
            EventKind::PrepopulateStart {
                range,
                page_size,
                cause,
            }
        }),
        (
            range(),
            page_size(),
            prepop_cause(),
            any::<u64>(),
            proptest::option::of(any::<[u64; 3]>()),
            any::<u64>()
        )
            .prop_map(|(range, page_size, cause, entries, leaves, ns)| {
                EventKind::PrepopulateEnd {
                    range,
                    page_size,
                    cause,
                    entries,
                    leaves,
                    ns,
                }
            }),
        root().prop_map(EventKind::RootAlloc),
        root().prop_map(EventKind::RootSwitch),
        root().prop_map(EventKind::RootFree),
        (any::<u64>(), any::<u64>())
            .prop_map(|(generation, pages)| EventKind::FastZap { generation, pages }),
        (range(), any::<bool>(), any::<u64>()).prop_map(|(range, tables, entries)| {
            EventKind::Zap {
                range,
                tables,
                entries,
            }
        }),
        (any::<u64>(), 2u8..=3).prop_map(|(gfn, level)| EventKind::HugePageSplit {
            gfn: Gfn(gfn),
            level
        }),
        (any::<u64>(), 2u8..=3).prop_map(|(gfn, level)| EventKind::HugePageCollapse {
            gfn: Gfn(gfn),
            level
        }),
        (any::<u64>(), 1u8..=5, flags(), flags()).prop_map(|(gfn, level, old, new)| {
            EventKind::SpteSet {
                gfn: Gfn(gfn),
                level,
                old,
                new,
            }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(gfn, error_code)| EventKind::PageFault {
            gfn: Gfn(gfn),
            error_code
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(iova, size, ns)| {
            EventKind::IommuMap {
                iova: Iova(iova),
                size,
                ns,
            }
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(iova, size, ns)| {
            EventKind::IommuUnmap {
                iova: Iova(iova),
                size,
                ns,
            }
        }),
        (
            scope,
            proptest::option::of(any::<u32>()),
            proptest::option::of(range()),
            any::<u64>()
        )
            .prop_map(|(scope, domain, range, ns)| EventKind::IotlbFlush {
                scope,
                domain,
                range,
                ns
            }),
        (range(), any::<u64>()).prop_map(|(range, pages)| EventKind::Pin { range, pages }),
        (range(), any::<u64>()).prop_map(|(range, pages)| EventKind::Unpin { range, pages }),
        memslot().prop_map(EventKind::MemslotAdd),
        memslot().prop_map(EventKind::MemslotDelete),
        (any::<u64>(), memslot()).prop_map(|(old_gpa, slot)| EventKind::MemslotMove {
            old_gpa: Gpa(old_gpa),
            slot
        }),
        (any::<u32>(), memslot())
            .prop_map(|(old_flags, slot)| EventKind::MemslotFlags { old_flags, slot }),
        mode().prop_map(|mode| EventKind::SharingRequested { mode }),
        (mode(), any::<u64>())
            .prop_map(|(mode, handle)| EventKind::SharingStarted { mode, handle }),
        (mode(), any::<u64>())
            .prop_map(|(mode, unpinned)| EventKind::SharingStopped { mode, unpinned }),
        (mode(), ".*").prop_map(|(mode, reason)| EventKind::SharingRefused { mode, reason }),
        (any::<u64>(), any::<bool>(), any::<bool>()).prop_map(|(iova, write, resolved)| {
            EventKind::IoPageFault {
                iova: Iova(iova),
                write,
                resolved,
            }
        }),
        any::<bool>().prop_map(|enter| EventKind::SmmTransition { enter }),
        (
            prop_oneof![Just(0u8), Just(4u8)],
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(cr, value)| EventKind::CrWrite { cr, value }),
        ".*".prop_map(|name| EventKind::VmName { name }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let source = prop_oneof![
        Just(Source::Live),
        Just(Source::Simulator),
        Just(Source::Replay)
    ];
    (
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(any::<u32>()),
        source,
        kind(),
    )
        .prop_map(|(ts_ns, vm, vcpu, source, kind)| Event {
            ts_ns,
            vm,
            vcpu,
            source,
            kind,
        })
}

fn header() -> Header {
    Header {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        source: Source::Live,
        kernel: "6.18.0".into(),
        tool_version: "test".into(),
        start_unix_ns: 0,
        host: "lab".into(),
    }
}

fn encode(events: &[Event]) -> Vec<u8> {
    let mut w = TraceWriter::new(Vec::new(), &header()).unwrap();
    for e in events {
        w.write(e).unwrap();
    }
    w.into_inner().unwrap()
}

/// The line number an error names, if it names one.
fn error_line(err: &TraceError) -> Option<u64> {
    match err {
        TraceError::Io { line, .. }
        | TraceError::Truncated { line }
        | TraceError::Json { line, .. }
        | TraceError::UnknownEvent { line, .. }
        | TraceError::Malformed { line, .. }
        | TraceError::NoKind { line } => Some(*line),
        _ => None,
    }
}

#[test]
fn every_event_kind_is_generated() {
    // The NAMES table and the strategy above must stay in step with the enum.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut seen = [false; EventKind::NAMES.len()];
    for _ in 0..4000 {
        let kind = kind().new_tree(&mut runner).unwrap().current();
        seen[kind.index()] = true;
    }
    let missing: Vec<_> = EventKind::NAMES
        .iter()
        .zip(seen)
        .filter(|(_, s)| !s)
        .map(|(n, _)| *n)
        .collect();
    assert!(missing.is_empty(), "never generated: {missing:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_sequence_round_trips(events in proptest::collection::vec(event(), 0..40)) {
        let bytes = encode(&events);
        let back: Vec<Event> = TraceReader::new(&bytes[..]).unwrap().collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(back, events);
    }

    #[test]
    fn corruption_is_an_error_never_a_panic(
        events in proptest::collection::vec(event(), 1..20),
        cut in any::<proptest::sample::Index>(),
        flip in any::<proptest::sample::Index>(),
        byte in any::<u8>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = encode(&events);
        let lines = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        } else {
            let i = flip.index(bytes.len());
            bytes[i] = byte;
        }
        match TraceReader::new(&bytes[..]) {
            Err(_) => {}
            Ok(reader) => {
                for item in reader {
                    match item {
                        Ok(_) => {}
                        Err(err) => {
                            if let Some(line) = error_line(&err) {
                                prop_assert!((2..=lines + 1).contains(&line), "{err}: line {line} of {lines}");
                            }
                            prop_assert!(!err.to_string().is_empty());
                        }
                    }
                }
            }
        }
    }
}
