//! The image tower: open_clip's `VisionTransformer` with an attentional pooler, as CoCa uses it.

use super::autocast::{widen, Autocast};
use super::config::CocaConfig;
use super::layers::{normal, LayerNorm, Linear};
use super::pooler::AttentionalPooler;
use super::transformer::{BlockShape, Transformer};
use crate::model::tensor_parallel::TensorParallel;
use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;

/// Patch embedding (`conv1`, no bias), class token, learned positions, `ln_pre`, the transformer,
/// the attentional pooler, `ln_post` over the pooled tokens, and `proj` for the contrastive one.
#[derive(Debug, Clone)]
pub struct VisionTower {
    /// `conv1.weight` `[width, 3, p, p]` as a linear map of flattened patches (`[width,
    /// 3·p·p]`): a frozen model's then multiplies like every other frozen weight.
    conv1: Linear,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    transformer: Transformer,
    attn_pool: AttentionalPooler,
    ln_post: LayerNorm,
    proj: Tensor,
    patch_size: usize,
    image_size: usize,
    autocast: Autocast,
}

/// What the image tower produces.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// The contrastive embedding before normalisation, `[B, embed_dim]`.
    pub pooled: Tensor,
    /// The image tokens the decoder attends to, `[B, n_queries - 1, embed_dim]`.
    pub tokens: Tensor,
}

impl VisionTower {
    /// Loads `visual.*` (this tensor-parallel member's shards).
    pub fn new(cfg: &CocaConfig, vb: VarBuilder, tp: &TensorParallel) -> Result<Self> {
        let v = &cfg.vision_cfg;
        let grid = v.image_size / v.patch_size;
        let scale = (v.width as f64).powf(-0.5);
        let conv_std = (3.0 * (v.patch_size * v.patch_size) as f64).powf(-0.5);
        let shape = BlockShape {
            width: v.width,
            heads: cfg.vision_heads(),
            mlp_ratio: v.mlp_ratio,
            layers: v.layers,
        };
        let e = cfg.embed_dim;
        let conv1 = vb.get_with_hints(
            (v.width, 3, v.patch_size, v.patch_size),
            "conv1.weight",
            normal(conv_std),
        )?;
        Ok(Self {
            conv1: Linear::from_parts(
                conv1.reshape((v.width, 3 * v.patch_size * v.patch_size))?,
                None,
            ),
            class_embedding: vb.get_with_hints(v.width, "class_embedding", normal(scale))?,
            positional_embedding: vb.get_with_hints(
                (grid * grid + 1, v.width),
                "positional_embedding",
                normal(scale),
            )?,
            ln_pre: LayerNorm::new(v.width, vb.pp("ln_pre"))?,
            transformer: Transformer::new(shape, vb.pp("transformer"), tp)?,
            attn_pool: AttentionalPooler::new(
                e,
                v.width,
                v.attn_pooler_heads,
                v.attn_pooler_queries,
                vb.pp("attn_pool"),
                tp,
            )?,
            ln_post: LayerNorm::new(e, vb.pp("ln_post"))?,
            proj: vb.get_with_hints((e, e), "proj", normal(scale))?,
            patch_size: v.patch_size,
            image_size: v.image_size,
            autocast: tp.autocast(),
        })
    }

    /// Recompute the transformer's activations in the backward pass instead of keeping them.
    pub fn set_grad_checkpointing(&mut self, on: bool) {
        self.transformer.grad_checkpointing = on;
    }

    /// `[B, 3, S, S]` normalised pixels → pooled embedding and decoder tokens.
    pub fn forward(&self, images: &Tensor) -> Result<VisionOutput> {
        let x = self
            .ln_post
            .forward(&self.attn_pool.forward(&self.encode_tokens(images)?)?)?;
        let n = x.dim(1)?;
        let pooled = self.project(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        let tokens = x.narrow(1, 1, n - 1)?;
        Ok(VisionOutput { pooled, tokens })
    }

    /// [`VisionOutput::pooled`] alone, for embedding: the pooler runs its first query only
    /// (the contrastive one; the others become the decoder's tokens), which saves the
    /// pooler's products for the other queries — about 3 % of a B-32 image's arithmetic.
    pub fn forward_pooled(&self, images: &Tensor) -> Result<Tensor> {
        let x = self
            .attn_pool
            .forward_first(&self.encode_tokens(images)?, 1)?;
        self.project(&self.ln_post.forward(&x)?.squeeze(1)?)
    }

    /// The contrastive projection of the pooled token, float32.
    fn project(&self, pooled: &Tensor) -> Result<Tensor> {
        widen(&self.autocast.matmul(pooled, &self.proj)?)
    }

    /// The transformer's output tokens `[B, 1 + patches, width]` for `images`.
    fn encode_tokens(&self, images: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        if c != 3 || h != self.image_size || w != self.image_size {
            bail!(
                "images must be [B, 3, {s}, {s}], got {:?}",
                images.dims(),
                s = self.image_size
            );
        }
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let width = self.conv1.weight.dim(0)?;
        // The stride-p convolution as one matrix product over flattened patches.
        let patches = images
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let x = widen(&self.conv1.forward(&self.autocast.cast(&patches)?)?)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, width))?
            .broadcast_as((b, 1, width))?;
        let x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.positional_embedding)?;
        let x = self.ln_pre.forward(&x)?;
        self.transformer.forward(&x, None)
    }
}
