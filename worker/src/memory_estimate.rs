//! A worker's memory for training (host memory for a CPU worker, device memory for a GPU
//! worker), estimated from the config and the layout before anything is allocated, so that
//! `coca-launch` can refuse a layout that cannot fit the node, and a GPU worker one that cannot
//! fit its card.
//!
//! The buffers follow the trainer's accounting ([`crate::train::trainer::TrainerMemory`],
//! measured by `coca-worker bench-memory`): the flat parameter buffer (the model's variables
//! are views of it), the kept gradients (÷ sharding under stage 2), the gradient each backward
//! pass holds in full before it is reduced ([`crate::train::flat::FlatParams::accumulate_grads`]
//! adds it to the flat buffer in place, without a second copy), and the AdamW moments
//! (÷ sharding under stage 1 and 2); all of one tensor-parallel member's shards. Activations
//! are an estimate of what the autograd graph keeps (documented at [`activation_bytes`]), with
//! or without activation checkpointing. The backward pass frees each activation once its
//! gradient is passed on while the full gradient grows (`Tensor::backward_freeing`, the
//! candle-core patch), so the total counts the larger of the two, not both.
//!
//! `coca-worker bench-memory --batch N` measures a one-process step's peak resident bytes
//! beside this estimate (the README has the figures).

use crate::model::manifest::parameter_shapes_for;
use crate::model::ops::portable_forced;
use crate::model::tensor_parallel::TensorParallel;
use crate::model::CocaConfig;
use crate::train::trainer::ZeroStage;
use anyhow::Result;
use candle_core::{DType, Device};

const F32: u64 = 4;

pub use coca_common::memory_estimate::MemoryEstimate;

/// Which implementation of the model's ops a step runs, which changes what its graph keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsPath {
    /// The CPU's fused kernels (float32; half-precision inputs are widened to float32 copies
    /// first, except by the bias kernels, which read them as they are).
    CpuFused,
    /// Our CUDA kernels (`worker/kernels/fused_ops.cu`) for every float dtype: a GPU in the
    /// `cuda` build.
    CudaFused,
    /// candle compositions for every op ([`crate::model::ops::portable`]):
    /// `COCA_PORTABLE_OPS=1` on either device.
    Portable { cpu: bool },
}

impl OpsPath {
    /// The path a step on `device` takes in this process.
    pub fn for_device(device: &Device) -> Self {
        Self::for_kind(!device.is_cpu())
    }

    /// The path a step takes in this process on a GPU (`on_gpu`) or on the CPU, without opening
    /// a device (the launcher's check, before any worker starts).
    pub fn for_kind(on_gpu: bool) -> Self {
        match (on_gpu, portable_forced()) {
            (false, false) => Self::CpuFused,
            (true, false) if cfg!(feature = "cuda") => Self::CudaFused,
            (gpu, _) => Self::Portable { cpu: !gpu },
        }
    }

    fn portable(self) -> bool {
        matches!(self, Self::Portable { .. })
    }

    /// Float32 copies a softmax keeps besides its output, per score: the composition's
    /// (scaled, masked, shifted, exponentiated, and the float32 copy of half-precision
    /// scores); on the CPU's fused path, the float32 copy of half-precision scores its kernel
    /// reads ([`crate::model::ops::masked_softmax`]); none in our CUDA kernels, which read the
    /// compute dtype.
    fn softmax_extra(self, masked: bool, mixed: bool) -> u64 {
        match self {
            Self::Portable { .. } => 3 + u64::from(masked) + u64::from(mixed),
            Self::CpuFused => u64::from(mixed),
            Self::CudaFused => 0,
        }
    }

    /// Whether a half-precision GELU input is widened to a float32 copy, kept with the float32
    /// result beside the rounded one: the CPU's kernel and the composition compute on float32
    /// copies, our CUDA kernel reads the compute dtype.
    fn widens_gelu(self, mixed: bool) -> bool {
        mixed && !matches!(self, Self::CudaFused)
    }

    /// Whether training recomputes attention's probabilities in the backward pass instead of
    /// keeping them (`attention::recomputes_probabilities`): off the CPU's fused path.
    fn recomputes_attention(self) -> bool {
        !matches!(self, Self::CpuFused)
    }

    /// Whether a branch's output joins the residual stream in our op, whose backward reads no
    /// values ([`crate::model::ops::add_widened`]), so that the graph does not keep the
    /// branch's output (nor, under tensor parallelism, its sum over the group).
    fn frees_branches(self) -> bool {
        !self.portable()
    }

    fn cpu(self) -> bool {
        matches!(self, Self::CpuFused | Self::Portable { cpu: true })
    }

    /// Whether products in `compute` run on a native bf16 kernel in this process (AMX tiles
    /// or AVX-512 BF16: vendored candle change 12 active) instead of on widened float32
    /// operands.
    fn multiplies_natively(self, compute: DType) -> bool {
        self.cpu() && compute == DType::BF16 && candle_core::cpu_backend::amx::is_active()
    }

    /// Whether attention's scores are computed inside the softmax's op
    /// ([`crate::model::ops::attention_probs`]), so the graph does not keep them: with our
    /// kernels (float32 on the CPU).
    fn fuses_scores(self, mixed: bool) -> bool {
        match self {
            Self::CudaFused => true,
            Self::CpuFused => !mixed,
            Self::Portable { .. } => false,
        }
    }

    /// Tensors a linear layer with a bias keeps per output element: the output alone where the
    /// bias is added in the product's op ([`crate::model::ops::biased_product`]: our kernels,
    /// in every float dtype), else the product too.
    fn biased_outputs(self) -> u64 {
        1 + u64::from(self.portable())
    }
}

/// The estimate for one worker of a layout: `tp`-way tensor parallel, ZeRO `stage` over
/// `sharding` ranks, `batch` samples per micro-batch, with or without activation checkpointing,
/// matrix products in `compute` (float32, or bf16/f16 under autocast), the ops run as `ops`.
#[allow(clippy::too_many_arguments)]
pub fn estimate(
    config: &CocaConfig,
    tp: usize,
    sharding: usize,
    stage: Option<ZeroStage>,
    batch: usize,
    grad_checkpointing: bool,
    compute: DType,
    ops: OpsPath,
) -> Result<MemoryEstimate> {
    let shapes = parameter_shapes_for(config, &TensorParallel::layout_only(0, tp.max(1)))?;
    let p: u64 = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    let shard = p.div_ceil(sharding.max(1) as u64);
    let kept_gradients = match stage {
        Some(ZeroStage::Two) => shard,
        _ => p,
    };
    let moments = match stage {
        Some(_) => 2 * shard,
        None => 2 * p,
    };
    let parameter_bytes = F32 * p;
    // Kept, and the backward pass's full gradient (added to the kept ones in place).
    let backward_gradient_bytes = F32 * p;
    let gradient_bytes = F32 * kept_gradients + backward_gradient_bytes;
    let optimizer_bytes = F32 * moments;
    let activation_bytes = activation_bytes(config, tp, batch, grad_checkpointing, compute, ops);
    // The backward pass frees the activations as its gradient grows
    // (`Tensor::backward_freeing`): the total counts the larger of the two, not their sum. At
    // its end the gradient is nearly full while, with checkpointing, the last block's
    // recomputation is alive.
    let recomputed = match grad_checkpointing && batch > 0 {
        true => {
            let tp = tp.max(1) as u64;
            let (blocks, _, _) = model_blocks(config, tp, compute != DType::F32, ops);
            largest_block_bytes(&blocks, tp, batch as u64, compute, ops)
        }
        false => 0,
    };
    // Every weight but the token embeddings (looked up, not multiplied) is cast once per step
    // and the graph keeps the copy; the backward pass holds each copy's gradient in the
    // compute dtype too, except where bf16 products run on a native kernel (AMX, AVX-512
    // BF16): measured on tiles, the peak holds the copies once (B-32 at batch 8 in bf16:
    // 6.54 GB on tiles, 6.67 GB with the operands widened, whose float32 copies are in
    // flight beside the gradients).
    let embeddings: u64 = shapes
        .iter()
        .filter(|(name, _)| name.ends_with("token_embedding.weight"))
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    let copies = match ops.multiplies_natively(compute) {
        true => 1,
        false => 2,
    };
    let compute_copy_bytes = if compute == DType::F32 {
        0
    } else {
        copies * compute.size_in_bytes() as u64 * p.saturating_sub(embeddings)
    };
    Ok(MemoryEstimate {
        parameters: p,
        parameter_bytes,
        gradient_bytes,
        optimizer_bytes,
        compute_copy_bytes,
        activation_bytes,
        total_bytes: parameter_bytes
            + F32 * kept_gradients
            + optimizer_bytes
            + compute_copy_bytes
            + activation_bytes.max(backward_gradient_bytes + recomputed),
    })
}

/// One transformer block's sizes, per sample and per tensor-parallel member.
#[derive(Debug, Clone, Copy)]
struct Block {
    /// Query positions.
    tokens: u64,
    /// Key positions: `tokens` for self-attention, the image tokens for cross-attention.
    keys: u64,
    width: u64,
    heads: u64,
    /// The MLP's hidden width.
    hidden: u64,
    cross: bool,
    /// Whether its attention adds a mask (the causal text and decoder blocks).
    masked: bool,
}

impl Block {
    /// A self-attention block over `tokens` positions.
    fn self_attention(
        tokens: u64,
        width: usize,
        heads: usize,
        mlp_ratio: f64,
        masked: bool,
    ) -> Self {
        Self {
            tokens,
            keys: tokens,
            width: width as u64,
            heads: heads as u64,
            hidden: crate::model::config::mlp_width(width, mlp_ratio) as u64,
            cross: false,
            masked,
        }
    }

    /// Elements the plain graph keeps for the block's backward, per sample, counted op by op as
    /// the model builds them: the two norms, the projections (each a biased product, or a
    /// product and its bias sum: [`OpsPath::biased_outputs`]), the head split copies, the
    /// scores (unless the softmax's op computes them: [`OpsPath::fuses_scores`]) and their
    /// softmax, the heads merged, the output projection, both residual sums, the MLP's hidden
    /// layer before and after GELU; under tensor parallelism the group's copies and sums. A
    /// cross-attention block also keeps the normalised keys/values input and its key and value
    /// projections.
    ///
    /// Under autocast (`mixed`) the products, their bias sums, head copies and the GELU are in
    /// the compute dtype; the norms, softmax, residual stream and group sums stay float32; and
    /// three kinds of tensors exist only then: each normalised input's cast copy, the float32
    /// copy of a row-parallel product joining the residual stream, and the softmax's cast copy
    /// feeding `probs · v`.
    ///
    /// Where attention's core is checkpointed (`core_recomputed`: [`OpsPath::recomputes_attention`],
    /// outside a recomputed block) the heads' copies are not kept either: only the projections
    /// it reads and its merged output.
    ///
    /// The compositions (`ops`) keep more than a fused op's output, all float32: each layer
    /// norm's centred, squared, normalised and scaled copies ([`LAYER_NORM_EXTRA`]); a
    /// softmax's scaled (and masked) scores, shifted scores and exponentials, and the float32
    /// copy of half-precision scores; a half-precision GELU input's float32 copy and result.
    fn kept(&self, tp: u64, mixed: bool, ops: OpsPath, core_recomputed: bool) -> Kept {
        let (t, s, w) = (self.tokens, self.keys, self.width);
        let parallel = u64::from(tp > 1);
        let extra = u64::from(mixed);
        // A column-parallel projection's output, and a row-parallel one's (whose bias is added
        // after the sum over the group).
        let (column, row) = Self::linear_outputs(tp, ops);
        // Under autocast at degree 1 with fused ops, the norms return the compute dtype
        // (`ops::layer_norm_to`) and the branches join the residual stream in
        // `ops::add_widened`: no float32 norm output or widened branch is kept.
        let rounded = u64::from(mixed && tp == 1 && !ops.portable());
        // ln_1 and ln_2 (float32 unless rounded), both residual sums (float32); the output
        // projection and c_proj (compute dtype) and, under autocast, each one's float32 copy
        // (unless rounded); under tensor parallelism the group's copies of both norms, and
        // each row-parallel product's sum over the group with its float32 copy. Where the
        // branches join the stream in our op (`OpsPath::frees_branches`), nothing of the
        // branches is kept: neither the products and their bias sums, nor their float32
        // copies, nor the group sums.
        let branch = 1 - u64::from(ops.frees_branches());
        let mut kept = Kept {
            single: t
                * w
                * (4 - 2 * rounded
                    + 2 * parallel
                    + 4 * parallel * branch
                    + 2 * extra * (1 - rounded) * branch),
            half: t * w * (2 * row * branch + 2 * extra),
        };
        // The heads' copies and the core's output before its heads are merged, unless the core
        // is recomputed.
        let plain = u64::from(!core_recomputed);
        if self.cross {
            // q (projection, heads), merged heads (product, copy); ln_1_kv (float32 unless
            // rounded) and its cast copy, k and v (projection, heads).
            kept.half += (column + 1 + 2 * plain) * t * w / tp
                + 2 * (column + plain) * s * w / tp
                + extra * s * w;
            kept.single += s * w * (1 + parallel) * (1 - rounded);
        } else {
            // q/k/v packed (projection, heads), merged heads (product, copy).
            kept.half += (3 * column + 1 + 4 * plain) * t * w / tp;
        }
        // The attention's probabilities: `Self::probabilities`. The MLP's hidden layer: c_fc's projection, and the GELU.
        kept.half += (column + 1) * t * self.hidden / tp;
        if ops.portable() {
            // ln_1 and ln_2, and a cross block's ln_1_kv over the keys.
            kept.single += LAYER_NORM_EXTRA * (2 * t * w + u64::from(self.cross) * s * w);
        }
        if ops.widens_gelu(mixed) {
            // The GELU's float32 input copy and result.
            kept.single += 2 * t * self.hidden / tp;
        }
        kept
    }

    /// What the attention's probabilities take per sample: kept by the graph, or only while the
    /// backward pass recomputes them ([`OpsPath::recomputes_attention`]).
    fn probabilities(&self, tp: u64, mixed: bool, ops: OpsPath) -> Kept {
        attention_probabilities(
            self.heads.div_ceil(tp),
            self.tokens,
            self.keys,
            self.masked,
            mixed,
            ops,
        )
    }

    /// Tensors per output element of a column-parallel and of a row-parallel linear layer with
    /// a bias: under tensor parallelism the row-parallel product is summed over the group
    /// before its bias is added (two tensors).
    fn linear_outputs(tp: u64, ops: OpsPath) -> (u64, u64) {
        let column = ops.biased_outputs();
        (column, if tp > 1 { 2 } else { column })
    }

    /// Bytes the graph keeps for `batch` samples of this block, its attention's probabilities
    /// aside (`Self::kept`).
    fn kept_bytes(
        &self,
        tp: u64,
        batch: u64,
        compute: DType,
        ops: OpsPath,
        core_recomputed: bool,
    ) -> u64 {
        let kept = self.kept(tp, compute != DType::F32, ops, core_recomputed);
        batch * kept.bytes(compute)
    }

    /// Bytes a recomputed attention core holds for `batch` samples besides its probabilities:
    /// the heads' copies and its output before the merge.
    fn core_copy_bytes(&self, tp: u64, batch: u64, compute: DType) -> u64 {
        let (t, s, w) = (self.tokens, self.keys, self.width);
        batch * compute.size_in_bytes() as u64 * (2 * t * w + 2 * s * w) / tp
    }

    /// Bytes of this block's attention probabilities for `batch` samples.
    fn probability_bytes(&self, tp: u64, batch: u64, compute: DType, ops: OpsPath) -> u64 {
        batch
            * self
                .probabilities(tp, compute != DType::F32, ops)
                .bytes(compute)
    }

    /// What a checkpointed block keeps per sample: its input.
    fn checkpointed_floats(&self) -> u64 {
        self.tokens * self.width
    }
}

/// One attention's probabilities `[heads, t, s]` per sample, with what their ops keep: the
/// scores (a product, unless the softmax's op computes them) and their softmax (float32), its
/// cast copy under autocast, and a composed softmax's float32 intermediates.
fn attention_probabilities(
    heads: u64,
    t: u64,
    s: u64,
    masked: bool,
    mixed: bool,
    ops: OpsPath,
) -> Kept {
    let scores = heads * t * s;
    let mut kept = Kept {
        single: scores,
        half: scores * (u64::from(!ops.fuses_scores(mixed)) + u64::from(mixed)),
    };
    kept.single += scores * ops.softmax_extra(masked, mixed);
    kept
}

/// Float32 copies a composed layer norm keeps besides its output, per normalised element.
const LAYER_NORM_EXTRA: u64 = 4;

/// Every transformer block of the model (with how many of it), the floats per sample of
/// everything else the graph keeps, and the attentional pooler's probabilities.
fn model_blocks(
    config: &CocaConfig,
    tp: u64,
    mixed: bool,
    ops: OpsPath,
) -> (Vec<(Block, u64)>, Kept, Kept) {
    let v = &config.vision_cfg;
    let t = &config.text_cfg;
    let m = &config.multimodal_cfg;
    let grid = (v.image_size / v.patch_size.max(1)).pow(2) as u64;
    let image_tokens = grid + 1;
    let queries = v.attn_pooler_queries as u64;
    let text_tokens = t.context_length as u64 + 1; // the appended cls token
    let decoder_tokens = (t.context_length as u64).saturating_sub(1);
    let vision = Block::self_attention(
        image_tokens,
        v.width,
        v.width / v.head_width.max(1),
        v.mlp_ratio,
        false,
    );
    let text = Block::self_attention(text_tokens, t.width, t.heads, t.mlp_ratio, true);
    let decoder = Block::self_attention(decoder_tokens, m.width, m.heads, m.mlp_ratio, true);
    let cross = Block {
        keys: queries.saturating_sub(1),
        cross: true,
        masked: false,
        ..decoder
    };
    let parallel = u64::from(tp > 1);
    let (e, vw) = (config.embed_dim as u64, v.width as u64);
    let pixels = 3 * (v.image_size as u64).pow(2);
    // The image stem: pixels and their patches, the patch embedding, class token, positions,
    // ln_pre. The pooler: ln_k, the queries, its cross-attention (as a block's, without MLP,
    // from the image width to the embedding width, its keys' and values' products
    // concatenated; the heads' copies unless its core is recomputed), ln_post.
    let (column, row) = Block::linear_outputs(tp, ops);
    let plain = 2 * u64::from(!ops.recomputes_attention());
    let image_rest = 2 * pixels
        + 4 * image_tokens * vw
        + image_tokens * vw * (1 + parallel)
        + queries * e * (2 + row + 2 * parallel)
        + (column + 1 + plain) * queries * e / tp
        + (2 * column + 2 + plain) * image_tokens * e / tp;
    // The text stem: embedding rows, cls, positions, the mask.
    let text_rest = 3 * text_tokens * t.width as u64 + text_tokens * text_tokens;
    // The caption logits, kept for the loss, and their gradient. Under autocast the product
    // is in the compute dtype; our CUDA kernels' loss reads it as it is and returns its
    // gradient in it, the CPU's reads a float32 copy and returns a float32 gradient.
    let logits = decoder_tokens * (m.vocab_size as u64).div_ceil(tp);
    let (logits_single, logits_half) = match (mixed, ops) {
        (true, OpsPath::CudaFused) => (0, 2 * logits),
        (true, _) => (2 * logits, logits),
        (false, _) => (logits, logits),
    };
    let decoder_out = decoder_tokens * m.width as u64 * (1 + parallel);
    let blocks = vec![
        (vision, v.layers as u64),
        (text, t.layers as u64),
        (decoder, m.layers as u64),
        (cross, m.layers as u64),
    ];
    let pooler_heads = (v.attn_pooler_heads as u64).div_ceil(tp);
    // The compositions' extras outside the blocks: the stems' and heads' layer norms (ln_pre,
    // ln_k, ln_q, ln_post, both ln_final), and the caption loss's shifted logits and their
    // exponentials.
    let mut composed = 0;
    if ops.portable() {
        composed += LAYER_NORM_EXTRA
            * (2 * image_tokens * vw
                + 2 * queries * e
                + text_tokens * t.width as u64
                + decoder_tokens * m.width as u64)
            + 2 * logits;
    }
    let rest = Kept {
        single: image_rest + text_rest + decoder_out + logits_single + composed,
        half: logits_half,
    };
    let pooler = attention_probabilities(pooler_heads, queries, image_tokens, false, mixed, ops);
    (blocks, rest, pooler)
}

/// Elements kept in float32 and in the compute dtype (both float32 without autocast).
#[derive(Debug, Clone, Copy, Default)]
struct Kept {
    single: u64,
    half: u64,
}

impl Kept {
    /// Bytes with the products in `compute`.
    fn bytes(&self, compute: DType) -> u64 {
        F32 * self.single + compute.size_in_bytes() as u64 * self.half
    }
}

/// Bytes of activations for `batch` samples: what the autograd graph keeps for the backward
/// pass (every block of the image tower, the text tower and the decoder, the stems, the
/// attentional pooler, the caption logits and their gradient; see `Block::kept`), with the
/// matrix products in `compute`.
///
/// With activation checkpointing a block keeps only its input, and the backward pass holds one
/// recomputed block at a time (the largest is counted). Where attention's probabilities are
/// recomputed (off the CPU's fused path), the backward pass holds one attention's at a time.
/// Transient buffers of single
/// operations are left out; `coca-worker bench-memory --batch N` measures the whole step.
pub fn activation_bytes(
    config: &CocaConfig,
    tp: usize,
    batch: usize,
    grad_checkpointing: bool,
    compute: DType,
    ops: OpsPath,
) -> u64 {
    let tp = tp.max(1) as u64;
    let batch = batch as u64;
    if batch == 0 {
        return 0;
    }
    let mixed = compute != DType::F32;
    let (blocks, rest, pooler) = model_blocks(config, tp, mixed, ops);
    let recompute = ops.recomputes_attention();
    let whole = |b: &Block| b.kept_bytes(tp, batch, compute, ops, recompute);
    let probabilities = |b: &Block| b.probability_bytes(tp, batch, compute, ops);
    let pooler = batch * pooler.bytes(compute);
    let blocks_bytes: u64 = if grad_checkpointing {
        // A checkpointed block's input is the float32 residual stream; the recomputed block
        // keeps its probabilities with the rest of its graph.
        let inputs: u64 = blocks
            .iter()
            .map(|(b, n)| F32 * n * batch * b.checkpointed_floats())
            .sum();
        let block = largest_block_bytes(&blocks, tp, batch, compute, ops);
        inputs
            + if recompute {
                block.max(pooler)
            } else {
                block + pooler
            }
    } else if recompute {
        // One attention's probabilities (and heads) at a time.
        let largest = blocks
            .iter()
            .map(|(b, _)| probabilities(b) + b.core_copy_bytes(tp, batch, compute))
            .max();
        let kept: u64 = blocks.iter().map(|(b, n)| n * whole(b)).sum();
        kept + largest.unwrap_or(0).max(pooler)
    } else {
        let kept: u64 = blocks
            .iter()
            .map(|(b, n)| n * (whole(b) + probabilities(b)))
            .sum();
        kept + pooler
    };
    blocks_bytes + batch * rest.bytes(compute)
}

/// The largest of `blocks` (from `model_blocks`) with its attention's probabilities, for
/// `batch` samples: what recomputing a checkpointed block holds (`tp` and `batch` as
/// [`activation_bytes`]).
fn largest_block_bytes(
    blocks: &[(Block, u64)],
    tp: u64,
    batch: u64,
    compute: DType,
    ops: OpsPath,
) -> u64 {
    // Inside a recomputed block attention's core runs plainly.
    let bytes = |b: &Block| {
        b.kept_bytes(tp, batch, compute, ops, false) + b.probability_bytes(tp, batch, compute, ops)
    };
    blocks.iter().map(|(b, _)| bytes(b)).max().unwrap_or(0)
}

#[cfg(test)]
mod tests;
