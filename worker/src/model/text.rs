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
        let mask = text_attention_mask(&ids, self.pad_id, self.correct_cls_mask)?;
        let x = self.transformer.forward(&x, Some(&mask))?;
        let pooled = self.ln_final.forward(&x.narrow(1, t, 1)?.squeeze(1)?)?;
        let pooled = widen(&self.tp.autocast().matmul(&pooled, &self.text_projection)?)?;
        Ok(TextOutput {
            pooled,
            tokens: x.narrow(1, 0, t)?,
        })
    }
}

/// The additive `[B, T+1, T+1]` attention mask of token ids `[B, T]`: causal, plus open_clip's
/// cls/pad key mask. Built where the ids are, from tensor ops (a GPU step reads nothing back to
/// the host for it).
///
/// open_clip marks key `j` valid from `cat([1], text != pad)[j]` (legacy, shifted by one,
/// which the released weights were trained with) or `cat(text != pad, [1])[j]` when
/// `correct_cls_mask` is set.
fn text_attention_mask(ids: &Tensor, pad_id: u32, correct_cls_mask: bool) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let n = t + 1;
    let device = ids.device();
    let tokens = ids.ne(pad_id)?;
    let cls = Tensor::ones((b, 1), DType::U8, device)?;
    let keys = if correct_cls_mask {
        Tensor::cat(&[&tokens, &cls], 1)?
    } else {
        Tensor::cat(&[&cls, &tokens], 1)?
    };
    let position = Tensor::arange(0u32, n as u32, device)?;
    // Query q may see key k ≤ q.
    let causal = position
        .unsqueeze(1)?
        .broadcast_ge(&position.unsqueeze(0)?)?
        .unsqueeze(0)?;
    let allowed = causal.broadcast_mul(&keys.unsqueeze(1)?)?;
    let open = Tensor::zeros((b, n, n), DType::F32, device)?;
    let closed = Tensor::full(f32::NEG_INFINITY, (b, n, n), device)?;
    allowed.where_cond(&open, &closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// open_clip's rule written out: query q sees key k when k ≤ q and the key is valid.
    fn by_the_rule(ids: &[[u32; 3]], pad: u32, correct_cls_mask: bool) -> Vec<Vec<Vec<f32>>> {
        ids.iter()
            .map(|sample| {
                let tokens = sample.iter().map(|&id| id != pad);
                let valid: Vec<bool> = if correct_cls_mask {
                    tokens.chain([true]).collect()
                } else {
                    [true].into_iter().chain(tokens).collect()
                };
                (0..4)
                    .map(|q| {
                        (0..4)
                            .map(|k| {
                                if k <= q && valid[k] {
                                    0.0
                                } else {
                                    f32::NEG_INFINITY
                                }
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_mask_is_causal_and_hides_padding_keys_in_both_cls_conventions() {
        let ids = [[5u32, 7, 0], [9, 0, 0]];
        let t = Tensor::new(&ids, &Device::Cpu).unwrap();
        for correct in [false, true] {
            let got = text_attention_mask(&t, 0, correct)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap();
            assert_eq!(
                got,
                by_the_rule(&ids, 0, correct),
                "correct_cls_mask {correct}"
            );
        }
        // The rule itself is open_clip's legacy shift: the cls key (the last) takes the validity
        // of the last token, padding in the first sample.
        let legacy = text_attention_mask(&t, 0, false).unwrap();
        let last = legacy.to_vec3::<f32>().unwrap()[0][3][3];
        assert_eq!(last, f32::NEG_INFINITY);
    }
}
