//! Pre-LN residual blocks and the plain transformer stack (open_clip's
//! `ResidualAttentionBlock` and `Transformer`).

use super::attention::MultiheadAttention;
use super::config::mlp_width;
use super::grad_checkpoint::{checkpoint, Recomputable};
use super::layers::{LayerNorm, Mlp};
use crate::model::ops;
use crate::model::tensor_parallel::TensorParallel;
use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;

/// `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`; a cross-attention block also normalises its
/// keys/values with `ln_1_kv`.
#[derive(Debug, Clone)]
pub struct ResidualAttentionBlock {
    pub(crate) ln_1: LayerNorm,
    pub(crate) attn: MultiheadAttention,
    ln_1_kv: Option<LayerNorm>,
    pub(crate) ln_2: LayerNorm,
    pub(crate) mlp: Mlp,
}

/// Sizes shared by every block of one stack.
#[derive(Debug, Clone, Copy)]
pub struct BlockShape {
    pub width: usize,
    pub heads: usize,
    pub mlp_ratio: f64,
    /// Number of blocks in the stack (scales the output-projection init as open_clip does).
    pub layers: usize,
}

impl BlockShape {
    fn proj_std(&self) -> f64 {
        (self.width as f64).powf(-0.5) * (2.0 * self.layers as f64).powf(-0.5)
    }
}

impl ResidualAttentionBlock {
    /// Loads one block (this member's shards of its attention and MLP); `cross` adds
    /// `ln_1_kv` for attention over another sequence.
    pub fn new(
        shape: BlockShape,
        cross: bool,
        vb: VarBuilder,
        tp: &TensorParallel,
    ) -> Result<Self> {
        let w = shape.width;
        Ok(Self {
            ln_1: LayerNorm::new(w, vb.pp("ln_1"))?,
            attn: MultiheadAttention::new(w, w, shape.heads, shape.proj_std(), vb.pp("attn"), tp)?,
            ln_1_kv: if cross {
                Some(LayerNorm::new(w, vb.pp("ln_1_kv"))?)
            } else {
                None
            },
            ln_2: LayerNorm::new(w, vb.pp("ln_2"))?,
            mlp: Mlp::new(
                w,
                mlp_width(w, shape.mlp_ratio),
                shape.proj_std(),
                vb.pp("mlp"),
                tp,
            )?,
        })
    }

    /// Self-attention block.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with(x, |h| self.attn.forward_self(h, mask))
    }

    /// Cross-attention block: queries from `x`, keys and values from `kv`.
    pub fn forward_cross(&self, x: &Tensor, kv: &Tensor) -> Result<Tensor> {
        let kv = match &self.ln_1_kv {
            Some(ln) => ln.forward_operand(kv, &self.attn.tp)?,
            None => kv.clone(),
        };
        self.forward_with(x, |h| self.attn.forward_cross(h, &kv, None))
    }

    /// `x + attend(ln_1(x))`, then `x + mlp(ln_2(x))`: the block around its attention, which
    /// is the model's ([`Self::forward`], [`Self::forward_cross`]) or decoding's over a
    /// key/value cache. The norms' outputs are the products' operands and the branches'
    /// outputs join the float32 residual stream in [`ops::add_widened`], so under autocast
    /// neither keeps a float32 copy for the backward pass.
    pub(crate) fn forward_with(
        &self,
        x: &Tensor,
        attend: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let tp = &self.attn.tp;
        let x = ops::add_widened(x, &attend(&self.ln_1.forward_operand(x, tp)?)?)?;
        let branch = self.mlp.forward(&self.ln_2.forward_operand(&x, tp)?)?;
        ops::add_widened(&x, &branch)
    }
}

impl Recomputable for ResidualAttentionBlock {
    fn map_weights(&self, f: &mut dyn FnMut(&Tensor) -> Tensor) -> Self {
        Self {
            ln_1: self.ln_1.map_weights(f),
            attn: self.attn.map_weights(f),
            ln_1_kv: self.ln_1_kv.as_ref().map(|ln| ln.map_weights(f)),
            ln_2: self.ln_2.map_weights(f),
            mlp: self.mlp.map_weights(f),
        }
    }
}

impl ResidualAttentionBlock {
    /// [`Self::forward`]; with `recompute` its activations are not kept but recomputed in the
    /// backward pass (activation checkpointing, same gradients).
    pub fn forward_checkpointed(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        recompute: bool,
    ) -> Result<Tensor> {
        if !recompute {
            return self.forward(x, mask);
        }
        let mask = mask.cloned();
        checkpoint(self, x, None, move |block, x, _| {
            block.forward(x, mask.as_ref())
        })
    }

    /// [`Self::forward_cross`], recomputed in the backward pass with `recompute`.
    pub fn forward_cross_checkpointed(
        &self,
        x: &Tensor,
        kv: &Tensor,
        recompute: bool,
    ) -> Result<Tensor> {
        if !recompute {
            return self.forward_cross(x, kv);
        }
        checkpoint(self, x, Some(kv), |block, x, kv| match kv {
            Some(kv) => block.forward_cross(x, kv),
            None => bail!("a cross-attention block needs its keys and values"),
        })
    }

    /// The cross-attention keys and values `[B, S, width]` of `kv` (after `ln_1_kv`), computed
    /// once per image for decoding.
    pub fn cross_kv(&self, kv: &Tensor) -> Result<(Tensor, Tensor)> {
        match &self.ln_1_kv {
            Some(ln) => self.attn.cross_kv(&ln.forward_operand(kv, &self.attn.tp)?),
            None => self.attn.cross_kv(kv),
        }
    }
}

/// `resblocks.0 .. resblocks.{layers-1}` of self-attention blocks.
#[derive(Debug, Clone)]
pub struct Transformer {
    pub(crate) resblocks: Vec<ResidualAttentionBlock>,
    /// Recompute each block's activations in the backward pass instead of keeping them.
    pub(crate) grad_checkpointing: bool,
}

impl Transformer {
    /// Loads `{prefix}.resblocks.N` for every layer.
    pub fn new(shape: BlockShape, vb: VarBuilder, tp: &TensorParallel) -> Result<Self> {
        let vb = vb.pp("resblocks");
        let resblocks = (0..shape.layers)
            .map(|i| ResidualAttentionBlock::new(shape, false, vb.pp(i.to_string()), tp))
            .collect::<Result<_>>()?;
        Ok(Self {
            resblocks,
            grad_checkpointing: false,
        })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.resblocks {
            x = block.forward_checkpointed(&x, mask, self.grad_checkpointing)?;
        }
        Ok(x)
    }
}

/// An additive causal mask `[t, t]`: 0 on and below the diagonal, −∞ above.
pub fn causal_mask(t: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}
