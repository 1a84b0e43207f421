//! The QEMU memslot trace importer (`tdpshare-analyze import-qemu`) on arbitrary bytes: events
//! or an error naming the line, never a panic (QEMU's trace output is not ours to trust).
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use tdpshare_analysis::qemu_memslots;

fuzz_target!(|data: &[u8]| {
    if let Ok((events, summary)) = qemu_memslots::import(Cursor::new(data), 1, 1_000) {
        assert!(summary.calls >= events.len());
        assert!(
            events.windows(2).all(|w| w[0].ts_ns <= w[1].ts_ns),
            "imported events out of time order"
        );
    }
});
