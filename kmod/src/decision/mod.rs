//! The decision layer: whether and how a VM's TDP table may be shared with an IOMMU — the
//! address types, the page-table formats and their bits, capability negotiation, the
//! prerequisites of each mode and the reasons for a refusal, and the modes' policies.
//!
//! **This layer is compiled into the kernel** (the kernel series' `arch/x86/kvm/
//! tdp_share_check.rs`, a built-in Rust object called from KVM's C ioctl path, declares this
//! folder as its module), from these very files. So it follows the kernel's Rust rules,
//! and `cargo xtask test` compiles it alone under them: edition 2021 and Rust 1.78 (what Linux
//! 6.12 accepts: no let-chains, no later library API), `core` only (no `alloc`: lists of
//! reasons have a fixed capacity), no floating point, and no arithmetic or indexing that can
//! panic on input values (the kernel builds with overflow checks). It uses nothing outside this
//! folder; every other layer of the crate may use it.
//!
//! Files refer to each other as `super::…`, so this folder is a module of `tdpshare`, of the
//! kernel's object, or a crate of its own (the rules check) alike; it holds no crate-level
//! attribute (the kernel passes `no_std` on the command line).
#![deny(
    clippy::arithmetic_side_effects,
    clippy::float_arithmetic,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::todo,
    clippy::unimplemented,
    clippy::incompatible_msrv
)]

pub mod addr;
pub mod caps;
pub mod format;
pub mod iommu;
pub mod kvm;
pub mod list;
pub mod policy;
pub mod prereq;
