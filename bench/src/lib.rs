//! Boot-time benchmark reports: real boots (live), the lab's runs, the simulator's replays of
//! recorded boots, and the project's hot paths — side by side with the figures the earlier
//! designs published (`tdpshare-bench`, `cargo xtask bench`; docs/bench.md).

pub mod hotpath;
pub mod html;
pub mod lab;
pub mod live;
pub mod plot;
pub mod replay;
pub mod report;
pub mod results;
pub mod stats;
