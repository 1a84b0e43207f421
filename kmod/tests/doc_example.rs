//! The example in docs/trace-format.md must be a valid trace.
#![cfg(feature = "std")]

use tdpshare::TraceReader;

#[test]
fn trace_format_doc_example_parses() {
    let doc = include_str!("../../docs/trace-format.md");
    let example = doc
        .split("```json\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the doc has a json example");
    let events: Vec<_> = TraceReader::new(example.as_bytes())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(events.len(), 5);
}
