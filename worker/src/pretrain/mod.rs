//! `coca-worker pretrain`: the seed's training command, one rank of a job or a job of one.

pub mod args;
pub mod checkpoint;
pub mod demo;
pub mod elastic;
pub mod metrics;
pub mod model_source;
pub mod optimizer_shards;
pub mod preemption;
pub mod preflight;
pub mod rank_checkpoint;
pub mod run;
mod setup;
mod skips;
mod step;
pub mod summary;
pub mod tensorboard;
