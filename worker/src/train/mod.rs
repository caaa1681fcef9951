//! Training: the optimizer over flat buffers, the schedule, parameter groups and the step.

pub mod adamw;
mod adamw_inplace;
pub mod flat;
pub mod groups;
pub mod loss_scaler;
pub mod moments;
pub mod norm;
pub mod partition;
pub mod schedule;
pub mod trainable;
pub mod trainer;
