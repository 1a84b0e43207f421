//! The ring-buffer record decoder on arbitrary records, decoded with the tracefs formats
//! recorded from real kernels (`fixtures/tracefs-*`): events or a counted undecodable record,
//! never a panic. Records arrive from the kernel, so any byte may be anything — a field of a
//! different kernel's layout, a level of 9, a memslot that was never added.
#![no_main]

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tdpshare::decision::format::Layout;
use tdpshare::{Kind, PteFormat};
use tdpshare_probes::btf::RoleLayout;
use tdpshare_probes::decode::{Decoder, parse_record};
use tdpshare_probes::tracefs::Format;
use tdpshare_probes_common::{PROGRAMS, ProbeId, RECORD_SIZE};

/// Every tracepoint format the fixtures hold (6.18's own, and the series').
fn formats() -> &'static HashMap<ProbeId, Format> {
    static FORMATS: OnceLock<HashMap<ProbeId, Format>> = OnceLock::new();
    FORMATS.get_or_init(|| {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
        let mut formats = HashMap::new();
        for p in PROGRAMS.iter().filter(|p| !p.core) {
            let Some(id) = p.id else { continue };
            for dir in ["tracefs-6.18", "tracefs-6.12-series"] {
                let file = fixtures
                    .join(dir)
                    .join(format!("{}_{}.format", p.system, p.event));
                if let Ok(text) = std::fs::read_to_string(&file) {
                    let format = Format::parse(p.system, &text)
                        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                    formats.insert(id, format);
                    break;
                }
            }
        }
        assert!(
            formats.len() >= 10,
            "fixtures not found below {}",
            fixtures.display()
        );
        formats
    })
}

/// The host entry format the first byte picks: EPT or NPT, 4 or 5 levels, 6.12's own layout or
/// the series'.
fn spte(choice: u8) -> PteFormat {
    let kind = if choice & 1 == 0 {
        Kind::Ept
    } else {
        Kind::Npt
    };
    let levels = if choice & 2 == 0 { 4 } else { 5 };
    let layout = if choice & 4 == 0 {
        Layout::Sharing
    } else {
        Layout::Stock
    };
    PteFormat::with_layout(kind, levels, layout).expect("4 and 5 levels exist")
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, records)) = data.split_first() else {
        return;
    };
    let mut decoder = Decoder::new(formats().clone(), RoleLayout::LINUX_6, spte(choice), 1_000);
    let mut last_ts = 0;
    for chunk in records.chunks(RECORD_SIZE) {
        let Some(mut r) = parse_record(chunk) else {
            continue;
        };
        // Most random ids name no probe; keep a few as they are (the decoder must refuse
        // them) and map the rest onto a real one so the fuzzer spends its time in the decoding.
        if ProbeId::from_u32(r.probe).is_none() && r.probe & 0x8000_0000 == 0 {
            r.probe = ProbeId::ALL[r.probe as usize % ProbeId::ALL.len()] as u32;
        }
        last_ts = last_ts.max(r.ts_ns);
        let _ = decoder.decode(&r);
    }
    let _ = decoder.flush_pending(last_ts.saturating_add(1));
});
