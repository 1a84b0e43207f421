//! Boot-time benchmark reports: runs of the sharing modes, side by side with the figures the
//! earlier designs published.

pub mod report;
