//! Decoding on a key/value cache: each step runs one new position per sequence through the
//! text tower and the decoder, on the weights read in place by the row kernels of
//! [`super::kernels`].

use super::kernels::{attend, linear, project, F32View, KvRows};
use super::StepDecoder;
use crate::model::layers::{LayerNorm, Linear, Mlp, LAYER_NORM_EPS};
use crate::model::ops::{gelu_erf_value, layer_norm_row};
use crate::model::transformer::ResidualAttentionBlock;
use crate::model::CoCa;
use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;

/// A layer norm's weight and bias.
struct NormView<'a> {
    weight: F32View<'a>,
    bias: F32View<'a>,
}

impl<'a> NormView<'a> {
    fn new(ln: &'a LayerNorm, name: &str) -> Result<Self> {
        Ok(Self {
            weight: F32View::new(&ln.weight, &format!("{name}.weight"))?,
            bias: F32View::new(&ln.bias, &format!("{name}.bias"))?,
        })
    }

    /// The normalised rows of `x` (`[rows, width]`).
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let (w, b) = (self.weight.as_slice(), self.bias.as_slice());
        let mut y = vec![0f32; x.len()];
        for (y, x) in y.chunks_mut(w.len()).zip(x.chunks(w.len())) {
            layer_norm_row(y, x, w, b, LAYER_NORM_EPS as f32);
        }
        y
    }
}

/// A linear map's weight `[out, in]` and bias `[out]`.
struct LinearView<'a> {
    weight: F32View<'a>,
    bias: F32View<'a>,
}

impl<'a> LinearView<'a> {
    fn new(linear: &'a Linear, name: &str) -> Result<Self> {
        let bias = linear
            .bias
            .as_ref()
            .with_context(|| format!("decoding: {name} has no bias"))?;
        Ok(Self {
            weight: F32View::new(&linear.weight, &format!("{name}.weight"))?,
            bias: F32View::new(bias, &format!("{name}.bias"))?,
        })
    }

    fn apply(&self, x: &[f32]) -> Result<Vec<f32>> {
        linear(x, &self.weight, self.bias.as_slice())
    }
}

/// One pre-LN block: `x += out(attention(q(ln_1(x))))`, then `x += mlp(ln_2(x))`.
struct BlockView<'a> {
    ln_1: NormView<'a>,
    /// Self-attention: the packed q/k/v projection; cross-attention: the q projection.
    in_proj: LinearView<'a>,
    out_proj: LinearView<'a>,
    heads: usize,
    ln_2: NormView<'a>,
    c_fc: LinearView<'a>,
    c_proj: LinearView<'a>,
}

impl<'a> BlockView<'a> {
    fn new(block: &'a ResidualAttentionBlock, name: &str, cross: bool) -> Result<Self> {
        let attn = &block.attn;
        let in_proj = match (&attn.in_proj, cross) {
            (_, true) => LinearView::new(&attn.q_proj, &format!("{name}.attn.q_proj"))?,
            (Some(packed), false) => LinearView::new(packed, &format!("{name}.attn.in_proj"))?,
            (None, false) => bail!("decoding: {name} is a self-attention without packed q/k/v"),
        };
        let Mlp { c_fc, c_proj, .. } = &block.mlp;
        Ok(Self {
            ln_1: NormView::new(&block.ln_1, &format!("{name}.ln_1"))?,
            in_proj,
            out_proj: LinearView::new(&attn.out_proj, &format!("{name}.attn.out_proj"))?,
            heads: attn.heads,
            ln_2: NormView::new(&block.ln_2, &format!("{name}.ln_2"))?,
            c_fc: LinearView::new(c_fc, &format!("{name}.mlp.c_fc"))?,
            c_proj: LinearView::new(c_proj, &format!("{name}.mlp.c_proj"))?,
        })
    }

    /// Weight elements read per step.
    fn elements(&self) -> usize {
        let linear = |l: &LinearView| l.weight.as_slice().len() + l.bias.as_slice().len();
        let norm = |n: &NormView| 2 * n.weight.as_slice().len();
        norm(&self.ln_1)
            + norm(&self.ln_2)
            + [&self.in_proj, &self.out_proj, &self.c_fc, &self.c_proj]
                .into_iter()
                .map(linear)
                .sum::<usize>()
    }

    /// Adds the attention output for queries `q` over `kv` (cache rows `slots`) to `x`.
    fn attend_into(&self, x: &mut [f32], q: &[f32], kv: &KvRows, slots: &[usize]) -> Result<()> {
        let attended = attend(q, kv, self.heads, slots);
        add(x, &self.out_proj.apply(&attended)?);
        Ok(())
    }

    /// `x += c_proj(gelu(c_fc(ln_2(x))))`.
    fn mlp_into(&self, x: &mut [f32]) -> Result<()> {
        let mut hidden = self.c_fc.apply(&self.ln_2.apply(x))?;
        hidden.iter_mut().for_each(|h| *h = gelu_erf_value(*h));
        add(x, &self.c_proj.apply(&hidden)?);
        Ok(())
    }

    /// The self-attention block for the new position `cache.len` of every row; its keys and
    /// values are appended to `cache`.
    fn forward_self(&self, x: &mut [f32], cache: &mut SelfCache) -> Result<()> {
        let width = cache.width;
        let rows = x.len() / width;
        let qkv = self.in_proj.apply(&self.ln_1.apply(x))?;
        let mut q = Vec::with_capacity(rows * width);
        for (r, qkv) in qkv.chunks(3 * width).enumerate() {
            q.extend_from_slice(&qkv[..width]);
            let at = (r * cache.capacity + cache.len) * width;
            cache.k[at..at + width].copy_from_slice(&qkv[width..2 * width]);
            cache.v[at..at + width].copy_from_slice(&qkv[2 * width..]);
        }
        let kv = KvRows {
            k: &cache.k,
            v: &cache.v,
            capacity: cache.capacity,
            len: cache.len + 1,
        };
        let slots: Vec<usize> = (0..rows).collect();
        self.attend_into(x, &q, &kv, &slots)?;
        self.mlp_into(x)
    }

    /// The cross-attention block over the image keys and values `image` (cache rows `slots`).
    fn forward_cross(&self, x: &mut [f32], image: &ImageKv, slots: &[usize]) -> Result<()> {
        let q = self.in_proj.apply(&self.ln_1.apply(x))?;
        let kv = KvRows {
            k: &image.k,
            v: &image.v,
            capacity: image.tokens,
            len: image.tokens,
        };
        self.attend_into(x, &q, &kv, slots)?;
        self.mlp_into(x)
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

/// Keys and values `[rows, capacity, width]` of a self-attention block; positions `..len` filled.
#[derive(Clone)]
struct SelfCache {
    k: Vec<f32>,
    v: Vec<f32>,
    width: usize,
    capacity: usize,
    len: usize,
}

impl SelfCache {
    fn new(rows: usize, capacity: usize, width: usize) -> Self {
        Self {
            k: vec![0f32; rows * capacity * width],
            v: vec![0f32; rows * capacity * width],
            width,
            capacity,
            len: 0,
        }
    }

    /// Row `r` becomes what row `sources[r]` was.
    fn reorder(&mut self, sources: &[usize]) {
        let block = self.capacity * self.width;
        let used = self.len * self.width;
        for buffer in [&mut self.k, &mut self.v] {
            let old = buffer.clone();
            for (r, &s) in sources.iter().enumerate() {
                buffer[r * block..r * block + used]
                    .copy_from_slice(&old[s * block..s * block + used]);
            }
        }
    }
}

/// A cross-attention block's keys and values of the image tokens, `[images, tokens, width]`.
struct ImageKv {
    k: Vec<f32>,
    v: Vec<f32>,
    tokens: usize,
}

/// Decoding on a key/value cache: the text tower's and the decoder's self-attention keys and
/// values of the prefix, and the cross-attention keys and values of the image tokens (computed
/// once). Each step runs only the new positions.
pub struct CachedDecoder<'a> {
    token_embedding: F32View<'a>,
    positional_embedding: F32View<'a>,
    text_blocks: Vec<BlockView<'a>>,
    decoder_blocks: Vec<(BlockView<'a>, BlockView<'a>)>,
    ln_final: NormView<'a>,
    text_projection: F32View<'a>,
    text_caches: Vec<SelfCache>,
    decoder_caches: Vec<SelfCache>,
    image_kv: Vec<ImageKv>,
    /// The image each sequence reads (beam search moves sequences between rows).
    image_rows: Vec<usize>,
    width: usize,
    /// Positions cached so far.
    len: usize,
}

impl<'a> CachedDecoder<'a> {
    /// Decoding for image tokens `image_embs` `[images, Q, width]`, with `rows_per_image`
    /// sequences per image (beam search's beams): sequence `r` reads image `r / rows_per_image`.
    pub fn new(model: &'a CoCa, image_embs: &Tensor, rows_per_image: usize) -> Result<Self> {
        let text = &model.text;
        let decoder = &model.text_decoder;
        ensure!(
            decoder.tp.is_single(),
            "generation needs the whole vocabulary's logits; it runs without tensor parallelism \
             only (this model is member {} of {})",
            decoder.tp.rank(),
            decoder.tp.size()
        );
        ensure!(
            rows_per_image > 0,
            "decoding needs at least one row per image"
        );
        let (images, _, width) = image_embs.dims3()?;
        let rows = images * rows_per_image;
        let capacity = text.context_length.min(decoder.context_length);
        let text_blocks = text
            .transformer
            .resblocks
            .iter()
            .enumerate()
            .map(|(i, b)| BlockView::new(b, &format!("text.transformer.resblocks.{i}"), false))
            .collect::<Result<Vec<_>>>()?;
        let decoder_blocks = decoder
            .resblocks
            .iter()
            .zip(&decoder.cross_attn)
            .enumerate()
            .map(|(i, (s, c))| -> Result<_> {
                Ok((
                    BlockView::new(s, &format!("text_decoder.resblocks.{i}"), false)?,
                    BlockView::new(c, &format!("text_decoder.cross_attn.{i}"), true)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let image_kv = decoder
            .cross_attn
            .iter()
            .map(|block| -> Result<ImageKv> {
                let (k, v) = block.cross_kv(image_embs)?;
                Ok(ImageKv {
                    tokens: k.dim(1)?,
                    k: k.flatten_all()?.to_vec1()?,
                    v: v.flatten_all()?.to_vec1()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: F32View::new(&text.token_embedding, "text.token_embedding.weight")?,
            positional_embedding: F32View::new(
                &text.positional_embedding,
                "text.positional_embedding",
            )?,
            text_caches: vec![SelfCache::new(rows, capacity, width); text_blocks.len()],
            decoder_caches: vec![SelfCache::new(rows, capacity, width); decoder_blocks.len()],
            text_blocks,
            decoder_blocks,
            ln_final: NormView::new(&decoder.ln_final, "text_decoder.ln_final")?,
            text_projection: F32View::new(
                &decoder.text_projection,
                "text_decoder.text_projection",
            )?,
            image_kv,
            image_rows: (0..rows).map(|r| r / rows_per_image).collect(),
            width,
            len: 0,
        })
    }

    /// Bytes of weights a step reads (every matrix of both stacks once, whatever the rows):
    /// what bounds a step's time from below on a machine of a given memory bandwidth.
    pub fn weight_bytes_per_step(&self) -> usize {
        let blocks: usize = self
            .text_blocks
            .iter()
            .chain(self.decoder_blocks.iter().flat_map(|(s, c)| [s, c]))
            .map(BlockView::elements)
            .sum();
        let rest =
            2 * self.ln_final.weight.as_slice().len() + self.text_projection.as_slice().len();
        (blocks + rest) * std::mem::size_of::<f32>()
    }

    /// Runs position `self.len` of every row (token `ids[r]`) through both stacks; returns the
    /// decoder's final hidden states `[rows, width]` (after `ln_final`).
    fn advance(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let width = self.width;
        let capacity = self.text_caches.first().map_or(0, |c| c.capacity);
        ensure!(
            self.len < capacity,
            "text has {} tokens, more than the context length {capacity}",
            self.len + 1
        );
        let table = self.token_embedding.as_slice();
        let vocab = table.len() / width;
        let position = &self.positional_embedding.as_slice()[self.len * width..][..width];
        let mut x = Vec::with_capacity(ids.len() * width);
        for &id in ids {
            ensure!(
                (id as usize) < vocab,
                "token id {id} is outside the vocabulary of {vocab}"
            );
            let row = &table[id as usize * width..][..width];
            x.extend(row.iter().zip(position).map(|(t, p)| t + p));
        }
        for (block, cache) in self.text_blocks.iter().zip(&mut self.text_caches) {
            block.forward_self(&mut x, cache)?;
            cache.len += 1;
        }
        for (((own, cross), cache), image) in self
            .decoder_blocks
            .iter()
            .zip(&mut self.decoder_caches)
            .zip(&self.image_kv)
        {
            own.forward_self(&mut x, cache)?;
            cache.len += 1;
            cross.forward_cross(&mut x, image, &self.image_rows)?;
        }
        self.len += 1;
        Ok(self.ln_final.apply(&x))
    }
}

impl StepDecoder for CachedDecoder<'_> {
    fn next_logits(&mut self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let t = seqs.first().map_or(0, Vec::len);
        ensure!(
            seqs.len() == self.image_rows.len(),
            "decoding: {} sequences for {} image rows",
            seqs.len(),
            self.image_rows.len()
        );
        ensure!(
            t > self.len && seqs.iter().all(|s| s.len() == t),
            "decoding rows must have one length, longer than the cached {}",
            self.len
        );
        let mut hidden = Vec::new();
        while self.len < t {
            let ids: Vec<u32> = seqs.iter().map(|s| s[self.len]).collect();
            hidden = self.advance(&ids)?;
        }
        project(&hidden, &self.text_projection, self.width)
    }

    fn reorder(&mut self, sources: &[usize]) -> Result<()> {
        ensure!(
            sources.len() == self.image_rows.len()
                && sources.iter().all(|&s| s < self.image_rows.len()),
            "decoding: a reorder of {} rows names rows outside 0..{}",
            sources.len(),
            self.image_rows.len()
        );
        if sources.iter().enumerate().all(|(i, &s)| i == s) {
            return Ok(());
        }
        for cache in self.text_caches.iter_mut().chain(&mut self.decoder_caches) {
            cache.reorder(sources);
        }
        self.image_rows = sources.iter().map(|&s| self.image_rows[s]).collect();
        Ok(())
    }
}
