//! The scenario loader (`kmod/scenarios/*.toml`) on arbitrary text: a scenario or an error,
//! never a panic; a scenario it accepts prints as TOML that loads back to the same scenario.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tdpshare::sim::Scenario;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    let Ok(s) = Scenario::parse(path, text) else {
        return;
    };
    let toml = s.to_toml();
    let back = Scenario::parse(path, &toml)
        .unwrap_or_else(|e| panic!("printed scenario does not load: {e}\n{toml}"));
    assert_eq!(
        back.to_toml(),
        toml,
        "scenario changed through print + load"
    );
});
