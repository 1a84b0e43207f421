//! Offline analysis of event streams. Its inputs are traces in the project's format; foreign
//! recordings are first turned into that format by the importers here.

pub mod qemu_memslots;
