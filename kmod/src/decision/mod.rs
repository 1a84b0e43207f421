//! The decision layer: page-table formats, capability negotiation, the sharing policies.
pub mod caps;
pub mod format;
pub mod policy;
