//! sharetop's model: pure state built from the event stream, with no terminal in it.

pub mod overview;
