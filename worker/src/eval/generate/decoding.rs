//! Which decoder computes each step's logits: the CPU row kernels, the model's layers over a
//! tensor cache, or the recomputed prefix.

use super::{
    repeat_rows, CachedDecoder, DecodePrecision, DecodeWeights, RecomputeDecoder, StepDecoder,
    TensorCacheDecoder,
};
use crate::model::ops::portable_forced;
use crate::model::CoCa;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// How the logits of each decoding step are computed.
pub enum Decoding<'m> {
    /// The CPU row kernels over [`DecodeWeights`] on a key/value cache: a float32 model on the
    /// CPU, the fastest there.
    Kernels(Box<DecodeWeights<'m>>),
    /// The model's own layers over a key/value cache of tensors ([`TensorCacheDecoder`]), on
    /// the model's device and dtype: every other model, and every model when the portable ops
    /// are forced.
    Tensors(&'m CoCa),
    /// The whole prefix recomputed every step by the model's forward pass
    /// ([`RecomputeDecoder`], open_clip's way): the reference the caches are checked against.
    Recompute(&'m CoCa),
}

impl<'m> Decoding<'m> {
    /// The cached decoding `model` runs: [`Self::Kernels`] in `precision` for a float32 model
    /// on the CPU unless the portable ops are forced, else [`Self::Tensors`] (in the model's
    /// own dtype: `precision` is the row kernels' choice, and other than float32 it is ignored
    /// there with a warning).
    /// A model computing in mixed precision (`--bf16`/`--fp16`) decodes by [`Self::Recompute`],
    /// whose forward pass honours its autocast.
    pub fn new(model: &'m CoCa, precision: DecodePrecision) -> Result<Self> {
        if model.tp.autocast().dtype().is_some() {
            return Ok(Self::Recompute(model));
        }
        let weights = &model.text_decoder.text_projection;
        if weights.device().is_cpu() && weights.dtype() == DType::F32 && !portable_forced() {
            return Ok(Self::Kernels(Box::new(DecodeWeights::new(
                model, precision,
            )?)));
        }
        if precision != DecodePrecision::F32 {
            tracing::warn!(
                ?precision,
                "the decode precision applies to the CPU row kernels; decoding on tensors runs \
                 in the model's own dtype"
            );
        }
        Ok(Self::Tensors(model))
    }

    /// The model decoded.
    pub fn model(&self) -> &'m CoCa {
        match self {
            Self::Kernels(weights) => weights.model(),
            Self::Tensors(model) | Self::Recompute(model) => model,
        }
    }

    /// [`DecodeWeights::move_to_huge_pages`] for the row kernels; nothing otherwise.
    pub fn move_to_huge_pages(&self) {
        if let Self::Kernels(weights) = self {
            weights.move_to_huge_pages();
        }
    }

    /// A step decoder over image tokens `image_embs` `[B, Q, width]` with `rows_per_image`
    /// consecutive sequences per image.
    pub(super) fn decoder(
        &self,
        image_embs: &Tensor,
        rows_per_image: usize,
    ) -> Result<Box<dyn StepDecoder + '_>> {
        Ok(match self {
            Self::Kernels(weights) => {
                Box::new(CachedDecoder::new(weights, image_embs, rows_per_image)?)
            }
            Self::Tensors(model) => {
                Box::new(TensorCacheDecoder::new(model, image_embs, rows_per_image)?)
            }
            Self::Recompute(model) => Box::new(RecomputeDecoder::new(
                model,
                repeat_rows(image_embs, rows_per_image)?,
            )),
        })
    }
}
