//! The project's own hot paths, timed in this process: the trace format's write and read rates
//! (every consumer — sharetop, analysis, the exporter — reads it; the recorder writes it).

use std::io::Cursor;
use std::time::Instant;

use anyhow::Context;
use tdpshare::event::trace::TraceWriter;
use tdpshare::event::{Event, EventKind, Source, SpteFlags};
use tdpshare::{Gfn, Header, TraceReader};

use crate::results::Case;
use crate::stats::Metric;

/// `events` SPTE changes (the most frequent record of a boot) written to memory and read back,
/// `runs` times: events per second each way.
pub fn trace_rates(events: usize, runs: usize) -> anyhow::Result<Case> {
    let flags = SpteFlags::parse("prwx-ad--").context("SPTE flags")?;
    let list: Vec<Event> = (0..events as u64)
        .map(|i| {
            Event::new(
                i * 100,
                42,
                Source::Live,
                EventKind::SpteSet {
                    gfn: Gfn(0x1_0000 + i),
                    level: 1,
                    old: SpteFlags::parse("---------").unwrap_or(flags),
                    new: flags,
                },
            )
            .on_vcpu((i % 4) as u32)
        })
        .collect();
    let header = Header::new(Source::Live, "bench");
    let (mut write, mut read) = (Vec::new(), Vec::new());
    let mut bytes = 0;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let mut w = TraceWriter::new(Vec::with_capacity(events * 160), &header)?;
        for e in &list {
            w.write(e)?;
        }
        let buf = w.into_inner()?;
        write.push(events as f64 / start.elapsed().as_secs_f64());
        bytes = buf.len();
        let start = Instant::now();
        let n = TraceReader::new(Cursor::new(&buf))?
            .map(|e| e.map(|_| 1u64))
            .sum::<Result<u64, _>>()?;
        anyhow::ensure!(n == events as u64, "read back {n} of {events} events");
        read.push(events as f64 / start.elapsed().as_secs_f64());
    }
    let mut metrics = Vec::new();
    metrics.extend(Metric::of(
        "trace write rate",
        "events/s",
        "measured",
        &write,
    ));
    metrics.extend(Metric::of("trace read rate", "events/s", "measured", &read));
    metrics.push(Metric::count(
        "bytes per event",
        (bytes / events.max(1)) as u64,
    ));
    Ok(Case {
        id: "hotpath/trace".into(),
        label: format!("trace format, {events} SPTE changes, in memory"),
        metrics,
    })
}

/// The probes' decoder, timed by `tdpshare-probe bench-decode` (on this kernel's record
/// layout, no probe attached): records per second over `runs` runs.
pub fn decode_rate(recorder: &std::path::Path, records: u64, runs: usize) -> anyhow::Result<Case> {
    let mut rates = Vec::new();
    for _ in 0..runs.max(1) {
        let out = std::process::Command::new(recorder)
            .args(["bench-decode", "--records", &records.to_string()])
            .output()
            .with_context(|| format!("running {} bench-decode", recorder.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "{} bench-decode failed: {}",
            recorder.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let rate = text
            .rsplit_once(": ")
            .and_then(|(_, r)| r.trim().strip_suffix(" records/s"))
            .and_then(|r| r.parse::<f64>().ok())
            .with_context(|| format!("no rate in {text:?}"))?;
        rates.push(rate);
    }
    Ok(Case {
        id: "hotpath/decode".into(),
        label: format!("probe decoder, {records} SPTE-change records"),
        metrics: Metric::of("decode rate", "records/s", "measured", &rates)
            .into_iter()
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_measured_both_ways() {
        let c = trace_rates(1000, 2).unwrap();
        assert!(c.metric("trace write rate").unwrap().median > 0.0);
        assert_eq!(c.metric("trace read rate").unwrap().n, 2);
        assert!(c.metric("bytes per event").unwrap().median > 50.0);
    }
}
