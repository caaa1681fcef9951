//! The CoCa worker: model, checkpoints and the commands one process per device runs.

pub mod model;
