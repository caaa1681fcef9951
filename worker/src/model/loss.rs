//! The CoCa loss: symmetric contrastive cross-entropy plus captioning cross-entropy.

use super::coca::CocaOutput;
use super::ops::cross_entropy_rows;
use crate::model::tensor_parallel::{caption_loss_parallel, TensorParallel};
use candle_core::{Result, Tensor};

/// Loss weights and the padding id (open_clip's `CoCaLoss` arguments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CocaLossConfig {
    pub contrastive_weight: f64,
    pub caption_weight: f64,
    /// Caption targets equal to this id are ignored.
    pub pad_id: u32,
}

impl Default for CocaLossConfig {
    /// open_clip's defaults: contrastive 1.0, caption 2.0, pad 0.
    fn default() -> Self {
        Self {
            contrastive_weight: 1.0,
            caption_weight: 2.0,
            pad_id: 0,
        }
    }
}

/// The weighted loss parts and their sum, each a scalar `[]`.
#[derive(Debug, Clone)]
pub struct CocaLoss {
    pub contrastive: Tensor,
    pub caption: Tensor,
    pub total: Tensor,
}

/// Contrastive loss of one process holding the whole batch: `logit_scale · I Tᵀ` against the
/// diagonal, averaged over both directions.
pub fn contrastive_loss(
    image_features: &Tensor,
    text_features: &Tensor,
    logit_scale: &Tensor,
) -> Result<Tensor> {
    let b = image_features.dim(0)?;
    let per_image = image_features
        .matmul(&text_features.t()?)?
        .broadcast_mul(logit_scale)?;
    let per_text = per_image.t()?;
    let targets = Tensor::arange(0u32, b as u32, image_features.device())?;
    let image_ce = cross_entropy_rows(&per_image, &targets, None)?.mean_all()?;
    let text_ce = cross_entropy_rows(&per_text, &targets, None)?.mean_all()?;
    (image_ce + text_ce)? * 0.5
}

/// Mean cross-entropy of `logits` `[B, T, V]` against `labels` `[B, T]` over the tokens that are
/// not padding.
pub fn caption_loss(logits: &Tensor, labels: &Tensor, pad_id: u32) -> Result<Tensor> {
    caption_loss_parallel(logits, labels, pad_id, &TensorParallel::single())
}

/// open_clip's `CoCaLoss` on one process (or on every member of a tensor-parallel group alike:
/// the caption part is then the vocabulary-parallel cross-entropy over `out.tp`).
pub fn coca_loss(out: &CocaOutput, cfg: &CocaLossConfig) -> Result<CocaLoss> {
    let contrastive =
        (contrastive_loss(&out.image_features, &out.text_features, &out.logit_scale)?
            * cfg.contrastive_weight)?;
    let caption = (caption_loss_parallel(&out.logits, &out.labels, cfg.pad_id, &out.tp)?
        * cfg.caption_weight)?;
    let total = (&contrastive + &caption)?;
    Ok(CocaLoss {
        contrastive,
        caption,
        total,
    })
}
