//! The CoCa model (arXiv 2205.01917) as open_clip defines it, one concern per file.

pub mod attention;
pub mod autocast;
pub mod coca;
pub mod config;
pub mod decoder;
pub mod flops;
pub mod grad_checkpoint;
pub mod group_loss;
pub mod layers;
pub mod loss;
pub mod manifest;
pub mod ops;
pub mod pooler;
pub mod tensor_parallel;
pub mod text;
pub mod transformer;
pub mod vision;

pub use coca::{CoCa, CocaOutput};
pub use config::CocaConfig;
pub use loss::{coca_loss, CocaLoss, CocaLossConfig};
