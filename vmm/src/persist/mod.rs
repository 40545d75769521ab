//! Snapshots (see format.rs and state.rs).
