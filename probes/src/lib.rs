//! The userspace side of the eBPF probes: the catalog, the loader, and the decoding of records
//! into the one event model.
//!
//! Rust eBPF programs get no CO-RE relocations, so they must not hard-code kernel layouts: the
//! programs ship raw tracepoint records, and this crate decodes them with the running kernel's
//! tracefs formats ([`tracefs`]) and BTF ([`btf`]). What no tracepoint carries (a shadow page's
//! table address, whether it is a root) comes from a C program with CO-RE relocations
//! ([`core`]), loaded with libbpf.

pub mod args;
pub mod btf;
pub mod catalog;
pub mod core;
pub mod decode;
pub mod exporter;
pub mod loader;
pub mod rate;
pub mod record;
pub mod tracefs;
pub mod vmm;
