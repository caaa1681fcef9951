//! Evaluation and inference on the model: zero-shot classification and caption generation.

pub mod generate;
pub mod zeroshot;
