//! The text tower: open_clip's `TextTransformer` with CoCa's appended cls token.

use super::autocast::widen;
use super::config::CocaConfig;
use super::layers::{normal, LayerNorm};
use super::transformer::{BlockShape, Transformer};
use crate::model::tensor_parallel::{vocab_parallel_embedding, TensorParallel};
use candle_core::{bail, DType, Result, Tensor};
use candle_nn::VarBuilder;

/// Token embedding, learned positions (context + 1 for the cls token), a causal transformer
/// with the cls/pad mask, `ln_final` on the cls output and `text_projection`.
///
/// Under tensor parallelism the token embedding is split by vocabulary (member `r` holds rows
/// `r·V/T ..`); the transformer's attentions and MLPs are split as in [`Transformer`].
#[derive(Debug, Clone)]
pub struct TextTower {
    /// This member's rows of the `[V, W]` table (all of it at degree 1).
    pub(crate) token_embedding: Tensor,
    pub(crate) positional_embedding: Tensor,
    cls_emb: Tensor,
    pub(crate) transformer: Transformer,
    ln_final: LayerNorm,
    text_projection: Tensor,
    pad_id: u32,
    correct_cls_mask: bool,
    pub(crate) context_length: usize,
    tp: TensorParallel,
}

/// What the text tower produces.
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// The contrastive embedding before normalisation, `[B, embed_dim]`.
    pub pooled: Tensor,
    /// Per-token outputs without the cls token and without `ln_final`, `[B, T, width]`.
    pub tokens: Tensor,
}

impl TextTower {
    /// Loads `text.*` (this tensor-parallel member's shards).
    pub fn new(cfg: &CocaConfig, vb: VarBuilder, tp: &TensorParallel) -> Result<Self> {
        let t = &cfg.text_cfg;
        let shape = BlockShape {
            width: t.width,
            heads: t.heads,
            mlp_ratio: t.mlp_ratio,
            layers: t.layers,
        };
        Ok(Self {
            token_embedding: vb.get_with_hints(
                (tp.part(t.vocab_size), t.width),
                "token_embedding.weight",
                normal(0.02),
            )?,
            positional_embedding: vb.get_with_hints(
                (t.context_length + 1, t.width),
                "positional_embedding",
                normal(0.01),
            )?,
            cls_emb: vb.get_with_hints(t.width, "cls_emb", normal(0.01))?,
            transformer: Transformer::new(shape, vb.pp("transformer"), tp)?,
            ln_final: LayerNorm::new(t.width, vb.pp("ln_final"))?,
            text_projection: vb.get_with_hints(
                (t.width, cfg.embed_dim),
                "text_projection",
                normal((t.width as f64).powf(-0.5)),
            )?,
            pad_id: t.pad_id,
            correct_cls_mask: t.correct_cls_mask,
            context_length: t.context_length,
            tp: tp.clone(),
        })
    }

    /// Embedding rows of the ids `[N]` (u32), from this member's vocabulary slice summed over
    /// the group under tensor parallelism.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        vocab_parallel_embedding(&self.token_embedding, ids, &self.tp)
    }

    /// Token ids `[B, T]` (T ≤ context length) → pooled embedding and token outputs.
    pub fn forward(&self, text: &Tensor) -> Result<TextOutput> {
        let (b, t) = text.dims2()?;
        if t > self.context_length {
            bail!(
                "text has {t} tokens, more than the context length {}",
                self.context_length
            );
        }
        let ids = text.to_dtype(DType::U32)?;
        let width = self.cls_emb.dim(0)?;
        let x = self.embed(&ids.flatten_all()?)?.reshape((b, t, width))?;
        let cls = self
            .cls_emb
            .reshape((1, 1, width))?
            .broadcast_as((b, 1, width))?;
        let x = Tensor::cat(&[&x, &cls], 1)?.broadcast_add(&self.positional_embedding.narrow(
            0,
            0,
            t + 1,
        )?)?;
        let mask = self.attention_mask(&ids)?;
        let x = self.transformer.forward(&x, Some(&mask))?;
        let pooled = self.ln_final.forward(&x.narrow(1, t, 1)?.squeeze(1)?)?;
        let pooled = widen(&self.tp.autocast().matmul(&pooled, &self.text_projection)?)?;
        Ok(TextOutput {
            pooled,
            tokens: x.narrow(1, 0, t)?,
        })
    }

    /// The additive `[B, T+1, T+1]` mask: causal, plus open_clip's cls/pad key mask.
    ///
    /// open_clip marks key `j` valid from `cat([1], text != pad)[j]` (legacy, shifted by one,
    /// which the released weights were trained with) or `cat(text != pad, [1])[j]` when
    /// `correct_cls_mask` is set.
    fn attention_mask(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let n = t + 1;
        let ids = ids.to_vec2::<u32>()?;
        let mut mask = vec![0f32; b * n * n];
        for (row, sample) in mask.chunks_mut(n * n).zip(&ids) {
            let valid: Vec<bool> = if self.correct_cls_mask {
                sample
                    .iter()
                    .map(|&id| id != self.pad_id)
                    .chain([true])
                    .collect()
            } else {
                [true]
                    .into_iter()
                    .chain(sample.iter().map(|&id| id != self.pad_id))
                    .collect()
            };
            for q in 0..n {
                for k in 0..n {
                    if k > q || !valid[k] {
                        row[q * n + k] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(mask, (b, n, n), self.cls_emb.device())
    }
}
