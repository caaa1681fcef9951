//! The CoCa worker: model, checkpoints and the commands one process per device runs.

pub mod bench;
pub mod bench_data;
pub mod bench_memory;
pub mod checkpoint;
pub mod cli;
pub mod comm;
pub mod compare;
pub mod cuda_driver;
pub mod cuda_setup;
pub mod data;
pub mod device;
pub mod distributed;
pub mod eval;
pub mod f32_view;
pub mod hub;
pub mod huge_pages;
pub mod memory_estimate;
pub mod model;
pub mod preflight;
pub mod pretrain;
pub mod resident_memory;
pub mod rng;
pub mod runtime;
pub mod simd;
pub mod train;
pub mod verify;
