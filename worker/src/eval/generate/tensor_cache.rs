//! Decoding on a key/value cache of tensors: each step runs only the new positions of every
//! sequence through the text tower and the decoder, with the model's own layers on the model's
//! device and dtype. This is what generation runs where the row kernels of `cached.rs` cannot
//! (any device but the CPU, weights other than float32, or the portable ops forced).

use super::{prefix_tensor, repeat_rows, StepDecoder};
use crate::model::transformer::ResidualAttentionBlock;
use crate::model::CoCa;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

/// Keys and values `[rows, heads, positions, head_dim]` of one attention.
type Kv = (Tensor, Tensor);

/// Next-token logits from a key/value cache held as tensors (see the module docs).
pub struct TensorCacheDecoder<'m> {
    model: &'m CoCa,
    /// Per text-tower block, then per decoder self-attention block: the keys and values of
    /// the positions so far (`None` before the first step).
    self_kv: Vec<Option<Kv>>,
    /// Per cross-attention block: the image tokens' keys and values, computed once.
    image_kv: Vec<Kv>,
    /// Positions in the cache.
    len: usize,
}

impl<'m> TensorCacheDecoder<'m> {
    /// Decoding for image tokens `image_embs` `[B, Q, width]` with `rows_per_image`
    /// consecutive sequences per image (beam search's beams).
    pub fn new(model: &'m CoCa, image_embs: &Tensor, rows_per_image: usize) -> Result<Self> {
        let decoder = &model.text_decoder;
        decoder.single_only("generation")?;
        let image_embs = repeat_rows(image_embs, rows_per_image)?;
        let image_kv = decoder
            .cross_attn
            .iter()
            .map(|block| -> Result<Kv> {
                let (k, v) = block.cross_kv(&image_embs)?;
                Ok((block.attn.split_heads(&k)?, block.attn.split_heads(&v)?))
            })
            .collect::<Result<_>>()?;
        let blocks = model.text.transformer.resblocks.len() + decoder.resblocks.len();
        Ok(Self {
            model,
            self_kv: vec![None; blocks],
            image_kv,
            len: 0,
        })
    }

    /// The additive mask `[m, len + m]` of `m` new positions after `len` cached ones: each
    /// sees the cache and the new positions up to itself. None for one new position.
    fn mask(&self, m: usize, device: &Device) -> Result<Option<Tensor>> {
        if m == 1 {
            return Ok(None);
        }
        let keys = self.len + m;
        let mask: Vec<f32> = (0..m)
            .flat_map(|i| {
                (0..keys).map(move |j| match j > self.len + i {
                    true => f32::NEG_INFINITY,
                    false => 0.0,
                })
            })
            .collect();
        Ok(Some(Tensor::from_vec(mask, (m, keys), device)?))
    }
}

/// One self-attention block over the new positions `x` `[rows, m, width]`, whose keys and
/// values join `cache`.
fn self_block(
    block: &ResidualAttentionBlock,
    x: &Tensor,
    cache: &mut Option<Kv>,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    block.forward_with(x, |h| {
        let (q, k, v) = block.attn.self_qkv(h)?;
        let (k, v) = match cache.take() {
            Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
            None => (k, v),
        };
        let out = block.attn.attend(&q, &k, &v, mask);
        *cache = Some((k, v));
        out
    })
}

impl StepDecoder for TensorCacheDecoder<'_> {
    fn next_logits(&mut self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let (text, decoder) = (&self.model.text, &self.model.text_decoder);
        let device = text.token_embedding.device();
        let new = prefix_tensor(seqs, self.len, device)?;
        let (rows, m) = new.dims2()?;
        let context = text.context_length.min(decoder.context_length);
        ensure!(
            self.len + m <= context,
            "decoding past the context length {context}"
        );
        let width = text.positional_embedding.dim(1)?;
        let mut x = text
            .token_embedding
            .index_select(&new.flatten_all()?, 0)?
            .reshape((rows, m, width))?
            .broadcast_add(&text.positional_embedding.narrow(0, self.len, m)?)?;
        let mask = self.mask(m, device)?;
        let (text_kv, decoder_kv) = self.self_kv.split_at_mut(text.transformer.resblocks.len());
        for (block, cache) in text.transformer.resblocks.iter().zip(text_kv) {
            x = self_block(block, &x, cache, mask.as_ref())?;
        }
        let layers = decoder.resblocks.iter().zip(&decoder.cross_attn);
        for ((own, cross), (cache, (k, v))) in layers.zip(decoder_kv.iter_mut().zip(&self.image_kv))
        {
            x = self_block(own, &x, cache, mask.as_ref())?;
            x = cross.forward_with(&x, |h| {
                let q = cross.attn.split_heads(&cross.attn.q_proj.forward(h)?)?;
                cross.attn.attend(&q, k, v, None)
            })?;
        }
        self.len += m;
        let last = decoder
            .ln_final
            .forward(&x.narrow(1, m - 1, 1)?.squeeze(1)?)?;
        let logits = last.matmul(&decoder.text_projection)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }

    fn reorder(&mut self, sources: &[usize]) -> Result<()> {
        let Some(Some((k, _))) = self.self_kv.first() else {
            return Ok(());
        };
        let idx: Vec<u32> = sources.iter().map(|&s| s as u32).collect();
        let idx = Tensor::from_vec(idx, sources.len(), k.device())?;
        for (k, v) in self.self_kv.iter_mut().flatten() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        Ok(())
    }
}
