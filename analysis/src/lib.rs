//! Offline analysis of event streams. Inputs are traces in the project's format (JSON Lines) or
//! the Parquet dataset `export` writes; foreign recordings are first turned into the trace format
//! by the importers here. Everything is loaded into one polars frame ([`frame`]); the reports
//! ([`report`]) are lazy queries over it, with the simulator replaying a trace for the what-if.

#[cfg(feature = "frames")]
pub mod dataset;
#[cfg(feature = "frames")]
pub mod frame;
pub mod qemu_memslots;
#[cfg(feature = "frames")]
pub mod report;
