//! The multimodal text decoder: open_clip's `MultimodalTransformer`.

use super::autocast::widen;
use super::config::CocaConfig;
use super::layers::{matmul_last, normal, LayerNorm};
use super::transformer::{causal_mask, BlockShape, ResidualAttentionBlock};
use crate::model::tensor_parallel::TensorParallel;
use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;

/// Alternating causal self-attention blocks (`resblocks.N`) and cross-attention blocks over the
/// image tokens (`cross_attn.N`), then `ln_final` and the vocabulary projection.
///
/// Under tensor parallelism the blocks are split as in [`ResidualAttentionBlock`] and the
/// vocabulary projection by columns: [`Self::forward`] returns this member's `[B, T, V/T]`
/// slice of the logits (see
/// [`crate::model::tensor_parallel::vocab_parallel_cross_entropy`]).
#[derive(Debug, Clone)]
pub struct MultimodalDecoder {
    pub(crate) resblocks: Vec<ResidualAttentionBlock>,
    pub(crate) cross_attn: Vec<ResidualAttentionBlock>,
    pub(crate) ln_final: LayerNorm,
    /// This member's columns of the `[W, V]` projection (all of it at degree 1).
    pub(crate) text_projection: Tensor,
    pub(crate) context_length: usize,
    pub(crate) tp: TensorParallel,
    /// Recompute each block's activations in the backward pass instead of keeping them.
    pub(crate) grad_checkpointing: bool,
}

impl MultimodalDecoder {
    /// Loads `text_decoder.*` (this tensor-parallel member's shards).
    pub fn new(cfg: &CocaConfig, vb: VarBuilder, tp: &TensorParallel) -> Result<Self> {
        let m = &cfg.multimodal_cfg;
        let shape = BlockShape {
            width: m.width,
            heads: m.heads,
            mlp_ratio: m.mlp_ratio,
            layers: m.layers,
        };
        let stack = |name: &str, cross: bool| -> Result<Vec<ResidualAttentionBlock>> {
            let vb = vb.pp(name);
            (0..m.layers)
                .map(|i| ResidualAttentionBlock::new(shape, cross, vb.pp(i.to_string()), tp))
                .collect()
        };
        Ok(Self {
            resblocks: stack("resblocks", false)?,
            cross_attn: stack("cross_attn", true)?,
            ln_final: LayerNorm::new(m.width, vb.pp("ln_final"))?,
            text_projection: vb.get_with_hints(
                (m.width, tp.part(m.vocab_size)),
                "text_projection",
                normal((m.width as f64).powf(-0.5)),
            )?,
            context_length: m.context_length,
            tp: tp.clone(),
            grad_checkpointing: false,
        })
    }

    /// Generation needs whole-vocabulary logits, which a tensor-parallel member does not hold.
    pub(crate) fn single_only(&self, what: &str) -> Result<()> {
        if !self.tp.is_single() {
            bail!(
                "{what} needs the whole vocabulary's logits; it runs without tensor parallelism \
                 only (this model is member {} of {})",
                self.tp.rank(),
                self.tp.size()
            );
        }
        Ok(())
    }

    /// The final hidden states `[B, T, width]` (after `ln_final`), before the vocabulary
    /// projection.
    pub fn hidden(&self, image_embs: &Tensor, text_embs: &Tensor) -> Result<Tensor> {
        let t = text_embs.dim(1)?;
        if t > self.context_length {
            bail!(
                "decoder input has {t} tokens, more than its context length {}",
                self.context_length
            );
        }
        let mask = causal_mask(t, text_embs.device())?;
        let mut x = text_embs.clone();
        for (block, cross) in self.resblocks.iter().zip(&self.cross_attn) {
            x = block.forward_checkpointed(&x, Some(&mask), self.grad_checkpointing)?;
            x = cross.forward_cross_checkpointed(&x, image_embs, self.grad_checkpointing)?;
        }
        self.ln_final.forward(&x)
    }

    /// Vocabulary logits `[B, T, vocab]` for image tokens `[B, Q, width]` and text token
    /// embeddings `[B, T, width]`; this member's `[B, T, vocab / T]` columns under tensor
    /// parallelism.
    pub fn forward(&self, image_embs: &Tensor, text_embs: &Tensor) -> Result<Tensor> {
        let hidden = self.tp.copy_in(&self.hidden(image_embs, text_embs)?)?;
        // In the compute dtype, as autocast returns them; the losses compute in float32.
        matmul_last(
            &self.tp.autocast().cast(&hidden)?,
            &self.text_projection,
            None,
        )
    }

    /// Vocabulary logits `[B, vocab]` for the last position only (generation; degree 1 only).
    pub fn forward_last(&self, image_embs: &Tensor, text_embs: &Tensor) -> Result<Tensor> {
        self.single_only("generation")?;
        let hidden = self.hidden(image_embs, text_embs)?;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        widen(&self.tp.autocast().matmul(&last, &self.text_projection)?)
    }
}
