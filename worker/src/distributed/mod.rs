//! Running as one rank of a job: collectives as autograd operations, the loss over a
//! data-parallel group, tensor parallelism (`tensor_parallel`), and the rank's context read
//! from the launcher's environment.

pub mod autograd;
pub mod context;
pub mod loss;
pub mod share;
pub mod tensor_parallel;
