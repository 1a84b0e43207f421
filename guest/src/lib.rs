//! Programs that run inside the test kernel, an L1 under QEMU TCG with SVM/NPT and an emulated
//! VT-d (`cargo xtask kernel boot`, `cargo xtask lab`):
//!
//! - `tdpshare-kcheck`, the series' boot check ([`uapi`] against the model's decisions);
//! - `tdpshare-lab`, the lab VMM ([`lab`]): an L2 VM whose TDP table QEMU's VT-d walks for
//!   the `edu` device's DMA, with the checks `cargo xtask lab test` runs.

pub mod lab;
pub mod sys;
pub mod uapi;
