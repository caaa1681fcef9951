//! The weights a decoding step reads: the text tower's and the decoder's, viewed in place
//! (float32) or with their matrices copied to bfloat16. Built once, they serve every batch.

use super::kernels::{linear, F32View, Matrix};
use crate::model::layers::{LayerNorm, Linear, Mlp, LAYER_NORM_EPS};
use crate::model::ops::layer_norm_row;
use crate::model::transformer::ResidualAttentionBlock;
use crate::model::CoCa;
use anyhow::{bail, Context, Result};
use std::str::FromStr;

/// How the matrices read at every decoding step are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodePrecision {
    /// The model's float32 weights, read in place: the logits of the model's forward pass.
    #[default]
    F32,
    /// A bfloat16 copy of the text tower's and decoder's matrices: half the bytes per step, and
    /// decoding is bound by reading them. Sums, activations, layer norms, biases and the image
    /// keys/values stay float32; captions can differ from float32's.
    Bf16,
}

impl FromStr for DecodePrecision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fp32" | "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(format!(
                "unknown decode precision {s:?}: expected fp32 or bf16"
            )),
        }
    }
}

/// A layer norm's weight and bias.
pub(super) struct NormView<'a> {
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
    pub(super) fn apply(&self, x: &[f32]) -> Vec<f32> {
        let (w, b) = (self.weight.as_slice(), self.bias.as_slice());
        let mut y = vec![0f32; x.len()];
        for (y, x) in y.chunks_mut(w.len()).zip(x.chunks(w.len())) {
            layer_norm_row(y, x, w, b, LAYER_NORM_EPS as f32);
        }
        y
    }

    fn bytes(&self) -> usize {
        2 * std::mem::size_of_val(self.weight.as_slice())
    }
}

/// The matrix of `tensor` in `precision`.
fn matrix<'a>(
    tensor: &'a candle_core::Tensor,
    name: &str,
    precision: DecodePrecision,
) -> Result<Matrix<'a>> {
    let view = F32View::new(tensor, name)?;
    Ok(match precision {
        DecodePrecision::F32 => Matrix::F32(view),
        DecodePrecision::Bf16 => Matrix::bf16_of(&view),
    })
}

/// A linear map's weight `[out, in]` and bias `[out]`.
pub(super) struct LinearView<'a> {
    weight: Matrix<'a>,
    bias: F32View<'a>,
}

impl<'a> LinearView<'a> {
    fn new(linear: &'a Linear, name: &str, precision: DecodePrecision) -> Result<Self> {
        let bias = linear
            .bias
            .as_ref()
            .with_context(|| format!("decoding: {name} has no bias"))?;
        Ok(Self {
            weight: matrix(&linear.weight, &format!("{name}.weight"), precision)?,
            bias: F32View::new(bias, &format!("{name}.bias"))?,
        })
    }

    pub(super) fn apply(&self, x: &[f32]) -> Result<Vec<f32>> {
        linear(x, &self.weight, self.bias.as_slice())
    }

    fn bytes(&self) -> usize {
        self.weight.bytes() + std::mem::size_of_val(self.bias.as_slice())
    }
}

/// One pre-LN block: `x += out(attention(q(ln_1(x))))`, then `x += c_proj(gelu(c_fc(ln_2(x))))`.
pub(super) struct BlockView<'a> {
    pub(super) ln_1: NormView<'a>,
    /// Self-attention: the packed q/k/v projection; cross-attention: the q projection.
    pub(super) in_proj: LinearView<'a>,
    pub(super) out_proj: LinearView<'a>,
    pub(super) heads: usize,
    pub(super) ln_2: NormView<'a>,
    pub(super) c_fc: LinearView<'a>,
    pub(super) c_proj: LinearView<'a>,
}

impl<'a> BlockView<'a> {
    fn new(
        block: &'a ResidualAttentionBlock,
        name: &str,
        cross: bool,
        precision: DecodePrecision,
    ) -> Result<Self> {
        let attn = &block.attn;
        let linear =
            |l: &'a Linear, part: &str| LinearView::new(l, &format!("{name}.{part}"), precision);
        let in_proj = match (&attn.in_proj, cross) {
            (_, true) => linear(&attn.q_proj, "attn.q_proj")?,
            (Some(packed), false) => linear(packed, "attn.in_proj")?,
            (None, false) => bail!("decoding: {name} is a self-attention without packed q/k/v"),
        };
        let Mlp { c_fc, c_proj, .. } = &block.mlp;
        Ok(Self {
            ln_1: NormView::new(&block.ln_1, &format!("{name}.ln_1"))?,
            in_proj,
            out_proj: linear(&attn.out_proj, "attn.out_proj")?,
            heads: attn.heads,
            ln_2: NormView::new(&block.ln_2, &format!("{name}.ln_2"))?,
            c_fc: linear(c_fc, "mlp.c_fc")?,
            c_proj: linear(c_proj, "mlp.c_proj")?,
        })
    }

    fn bytes(&self) -> usize {
        self.ln_1.bytes()
            + self.ln_2.bytes()
            + [&self.in_proj, &self.out_proj, &self.c_fc, &self.c_proj]
                .into_iter()
                .map(LinearView::bytes)
                .sum::<usize>()
    }
}

/// The text tower's and the decoder's weights as decoding reads them.
///
/// Float32 views hold read locks on the model's tensors while they live: build them for a run
/// of generation, not across training steps.
pub struct DecodeWeights<'m> {
    pub(super) model: &'m CoCa,
    pub(super) token_embedding: F32View<'m>,
    pub(super) positional_embedding: F32View<'m>,
    pub(super) text_blocks: Vec<BlockView<'m>>,
    /// Per decoder layer: its self-attention block and its cross-attention block.
    pub(super) decoder_blocks: Vec<(BlockView<'m>, BlockView<'m>)>,
    pub(super) ln_final: NormView<'m>,
    /// The vocabulary projection `[width, vocab]`.
    pub(super) text_projection: Matrix<'m>,
    /// Positions both stacks take.
    pub(super) context_length: usize,
    /// Width of both stacks (the decoder reads the text tower's token outputs).
    pub(super) width: usize,
}

impl<'m> DecodeWeights<'m> {
    /// The decoding weights of `model`, which must hold the whole vocabulary (no tensor
    /// parallelism).
    pub fn new(model: &'m CoCa, precision: DecodePrecision) -> Result<Self> {
        let text = &model.text;
        let decoder = &model.text_decoder;
        decoder.single_only("generation")?;
        let text_blocks = text
            .transformer
            .resblocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                BlockView::new(
                    b,
                    &format!("text.transformer.resblocks.{i}"),
                    false,
                    precision,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder_blocks = decoder
            .resblocks
            .iter()
            .zip(&decoder.cross_attn)
            .enumerate()
            .map(|(i, (own, cross))| -> Result<_> {
                Ok((
                    BlockView::new(
                        own,
                        &format!("text_decoder.resblocks.{i}"),
                        false,
                        precision,
                    )?,
                    BlockView::new(
                        cross,
                        &format!("text_decoder.cross_attn.{i}"),
                        true,
                        precision,
                    )?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model,
            token_embedding: F32View::new(&text.token_embedding, "text.token_embedding.weight")?,
            positional_embedding: F32View::new(
                &text.positional_embedding,
                "text.positional_embedding",
            )?,
            text_blocks,
            decoder_blocks,
            ln_final: NormView::new(&decoder.ln_final, "text_decoder.ln_final")?,
            text_projection: matrix(
                &decoder.text_projection,
                "text_decoder.text_projection",
                precision,
            )?,
            context_length: text.context_length.min(decoder.context_length),
            width: text.positional_embedding.dim(1)?,
        })
    }

    /// Moves the matrices onto huge pages ([`crate::huge_pages`]). Every step streams every
    /// matrix, and on 2 MiB pages the steps run about 25 % faster here. The move copies the
    /// matrices the first time in a process (0.5–1.5 s for `coca_ViT-B-32` here, about what 15
    /// batches of decoding save), so it pays for long runs, not for one caption. Where the
    /// kernel declines, the weights stay as they are (logged at debug level).
    pub fn move_to_huge_pages(&self) {
        let refused = self
            .matrices()
            .filter_map(|m| m.advise_huge_pages().err())
            .last();
        if let Some(error) = refused {
            tracing::debug!(%error, "decoding weights stay on the pages they have");
        }
    }

    /// Every matrix a step multiplies by.
    fn matrices(&self) -> impl Iterator<Item = &Matrix<'m>> {
        self.blocks()
            .flat_map(|b| [&b.in_proj, &b.out_proj, &b.c_fc, &b.c_proj].map(|l| &l.weight))
            .chain([&self.text_projection])
    }

    /// Both stacks' blocks, in step order.
    fn blocks(&self) -> impl Iterator<Item = &BlockView<'m>> {
        let decoder = self.decoder_blocks.iter().flat_map(|(s, c)| [s, c]);
        self.text_blocks.iter().chain(decoder)
    }

    /// The model the weights belong to.
    pub fn model(&self) -> &'m CoCa {
        self.model
    }

    /// Bytes of weights a step reads (every matrix of both stacks once, whatever the rows):
    /// what bounds a step's time from below on a machine of a given memory bandwidth.
    pub fn bytes_per_step(&self) -> usize {
        let blocks: usize = self.blocks().map(BlockView::bytes).sum();
        blocks + self.ln_final.bytes() + self.text_projection.bytes()
    }
}
