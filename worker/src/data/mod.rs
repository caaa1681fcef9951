//! Everything between files on disk and the image / token batches a worker trains on.
//!
//! [`tokenizer`] (the CLIP BPE tokenizer) and [`preprocess`] (open_clip's image transforms) give
//! the same ids and pixels as open_clip 3.3.0; [`sampler`] and [`loader`] split and prefetch
//! batches per rank; [`synthetic`] is the built-in captioning set.

pub mod loader;
pub mod preprocess;
pub mod sampler;
pub mod synthetic;
pub mod synthetic_source;
pub mod tokenizer;
