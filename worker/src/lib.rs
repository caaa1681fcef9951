//! The CoCa worker: model, checkpoints and the commands one process per device runs.

pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod model;
pub mod runtime;
pub mod train;
pub mod verify;
