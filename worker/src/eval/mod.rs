//! Evaluation and inference on the model: zero-shot classification, caption generation and the
//! inference commands.

pub mod caption;
pub mod caption_metrics;
pub mod classification;
pub mod cli;
pub mod embed;
pub mod generate;
pub mod host_gather;
pub mod image_batches;
pub mod karpathy;
pub mod model_args;
pub mod retrieval;
pub mod zeroshot;
