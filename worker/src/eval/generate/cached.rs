//! Decoding on a key/value cache: each step runs one new position per sequence through the
//! text tower and the decoder, on the [`DecodeWeights`] read by the row kernels of
//! [`super::kernels`].

use super::kernels::{attend, project, KvLayout, KvRows};
use super::weights::{BlockView, DecodeWeights};
use super::StepDecoder;
use crate::model::ops::gelu_erf_f32;
use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

impl BlockView<'_> {
    /// Adds the attention output for queries `q` over `kv` (cache rows `slots`) to `x`.
    fn attend_into(&self, x: &mut [f32], q: &[f32], kv: &KvRows, slots: &[usize]) -> Result<()> {
        let attended = attend(q, kv, self.heads, slots);
        add(x, &self.out_proj.apply(&attended)?);
        Ok(())
    }

    /// `x += c_proj(gelu(c_fc(ln_2(x))))`.
    fn mlp_into(&self, x: &mut [f32]) -> Result<()> {
        let hidden = gelu_erf_f32(&self.c_fc.apply(&self.ln_2.apply(x))?);
        add(x, &self.c_proj.apply(&hidden)?);
        Ok(())
    }

    /// The self-attention block for the new position `cache.len` of every row; its keys and
    /// values are appended to `cache` (one position more).
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
            layout: KvLayout::Interleaved,
        };
        let slots: Vec<usize> = (0..rows).collect();
        self.attend_into(x, &q, &kv, &slots)?;
        cache.len += 1;
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
            layout: KvLayout::HeadMajor,
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

    /// Row `r` becomes what row `sources[r]` was. Only the filled positions move (beam search
    /// reorders every step; the buffers hold the whole context).
    fn reorder(&mut self, sources: &[usize]) {
        let block = self.capacity * self.width;
        let used = self.len * self.width;
        if used == 0 {
            return;
        }
        for buffer in [&mut self.k, &mut self.v] {
            let mut kept = Vec::with_capacity(sources.len() * used);
            for &s in sources {
                kept.extend_from_slice(&buffer[s * block..][..used]);
            }
            for (r, row) in kept.chunks_exact(used).enumerate() {
                buffer[r * block..][..used].copy_from_slice(row);
            }
        }
    }
}

/// A cross-attention block's keys and values of the image tokens,
/// `[images, heads, tokens, head_dim]`.
struct ImageKv {
    k: Vec<f32>,
    v: Vec<f32>,
    tokens: usize,
}

/// Decoding on a key/value cache: the text tower's and the decoder's self-attention keys and
/// values of the prefix, and the cross-attention keys and values of the image tokens (computed
/// once per image). Each step runs only the new positions.
pub struct CachedDecoder<'w> {
    weights: &'w DecodeWeights<'w>,
    text_caches: Vec<SelfCache>,
    decoder_caches: Vec<SelfCache>,
    image_kv: Vec<ImageKv>,
    /// The image each sequence reads (beam search moves sequences between rows).
    image_rows: Vec<usize>,
    /// Width of both text stacks.
    width: usize,
    /// Positions cached so far.
    len: usize,
}

impl<'w> CachedDecoder<'w> {
    /// Decoding for image tokens `image_embs` `[images, Q, width]`, with `rows_per_image`
    /// sequences per image (beam search's beams): sequence `r` reads image `r / rows_per_image`.
    pub fn new(
        weights: &'w DecodeWeights<'w>,
        image_embs: &Tensor,
        rows_per_image: usize,
    ) -> Result<Self> {
        ensure!(
            rows_per_image > 0,
            "decoding needs at least one row per image"
        );
        let (images, _, image_width) = image_embs.dims3()?;
        let width = weights.width;
        ensure!(
            image_width == width,
            "decoding: image tokens of width {image_width} for text stacks of width {width}"
        );
        let rows = images * rows_per_image;
        let image_kv = weights
            .model
            .text_decoder
            .cross_attn
            .iter()
            .zip(&weights.decoder_blocks)
            .map(|(block, (_, view))| -> Result<ImageKv> {
                let (k, v) = block.cross_kv(image_embs)?;
                let (images, tokens, _) = k.dims3()?;
                // [images, tokens, width] → [images, heads, tokens, head_dim], in float32 (the
                // model's are bfloat16 under autocast; the decoding kernels read float32).
                let head_major = |t: Tensor| -> Result<Vec<f32>> {
                    let t = t.reshape((images, tokens, view.heads, width / view.heads))?;
                    let t = t.transpose(1, 2)?.to_dtype(DType::F32)?;
                    Ok(t.contiguous()?.flatten_all()?.to_vec1()?)
                };
                Ok(ImageKv {
                    tokens,
                    k: head_major(k)?,
                    v: head_major(v)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let cache = SelfCache::new(rows, weights.context_length, width);
        Ok(Self {
            weights,
            text_caches: vec![cache.clone(); weights.text_blocks.len()],
            decoder_caches: vec![cache; weights.decoder_blocks.len()],
            image_kv,
            image_rows: (0..rows).map(|r| r / rows_per_image).collect(),
            width,
            len: 0,
        })
    }

    /// Runs position `self.len` of every row (token `ids[r]`) through both stacks; returns the
    /// decoder's final hidden states `[rows, width]` (after `ln_final`).
    fn advance(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let (width, weights) = (self.width, self.weights);
        ensure!(
            self.len < weights.context_length,
            "text has {} tokens, more than the context length {}",
            self.len + 1,
            weights.context_length
        );
        let table = weights.token_embedding.as_slice();
        let vocab = table.len() / width;
        let position = &weights.positional_embedding.as_slice()[self.len * width..][..width];
        let mut x = Vec::with_capacity(ids.len() * width);
        for &id in ids {
            ensure!(
                (id as usize) < vocab,
                "token id {id} is outside the vocabulary of {vocab}"
            );
            let row = &table[id as usize * width..][..width];
            x.extend(row.iter().zip(position).map(|(t, p)| t + p));
        }
        for (block, cache) in weights.text_blocks.iter().zip(&mut self.text_caches) {
            block.forward_self(&mut x, cache)?;
        }
        for (((own, cross), cache), image) in weights
            .decoder_blocks
            .iter()
            .zip(&mut self.decoder_caches)
            .zip(&self.image_kv)
        {
            own.forward_self(&mut x, cache)?;
            cross.forward_cross(&mut x, image, &self.image_rows)?;
        }
        self.len += 1;
        Ok(weights.ln_final.apply(&x))
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
        project(&hidden, &self.weights.text_projection, self.width)
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
