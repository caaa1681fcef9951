//! Types shared by `coca-launch` and `coca-worker`.
//!
//! This crate stays free of heavy dependencies (no candle) so that the launcher builds and starts
//! quickly; anything both sides must agree on (the topology, the control-plane protocol) lives here.

pub mod collective;
pub mod control;
pub mod log_style;
pub mod memory_estimate;
pub mod preempt;
pub mod topology;
pub mod worker_binary;
