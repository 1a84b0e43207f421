//! sharetop's model: pure state built from the event stream, with no terminal in it.

pub mod app;
pub mod detail;
pub mod overview;
pub mod sources;
pub mod ui;
