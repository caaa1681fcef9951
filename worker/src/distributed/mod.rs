//! Running as one rank of a job: the loss over a data-parallel group, sharing work out over
//! ranks, and the rank's context read from the launcher's environment. The model's own
//! parallelism (tensor-parallel layers, collectives as autograd operations) lives in
//! [`crate::model::tensor_parallel`] and [`crate::model::ops::collective`], below both this
//! module and the trainer.

pub mod context;
pub mod job_groups;
#[cfg(test)]
pub mod loopback_ring;
pub mod share;
