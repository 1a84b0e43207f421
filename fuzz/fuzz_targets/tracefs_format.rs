//! The tracefs `format` file parser on arbitrary text, then every field read out of a record
//! (the same bytes): errors, never panics — a format file comes from whatever kernel runs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tdpshare_probes::tracefs::Format;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(format) = Format::parse("kvmmmu", text) else {
        return;
    };
    let _ = format.qualified_name();
    for field in &format.fields {
        let _ = format.read_u64(data, &field.name);
        for size in [1, 2, 4, 8] {
            let _ = format.offset_of(&field.name, size);
        }
    }
    let _ = format.read_u64(data, "no_such_field");
});
