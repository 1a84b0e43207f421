//! The trace reader (JSON Lines, `docs/trace-format.md`) on arbitrary bytes: it returns events
//! or an error, never panics; every event it accepts writes back to the same line and reads back
//! equal; a trace's events make a scenario (`sharetop --simulate t.jsonl`) that prints as TOML.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use tdpshare::TraceReader;
use tdpshare::event::trace::TraceWriter;
use tdpshare::sim::Scenario;

fuzz_target!(|data: &[u8]| {
    for skip in [false, true] {
        let Ok(reader) = TraceReader::new(Cursor::new(data)) else {
            return;
        };
        let header = reader.header().clone();
        let reader = reader.skip_unknown(skip);
        let events: Vec<_> = reader.map_while(Result::ok).collect();

        let mut writer = TraceWriter::new(Vec::new(), &header).expect("header writes");
        for e in &events {
            writer.write(e).expect("an accepted event writes");
        }
        let bytes = writer.into_inner().expect("flushes");
        let back = TraceReader::new(Cursor::new(&bytes)).expect("a written header reads");
        let back: Vec<_> = back
            .collect::<Result<_, _>>()
            .expect("written events read back");
        assert_eq!(events, back, "an event changed through write + read");

        let _ = Scenario::from_events("fuzz", None, &events).to_toml();
    }
});
