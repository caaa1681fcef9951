//! `coca-worker pretrain`: the seed's training command on one process.

pub mod args;
pub mod checkpoint;
pub mod demo;
pub mod metrics;
pub mod model_source;
pub mod run;
