//! The userspace side of the eBPF probes.
//!
//! Rust eBPF programs get no CO-RE relocations, so they must not hard-code kernel layouts: the
//! loader reads each tracepoint's record layout from tracefs ([`tracefs`]) at load time and
//! hands the field offsets to the programs.

pub mod tracefs;
