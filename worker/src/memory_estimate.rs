//! A worker's host memory for training, estimated from the config and the layout before
//! anything is allocated, so that `coca-launch` can refuse a layout that cannot fit the node.
//!
//! The buffers follow the trainer's accounting ([`crate::train::trainer::TrainerMemory`],
//! measured by `coca-worker bench-memory`): the flat parameter copy, the model's own variables (a
//! second copy), the kept gradients (÷ sharding under stage 2), the gradient each backward pass
//! holds in full before it is reduced, and the AdamW moments (÷ sharding under stage 1 and 2);
//! all of one tensor-parallel member's shards. Activations are an estimate of what the
//! autograd graph keeps per sample (documented at [`activation_bytes_per_sample`]); the
//! estimate is meant to refuse what cannot fit, not to promise what can.

use crate::distributed::tensor_parallel::TensorParallel;
use crate::model::manifest::parameter_shapes_for;
use crate::model::CocaConfig;
use crate::train::trainer::ZeroStage;
use anyhow::Result;

const F32: u64 = 4;

pub use coca_common::memory_estimate::MemoryEstimate;

/// The estimate for one worker of a layout: `tp`-way tensor parallel, ZeRO `stage` over
/// `sharding` ranks, `batch` samples per micro-batch.
pub fn estimate(
    config: &CocaConfig,
    tp: usize,
    sharding: usize,
    stage: Option<ZeroStage>,
    batch: usize,
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
    let model_copy_bytes = F32 * p;
    let gradient_bytes = F32 * (kept_gradients + p);
    let optimizer_bytes = F32 * moments;
    let activation_bytes = activation_bytes_per_sample(config, tp) * batch as u64;
    Ok(MemoryEstimate {
        parameters: p,
        parameter_bytes,
        model_copy_bytes,
        gradient_bytes,
        optimizer_bytes,
        activation_bytes,
        total_bytes: parameter_bytes
            + model_copy_bytes
            + gradient_bytes
            + optimizer_bytes
            + activation_bytes,
    })
}

/// Floats a pre-norm transformer block keeps for its backward pass per sample: about
/// `(9 + 2·mlp_ratio)` activations of `tokens × width` (norms, q/k/v, attention output and
/// projection, residuals, the MLP's hidden layer before and after GELU) plus the attention
/// scores and their softmax, `2 × heads × tokens × keys`. Heads and the MLP split over `tp`.
fn block_floats(tokens: u64, keys: u64, width: u64, heads: u64, mlp_ratio: f64, tp: u64) -> u64 {
    let per_token = (9.0 + 2.0 * mlp_ratio / tp as f64) * width as f64;
    (tokens as f64 * per_token) as u64 + 2 * heads.div_ceil(tp) * tokens * keys
}

/// Bytes of activations per sample: every block of the image tower, the text tower and the
/// decoder (self- and cross-attention), and the caption logits with their softmax and gradient
/// (`3 × context × vocabulary ÷ tp`). An estimate, within a small factor of what candle's graph
/// holds; it leaves out the transient buffers of single operations.
pub fn activation_bytes_per_sample(config: &CocaConfig, tp: usize) -> u64 {
    let tp = tp.max(1) as u64;
    let v = &config.vision_cfg;
    let image_tokens = ((v.image_size / v.patch_size.max(1)).pow(2) + 1) as u64;
    let vision_heads = (v.width / v.head_width.max(1)) as u64;
    let t = &config.text_cfg;
    let m = &config.multimodal_cfg;
    let text_tokens = t.context_length as u64;
    let vision = v.layers as u64
        * block_floats(
            image_tokens,
            image_tokens,
            v.width as u64,
            vision_heads,
            v.mlp_ratio,
            tp,
        );
    let text = t.layers as u64
        * block_floats(
            text_tokens,
            text_tokens,
            t.width as u64,
            t.heads as u64,
            t.mlp_ratio,
            tp,
        );
    let queries = v.attn_pooler_queries as u64;
    let decoder = m.layers as u64
        * (block_floats(
            text_tokens,
            text_tokens,
            m.width as u64,
            m.heads as u64,
            m.mlp_ratio,
            tp,
        ) + block_floats(
            text_tokens,
            queries,
            m.width as u64,
            m.heads as u64,
            0.0,
            tp,
        ));
    let logits = 3 * text_tokens * (m.vocab_size as u64).div_ceil(tp);
    F32 * (vision + text + decoder + logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_trainer_accounting_of_l14() {
        // The README's bench-memory figures for coca_ViT-L-14 (638,450,177 parameters).
        let config = CocaConfig::resolve("coca_ViT-L-14").unwrap();
        let p = 638_450_177u64;
        let e = estimate(&config, 1, 1, None, 0).unwrap();
        assert_eq!(e.parameters, p);
        assert_eq!(e.parameter_bytes, 4 * p);
        assert_eq!(e.optimizer_bytes, 8 * p);
        assert_eq!(e.gradient_bytes, 8 * p);
        assert_eq!(e.activation_bytes, 0);
        let s2 = estimate(&config, 1, 8, Some(ZeroStage::Two), 0).unwrap();
        assert_eq!(s2.optimizer_bytes, 8 * p.div_ceil(8));
        assert_eq!(s2.gradient_bytes, 4 * (p.div_ceil(8) + p));
        let s1 = estimate(&config, 1, 8, Some(ZeroStage::One), 0).unwrap();
        assert_eq!(s1.gradient_bytes, 8 * p);
        // tp 2 holds 1.282 GB of parameters per rank (bench-memory).
        let tp2 = estimate(&config, 2, 1, None, 0).unwrap();
        assert!((1_280_000_000..1_285_000_000).contains(&tp2.parameter_bytes));
        // Activations grow with the batch, and tensor parallelism splits them.
        let b8 = estimate(&config, 1, 1, None, 8).unwrap();
        let b16 = estimate(&config, 1, 1, None, 16).unwrap();
        assert_eq!(b16.activation_bytes, 2 * b8.activation_bytes);
        assert!(b8.activation_bytes > 1 << 30, "{}", b8.activation_bytes);
        assert!(estimate(&config, 2, 1, None, 8).unwrap().activation_bytes < b8.activation_bytes);
        assert_eq!(
            b8.total_bytes,
            b8.parameter_bytes
                + b8.model_copy_bytes
                + b8.gradient_bytes
                + b8.optimizer_bytes
                + b8.activation_bytes
        );
    }
}
