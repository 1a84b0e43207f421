//! The exposition formats: Prometheus text 0.0.4 and OpenMetrics 1.0.0, chosen per scrape by
//! the `Accept` header. One writer ([`Sink`]) takes a family's samples and spells them in
//! either format; the families and their samples are [`super::metrics`]'.

use std::fmt::Write as _;

use super::registry::{BUCKETS, Histogram};

/// The two formats a scrape can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Prometheus,
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header prefers: each media range's `q` (1 when absent; parameter
    /// names are case-insensitive) ranks it; OpenMetrics wins ties (Prometheus 2.x names it
    /// first), the Prometheus text format answers everything else (curl, promtool, `*/*`, and
    /// Prometheus 3 when told to prefer the text format).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let (mut om, mut text) = (0.0f64, 0.0f64);
        for range in accept.unwrap_or("").split(',') {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or("").to_ascii_lowercase();
            let q = params
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            match media.as_str() {
                "application/openmetrics-text" => om = om.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if om > 0.0 && om >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    /// Always 1, the facts in its labels (OpenMetrics `info`; a gauge in the Prometheus
    /// format).
    Info,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Info => "info",
        }
    }
}

/// Escapes a label value (backslash, double quote, newline), as both formats want.
fn escape_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Escapes HELP text (backslash, newline; OpenMetrics also the double quote).
fn escape_help(v: &str, format: Format, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if format == Format::OpenMetrics => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// A float as both formats read it.
fn float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

/// Writes families into one exposition.
#[derive(Debug)]
pub struct Sink {
    pub format: Format,
    pub out: String,
    family: &'static str,
    kind: Kind,
}

impl Sink {
    pub fn new(format: Format) -> Self {
        Self {
            format,
            out: String::with_capacity(64 * 1024),
            family: "",
            kind: Kind::Gauge,
        }
    }

    /// Starts family `name` (without `_total` / `_info`), with its metadata.
    pub fn family(&mut self, name: &'static str, kind: Kind, unit: &str, help: &str) {
        self.family = name;
        self.kind = kind;
        // The Prometheus format names a counter's family by its sample (`_total`), an info
        // by its gauge (`_info`); OpenMetrics by the family.
        let (shown, type_name) = match (self.format, kind) {
            (Format::Prometheus, Kind::Counter) => (format!("{name}_total"), "counter"),
            (Format::Prometheus, Kind::Info) => (format!("{name}_info"), "gauge"),
            (_, k) => (name.to_owned(), k.name()),
        };
        let _ = write!(self.out, "# HELP {shown} ");
        escape_help(help, self.format, &mut self.out);
        let _ = writeln!(self.out, "\n# TYPE {shown} {type_name}");
        if self.format == Format::OpenMetrics && !unit.is_empty() {
            let _ = writeln!(self.out, "# UNIT {name} {unit}");
        }
    }

    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], extra: Option<(&str, &str)>) {
        self.out.push_str(self.family);
        self.out.push_str(suffix);
        let all = labels.iter().copied().chain(extra);
        let mut first = true;
        for (k, v) in all {
            self.out.push(if first { '{' } else { ',' });
            first = false;
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_value(v, &mut self.out);
            self.out.push('"');
        }
        if !first {
            self.out.push('}');
        }
        self.out.push(' ');
    }

    pub fn counter(&mut self, labels: &[(&str, &str)], value: u64) {
        self.sample("_total", labels, None);
        let _ = writeln!(self.out, "{value}");
    }

    /// A counter of a float quantity (seconds of CPU).
    pub fn counter_f(&mut self, labels: &[(&str, &str)], value: f64) {
        self.sample("_total", labels, None);
        let _ = writeln!(self.out, "{}", float(value));
    }

    pub fn gauge(&mut self, labels: &[(&str, &str)], value: f64) {
        self.sample("", labels, None);
        let _ = writeln!(self.out, "{}", float(value));
    }

    pub fn info(&mut self, labels: &[(&str, &str)]) {
        self.sample("_info", labels, None);
        self.out.push_str("1\n");
    }

    pub fn histogram(&mut self, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        for (i, &n) in h.counts.iter().enumerate() {
            cumulative += n;
            let le = BUCKETS.get(i).map_or("+Inf".to_owned(), |&b| float(b));
            self.sample("_bucket", labels, Some(("le", &le)));
            let _ = writeln!(self.out, "{cumulative}");
        }
        self.sample("_sum", labels, None);
        let _ = writeln!(self.out, "{}", float(h.sum_ns as f64 / 1e9));
        self.sample("_count", labels, None);
        let _ = writeln!(self.out, "{}", h.count);
    }

    /// Ends the exposition (OpenMetrics needs its `# EOF`).
    pub fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_asks_for_openmetrics_curl_does_not() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                    version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0, text/plain")),
            Format::Prometheus
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;Q=0, text/plain")),
            Format::Prometheus
        );
        // Prometheus 3 told to prefer the text format.
        let prom3 = "text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;\
                     q=0.9,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom3)), Format::Prometheus);
    }

    #[test]
    fn one_family_in_both_formats() {
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let mut s = Sink::new(format);
            s.family(
                "tdpshare_fast_zaps",
                Kind::Counter,
                "",
                "Fast zaps.\nAll \"roots\".",
            );
            s.counter(&[("vm", "42"), ("vmm", "q\"e\\mu\n")], 3);
            let text = s.finish();
            match format {
                Format::Prometheus => assert_eq!(
                    text,
                    "# HELP tdpshare_fast_zaps_total Fast zaps.\\nAll \"roots\".\n\
                     # TYPE tdpshare_fast_zaps_total counter\n\
                     tdpshare_fast_zaps_total{vm=\"42\",vmm=\"q\\\"e\\\\mu\\n\"} 3\n"
                ),
                Format::OpenMetrics => assert_eq!(
                    text,
                    "# HELP tdpshare_fast_zaps Fast zaps.\\nAll \\\"roots\\\".\n\
                     # TYPE tdpshare_fast_zaps counter\n\
                     tdpshare_fast_zaps_total{vm=\"42\",vmm=\"q\\\"e\\\\mu\\n\"} 3\n# EOF\n"
                ),
            }
        }
    }

    #[test]
    fn a_histogram_is_cumulative_with_its_sum_in_seconds() {
        let mut h = Histogram::default();
        h.observe_ns(500);
        h.observe_ns(2_000_000);
        h.observe_ns(9_000_000_000);
        let mut s = Sink::new(Format::OpenMetrics);
        s.family("tdpshare_x_seconds", Kind::Histogram, "seconds", "X.");
        s.histogram(&[("vm", "1")], &h);
        let text = s.finish();
        assert!(
            text.contains("# UNIT tdpshare_x_seconds seconds\n"),
            "{text}"
        );
        assert!(text.contains("tdpshare_x_seconds_bucket{vm=\"1\",le=\"0.000001\"} 1\n"));
        assert!(text.contains("tdpshare_x_seconds_bucket{vm=\"1\",le=\"0.004096\"} 2\n"));
        assert!(text.contains("tdpshare_x_seconds_bucket{vm=\"1\",le=\"4.194304\"} 2\n"));
        assert!(text.contains("tdpshare_x_seconds_bucket{vm=\"1\",le=\"+Inf\"} 3\n"));
        assert!(
            text.contains("tdpshare_x_seconds_sum{vm=\"1\"} 9.0020005\n"),
            "{text}"
        );
        assert!(text.contains("tdpshare_x_seconds_count{vm=\"1\"} 3\n"));
    }
}
