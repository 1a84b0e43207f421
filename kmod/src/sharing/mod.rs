//! The sharing layer: the VM model, pinning, the handshake, the engine.
pub mod dirty;
pub mod engine;
pub mod handshake;
pub mod pin;
pub mod prepopulate;
pub mod vm;

pub use engine::{SharingError, SharingVm, Totals};
