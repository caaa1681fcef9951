//! Everything between files on disk and the image / token batches a worker trains on.

pub mod loader;
pub mod sampler;
pub mod synthetic;
