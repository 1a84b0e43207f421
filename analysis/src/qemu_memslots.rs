//! Import of QEMU's `kvm_set_user_memory` trace (`qemu-system-x86_64 -trace 'kvm_set_user_memory*'`)
//! into memslot events.
//!
//! QEMU reports each `KVM_SET_USER_MEMORY_REGION` call as
//! `kvm_set_user_memory Slot#N flags=0x.. gpa=0x.. size=0x.. ua=0x.. ret=R`, optionally prefixed by
//! `PID@SECONDS.MICROS:` and, in newer QEMUs, with `AddrSpace#A` before the slot. A size of 0
//! deletes the slot. Which of add / move / flags-only a non-zero call is follows from the slot's
//! previous state, exactly as KVM decides it (`kvm_set_memslot`'s `enum kvm_mr_change`).
//! Calls that failed (`ret != 0`) changed nothing and are counted, not imported.

use std::io::BufRead;

use tdpshare::SlotTracker;
use tdpshare::event::{Event, EventKind, Memslot, Source, VmId};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("line {line}: {what}: {text:?}")]
    Parse {
        line: usize,
        what: &'static str,
        text: String,
    },
    #[error("line {line}: slot {slot} deleted but never added")]
    DeleteOfAbsentSlot { line: usize, slot: u32 },
    #[error(
        "no kvm_set_user_memory line in {lines} lines: not a QEMU trace of \
         -trace 'kvm_set_user_memory*'"
    )]
    NoCalls { lines: usize },
    #[error("cannot read the QEMU trace at line {line}")]
    Io {
        line: usize,
        #[source]
        source: std::io::Error,
    },
}

/// One parsed trace line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetUserMemory {
    /// Wall-clock time of the call, when QEMU printed one.
    pub time_ns: Option<u64>,
    pub as_id: u8,
    pub slot: u16,
    pub flags: u32,
    pub gpa: u64,
    pub size: u64,
    /// The userspace address of the slot's memory in QEMU.
    pub ua: u64,
    pub ret: i64,
}

/// What an import produced besides the events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub calls: usize,
    pub failed_calls: usize,
    pub adds: usize,
    pub deletes: usize,
    pub moves: usize,
    pub flag_changes: usize,
    /// True when QEMU printed timestamps; otherwise events are spaced by the given interval.
    pub timed: bool,
}

fn hex(field: &str, key: &str) -> Option<u64> {
    let value = field.strip_prefix(key)?.strip_prefix('=')?;
    let digits = value.strip_prefix("0x").unwrap_or(value);
    u64::from_str_radix(digits, 16).ok()
}

/// Parses one line; `Ok(None)` for lines of other trace events.
pub fn parse_line(line_no: usize, text: &str) -> Result<Option<SetUserMemory>, ImportError> {
    let err = |what| ImportError::Parse {
        line: line_no,
        what,
        text: text.to_owned(),
    };
    let Some(at) = text.find("kvm_set_user_memory ") else {
        return Ok(None);
    };
    let prefix = text[..at].trim_end_matches(':').trim();
    let time_ns = match prefix.split_once('@') {
        Some((_pid, time)) => {
            let (secs, micros) = time.split_once('.').ok_or_else(|| err("bad timestamp"))?;
            let secs: u64 = secs.parse().map_err(|_| err("bad timestamp"))?;
            let micros: u64 = micros.parse().map_err(|_| err("bad timestamp"))?;
            let ns = secs
                .checked_mul(1_000_000_000)
                .and_then(|s| s.checked_add(micros.checked_mul(1000)?))
                .ok_or_else(|| err("bad timestamp"))?;
            Some(ns)
        }
        None => None,
    };
    let mut call = SetUserMemory {
        time_ns,
        as_id: 0,
        slot: 0,
        flags: 0,
        gpa: 0,
        size: 0,
        ua: 0,
        ret: 0,
    };
    let (mut have_slot, mut have_gpa, mut have_size) = (false, false, false);
    for field in text[at + "kvm_set_user_memory ".len()..].split_whitespace() {
        if let Some(n) = field.strip_prefix("AddrSpace#") {
            call.as_id = n.parse().map_err(|_| err("bad address space"))?;
        } else if let Some(n) = field.strip_prefix("Slot#") {
            // QEMU's slot number carries the address space in bits 16 and up.
            let raw: u32 = n.parse().map_err(|_| err("bad slot"))?;
            let (as_id, slot) = SlotTracker::split_slot_id(raw);
            call.slot = slot;
            if as_id != 0 {
                call.as_id = as_id;
            }
            have_slot = true;
        } else if field.starts_with("flags=") {
            call.flags = hex(field, "flags")
                .and_then(|f| u32::try_from(f).ok())
                .ok_or_else(|| err("bad flags"))?;
        } else if field.starts_with("gpa=") {
            call.gpa = hex(field, "gpa").ok_or_else(|| err("bad gpa"))?;
            have_gpa = true;
        } else if field.starts_with("size=") {
            call.size = hex(field, "size").ok_or_else(|| err("bad size"))?;
            have_size = true;
        } else if field.starts_with("ua=") {
            call.ua = hex(field, "ua").ok_or_else(|| err("bad ua"))?;
        } else if let Some(ret) = field.strip_prefix("ret=") {
            call.ret = ret.parse().map_err(|_| err("bad ret"))?;
        }
    }
    if !(have_slot && have_gpa && have_size) {
        return Err(err("missing Slot#, gpa= or size="));
    }
    Ok(Some(call))
}

/// Turns a QEMU trace into memslot events of VM `vm`. Untimed traces get one event every
/// `spacing_ns`, in order.
pub fn import(
    input: impl BufRead,
    vm: VmId,
    spacing_ns: u64,
) -> Result<(Vec<Event>, ImportSummary), ImportError> {
    let mut slots = SlotTracker::default();
    let mut events = Vec::new();
    let mut summary = ImportSummary::default();
    let mut first_time = None;
    let mut last_ns = 0u64;
    let mut lines = 0;
    for (i, line) in input.lines().enumerate() {
        let line_no = i + 1;
        lines = line_no;
        let text = line.map_err(|source| ImportError::Io {
            line: line_no,
            source,
        })?;
        let Some(call) = parse_line(line_no, &text)? else {
            continue;
        };
        summary.calls += 1;
        if call.ret != 0 {
            summary.failed_calls += 1;
            continue;
        }
        // Times never go back: threads print their lines with their own clock readings (a
        // line may come a few microseconds behind the one before), and a line without a
        // timestamp among stamped ones follows the last by `spacing_ns`.
        let ts_ns = match call.time_ns {
            Some(t) => {
                summary.timed = true;
                t.saturating_sub(*first_time.get_or_insert(t))
            }
            None if first_time.is_some() => last_ns.saturating_add(spacing_ns),
            None => (summary.calls as u64).saturating_mul(spacing_ns),
        }
        .max(last_ns);
        last_ns = ts_ns;
        let kind = slots
            .apply(Memslot {
                slot: call.slot,
                as_id: call.as_id,
                gpa: tdpshare::Gpa(call.gpa),
                size: call.size,
                flags: call.flags,
                ua: call.ua,
            })
            .map_err(|e| ImportError::DeleteOfAbsentSlot {
                line: line_no,
                slot: u32::from(e.slot),
            })?;
        match kind {
            EventKind::MemslotAdd(_) => summary.adds += 1,
            EventKind::MemslotDelete(_) => summary.deletes += 1,
            EventKind::MemslotMove { .. } => summary.moves += 1,
            _ => summary.flag_changes += 1,
        }
        events.push(Event::new(ts_ns, vm, Source::Replay, kind));
    }
    if summary.calls == 0 {
        return Err(ImportError::NoCalls { lines });
    }
    Ok((events, summary))
}

#[cfg(test)]
mod tests {

    /// Found by the qemu_import fuzz target: an untimed line after timed ones went back in
    /// time to `calls * spacing`; a timestamp past 2^64 ns overflowed.
    #[test]
    fn times_never_go_back_and_overflowing_timestamps_are_errors() {
        let line = |prefix: &str, slot: u32| {
            format!(
                "{prefix}kvm_set_user_memory Slot#{slot} flags=0x0 gpa=0x0 size=0x1000 ua=0x0 ret=0\n"
            )
        };
        let mixed = line("1@10.000005:", 0) + &line("1@10.900005:", 1) + &line("", 2);
        let (events, _) = import(mixed.as_bytes(), 1, 1000).unwrap();
        let ts: Vec<u64> = events.iter().map(|e| e.ts_ns).collect();
        assert_eq!(ts, [0, 900_000_000, 900_001_000]);
        let backwards =
            line("1@10.000005:", 0) + &line("1@10.000002:", 1) + &line("1@10.000009:", 2);
        let (events, _) = import(backwards.as_bytes(), 1, 1000).unwrap();
        let ts: Vec<u64> = events.iter().map(|e| e.ts_ns).collect();
        assert_eq!(ts, [0, 0, 4000]);
        let huge = line("1@99999999999999999999.0:", 0);
        assert!(import(huge.as_bytes(), 1, 1000).is_err());
        let huge = line("1@18446744073.999999:", 0);
        assert!(import(huge.as_bytes(), 1, 1000).is_err());
    }
    use super::*;

    fn fixture(name: &str) -> std::io::BufReader<std::fs::File> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/qemu-memslots")
            .join(name);
        std::io::BufReader::new(std::fs::File::open(path).unwrap())
    }

    #[test]
    fn garbage_is_not_an_empty_trace() {
        let e = import(&b"garbage\nmore garbage\n"[..], 1, 1000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no kvm_set_user_memory line in 2 lines: not a QEMU trace of -trace \
             'kvm_set_user_memory*'"
        );
    }

    #[test]
    fn seabios_pc_boot_matches_the_live_probe_count() {
        // Counted independently on this machine's live kernel: 37 ops, 23 add, 14 delete.
        let (events, s) = import(fixture("seabios-pc-2g.trace"), 1, 1000).unwrap();
        assert_eq!((s.calls, s.adds, s.deletes), (37, 23, 14));
        assert_eq!((s.moves, s.flag_changes, s.failed_calls), (0, 0, 0));
        assert_eq!(events.len(), 37);
        let EventKind::MemslotAdd(first) = events[0].kind else {
            panic!("first event is {:?}", events[0].kind)
        };
        assert_eq!((first.gpa, first.size), (tdpshare::Gpa(0), 0x8000_0000));
        // Delete events carry the deleted slot's extent, not the call's size=0.
        let EventKind::MemslotDelete(del) = events[2].kind else {
            panic!()
        };
        assert_eq!(del.size, 0x8000_0000);
    }

    #[test]
    fn committed_trace_fixtures_are_this_importers_output() {
        // fixtures/traces/seabios-*.jsonl were written by
        // `tdpshare-analyze import-qemu ... --vm 1 --start-unix-ns 0`; they must stay in step
        // (the lab replays seabios-q35-64m).
        for name in ["seabios-pc-2g", "seabios-pc-8g", "seabios-q35-64m"] {
            let (events, _) = import(fixture(&format!("{name}.trace")), 1, 1_000_000).unwrap();
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../fixtures/traces/{name}.jsonl"));
            let recorded: Vec<Event> = tdpshare::TraceReader::open(path)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(recorded, events, "{name}");
        }
    }

    #[test]
    fn a_recorded_linux_boot_is_the_same_seen_from_qemu_and_from_the_kernel() {
        // `cargo xtask lab record-boot --save q35-8g` kept both views of each phase: QEMU's
        // own memslot trace and the probes' history (the ioctls as the L1 kernel saw them).
        // The calls must agree one for one — slot, address space, address, size, flags.
        let key = |e: &Event| match e.kind {
            EventKind::MemslotAdd(s) => Some(("add", s.slot, s.as_id, s.gpa, s.size, s.flags)),
            EventKind::MemslotDelete(s) => {
                Some(("delete", s.slot, s.as_id, s.gpa, s.size, s.flags))
            }
            EventKind::MemslotMove { slot: s, .. } => {
                Some(("move", s.slot, s.as_id, s.gpa, s.size, s.flags))
            }
            EventKind::MemslotFlags { slot: s, .. } => {
                Some(("flags", s.slot, s.as_id, s.gpa, s.size, s.flags))
            }
            _ => None,
        };
        for phase in ["seabios", "linux"] {
            let name = format!("linux-boot-q35-8g.{phase}");
            let (qemu, summary) = import(fixture(&format!("{name}.trace")), 1, 1_000_000).unwrap();
            assert_eq!(summary.failed_calls, 0, "{name}");
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../fixtures/traces/{name}.jsonl"));
            let kernel: Vec<Event> = tdpshare::TraceReader::open(path)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let from_qemu: Vec<_> = qemu.iter().filter_map(key).collect();
            let from_kernel: Vec<_> = kernel.iter().filter_map(key).collect();
            assert!(from_qemu.len() > 50, "{name}: {} calls", from_qemu.len());
            assert_eq!(from_qemu, from_kernel, "{name}");
        }
    }

    #[test]
    fn q35_with_intel_iommu_imports() {
        let (events, s) = import(fixture("seabios-q35-intel-iommu.trace"), 1, 1000).unwrap();
        assert_eq!(s.calls, 39);
        assert_eq!(events.len(), s.adds + s.deletes + s.moves + s.flag_changes);
        assert!(!s.timed);
    }

    #[test]
    fn timestamps_address_spaces_moves_and_flag_changes() {
        let text = "\
100@1700000000.000010:kvm_set_user_memory AddrSpace#1 Slot#3 flags=0x0 gpa=0x1000 size=0x1000 ua=0x1 ret=0
100@1700000000.000030:kvm_set_user_memory AddrSpace#1 Slot#3 flags=0x1 gpa=0x1000 size=0x1000 ua=0x1 ret=0
kvm_set_user_memory Slot#65539 flags=0x1 gpa=0x9000 size=0x1000 ua=0x1 ret=0
kvm_set_user_memory Slot#4 flags=0x0 gpa=0x0 size=0x1000 ua=0x1 ret=-17
some_other_event x=1
";
        let (events, s) = import(text.as_bytes(), 9, 1).unwrap();
        assert_eq!(
            (s.adds, s.flag_changes, s.moves, s.failed_calls),
            (1, 1, 1, 1)
        );
        assert_eq!(events[1].ts_ns, 20_000);
        assert!(matches!(
            events[2].kind,
            EventKind::MemslotMove { old_gpa: tdpshare::Gpa(0x1000), slot } if slot.as_id == 1 && slot.slot == 3
        ));
    }

    #[test]
    fn bad_lines_name_their_number() {
        let err = import("kvm_set_user_memory Slot#x gpa=0 size=0\n".as_bytes(), 1, 1).unwrap_err();
        assert!(err.to_string().starts_with("line 1: bad slot"), "{err}");
        let err = import(
            "\nkvm_set_user_memory Slot#2 flags=0x0 gpa=0x0 size=0x0 ua=0 ret=0\n".as_bytes(),
            1,
            1,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "line 2: slot 2 deleted but never added");
    }
}
