//! `coca-worker selftest`: each fused op against its portable composition on one device, in
//! float32, bfloat16 and float16 — the forward value and the gradient of every input. On a GPU
//! this is our CUDA kernels (`worker/kernels/fused_ops.cu`) against candle's primitives, in
//! seconds and without a reference folder: when `verify --device cuda` fails, it says which
//! kernel and which dtype. On the CPU it checks the CPU kernels (float32; the half-precision
//! rows compare the composition with itself, `fused` says so). Attention's core with its
//! probabilities recomputed in the backward pass (as training runs it on a GPU) is checked
//! against keeping them the same way.

use crate::compare::{max_abs, max_abs_diff};
use crate::model::attention::{attention_core, HeadShape};
use crate::model::autocast::Autocast;
use crate::model::ops::{self, fused_dispatches, portable};
use crate::rng::SplitMix64;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

/// One op in one dtype: the largest differences, each over the larger of 1 and the
/// composition's largest element.
#[derive(Debug, Clone, Serialize)]
pub struct OpCheck {
    pub op: &'static str,
    pub dtype: String,
    /// Whether a fused kernel ran (false: both sides were the composition).
    pub fused: bool,
    pub forward: f32,
    /// The worst over the inputs' gradients.
    pub backward: f32,
    pub tolerance: f32,
    pub ok: bool,
}

/// The tolerance of a result in `dtype`: float32 results agree to float32 rounding; half
/// precision ones to one rounding of the dtype (the kernels and the compositions both compute
/// in float32 and round once, but not always the same way).
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        _ => 2e-5,
    }
}

/// A deterministic normal tensor of `shape` on `device`, times `scale`, in `dtype`.
fn normal(shape: &[usize], seed: u64, scale: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut rng = SplitMix64(seed);
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| (rng.normal_pair().0 * scale) as f32)
        .collect();
    Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
}

/// Runs `op` on fresh variables of `inputs`, backpropagates `Σ out ⊙ g` (in float32), and
/// returns the output and the gradient of every input.
fn value_and_grads(inputs: &[Tensor], g: &Tensor, op: &Op<'_>) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(&tensors)?;
    let grads = (out.to_dtype(DType::F32)? * g)?.sum_all()?.backward()?;
    let grads = tensors
        .iter()
        .map(|t| {
            grads
                .get(t)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no gradient reached an input"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((out, grads))
}

/// `|a − b|` over the larger of 1 and `b`'s largest element (NaN anywhere: infinite).
fn scaled(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = max_abs_diff(a, b)? / max_abs(b)?.max(1.0);
    Ok(if d.is_nan() { f32::INFINITY } else { d })
}

/// An op under test, on the inputs in order.
type Op<'a> = dyn Fn(&[Tensor]) -> candle_core::Result<Tensor> + 'a;

/// The fused op and the composition on the same inputs, compared.
fn check(
    name: &'static str,
    inputs: &[Tensor],
    fused: &Op<'_>,
    composed: &Op<'_>,
    dtype: DType,
    device: &Device,
) -> Result<OpCheck> {
    let shape = fused(inputs)?.dims().to_vec();
    let g = normal(&shape, 99, 1.0, DType::F32, device)?;
    let before = fused_dispatches();
    let (fused_out, fused_grads) = value_and_grads(inputs, &g, fused)?;
    let fused_ran = fused_dispatches() > before;
    let (composed_out, composed_grads) = value_and_grads(inputs, &g, composed)?;
    let forward = scaled(&fused_out, &composed_out)?;
    let backward = fused_grads
        .iter()
        .zip(&composed_grads)
        .map(|(f, c)| scaled(f, c))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold(0f32, f32::max);
    let tolerance = tolerance(dtype);
    Ok(OpCheck {
        op: name,
        dtype: format!("{dtype:?}").to_lowercase(),
        fused: fused_ran,
        forward,
        backward,
        tolerance,
        ok: forward <= tolerance && backward <= tolerance,
    })
}

/// Every fused op in every float dtype on `device`, on shapes like B-32's (odd widths where the
/// kernels have tails).
pub fn run(device: &Device) -> Result<Vec<OpCheck>> {
    let mut checks = Vec::new();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let x = |shape: &[usize], seed: u64, scale: f64| normal(shape, seed, scale, dtype, device);
        let f32s = |shape: &[usize], seed: u64| normal(shape, seed, 1.0, DType::F32, device);
        // Layer norm: half-precision activations, float32 weight and bias.
        checks.push(check(
            "layer_norm",
            &[x(&[100, 770], 1, 3.0)?, f32s(&[770], 2)?, f32s(&[770], 3)?],
            &|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5),
            &|t| portable::layer_norm(&t[0], &t[1], &t[2], 1e-5),
            dtype,
            device,
        )?);
        // Under autocast: a block's layer norm of the float32 residual stream, returned in
        // the compute dtype, and a branch in the compute dtype joining the stream.
        checks.push(check(
            "layer_norm_to",
            &[f32s(&[100, 770], 17)?, f32s(&[770], 2)?, f32s(&[770], 3)?],
            &|t| ops::layer_norm_to(&t[0], &t[1], &t[2], 1e-5, dtype),
            &|t| portable::layer_norm(&t[0], &t[1], &t[2], 1e-5)?.to_dtype(dtype),
            dtype,
            device,
        )?);
        // The branch is an op's output (doubled: exact), so that the op records it as a graph
        // handle without its values, as for a block's branches.
        checks.push(check(
            "add_widened",
            &[f32s(&[100, 770], 18)?, x(&[100, 770], 19, 1.0)?],
            &|t| ops::add_widened(&t[0], &(&t[1] * 2.0)?),
            &|t| &t[0] + (&t[1] * 2.0)?.to_dtype(DType::F32)?,
            dtype,
            device,
        )?);
        // Attention's probabilities under a causal mask.
        let (tokens, keys) = (50, 50);
        let mask = crate::model::transformer::causal_mask(tokens, device)?;
        checks.push(check(
            "masked_softmax",
            &[x(&[2, 12, tokens, keys], 4, 4.0)?],
            &|t| ops::masked_softmax(&t[0], Some(&mask), 0.125),
            &|t| portable::masked_softmax(&t[0], Some(&mask), 0.125),
            dtype,
            device,
        )?);
        // The same probabilities from queries and keys, the product inside the op.
        checks.push(check(
            "attention_probs",
            &[
                x(&[2, 12, tokens, 64], 15, 1.0)?,
                x(&[2, 12, keys, 64], 16, 1.0)?,
            ],
            &|t| ops::attention_probs(&t[0], &t[1].t()?, Some(&mask), 0.125),
            &|t| portable::masked_softmax(&t[0].matmul(&t[1].t()?)?, Some(&mask), 0.125),
            dtype,
            device,
        )?);
        checks.push(check(
            "softmax_last_dim",
            &[x(&[64, 300], 5, 3.0)?],
            &|t| ops::softmax_last_dim(&t[0]),
            &|t| portable::softmax_last_dim(&t[0]),
            dtype,
            device,
        )?);
        checks.push(check(
            "gelu_erf",
            &[x(&[100, 3072], 6, 2.0)?],
            &|t| ops::gelu_erf(&t[0]),
            &|t| portable::gelu_erf(&t[0]),
            dtype,
            device,
        )?);
        // The caption loss's rows: a vocabulary slice, padding (id 0) ignored.
        let targets: Vec<u32> = (0..76u32)
            .map(|i| if i % 7 == 0 { 0 } else { i * 131 % 5000 })
            .collect();
        let targets = Tensor::from_vec(targets, 76, device)?;
        checks.push(check(
            "cross_entropy_rows",
            &[x(&[76, 5000], 7, 4.0)?],
            &|t| ops::cross_entropy_rows(&t[0], &targets, Some(0)),
            &|t| portable::cross_entropy_rows(&t[0], &targets, Some(0)),
            dtype,
            device,
        )?);
        // The same rows split over two tensor-parallel members: member 1's terms.
        let slice = ops::VocabSlice {
            start: 2500,
            vocab: 5000,
        };
        checks.push(check(
            "cross_entropy_stats",
            &[x(&[76, 2500], 10, 4.0)?],
            &|t| ops::cross_entropy_stats(&t[0], &targets, Some(0), slice),
            &|t| portable::cross_entropy_stats(&t[0], &targets, Some(0), slice),
            dtype,
            device,
        )?);
        // The token embedding (float32 tables only), over a tensor-parallel member's slice of
        // the vocabulary: rows of ids another member holds are zero.
        if dtype == DType::F32 {
            let ids: Vec<u32> = (0..300u32).map(|i| i * 37 % 1000).collect();
            let ids = Tensor::from_vec(ids, 300, device)?;
            let slice = ops::VocabSlice {
                start: 500,
                vocab: 1000,
            };
            checks.push(check(
                "embedding_slice",
                &[f32s(&[500, 512], 11)?],
                &|t| ops::embedding_slice(&t[0], &ids, slice),
                &|t| portable::embedding_slice(&t[0], &ids, slice),
                dtype,
                device,
            )?);
        }
        checks.push(check(
            "add_bias",
            &[x(&[400, 770], 8, 1.0)?, x(&[770], 9, 1.0)?],
            &|t| ops::add_bias(&t[0], &t[1]),
            &|t| added_in_f32(&t[0], &t[1]),
            dtype,
            device,
        )?);
        // Attention's core (the causal text tower's shape, 8 heads of 64) recomputed in the
        // backward pass, as training runs it on a GPU, against keeping it.
        let mask = crate::model::transformer::causal_mask(77, device)?;
        let shape = HeadShape {
            heads: 8,
            head_dim: 64,
        };
        let core = |recompute: bool| {
            let mask = &mask;
            move |t: &[Tensor]| {
                let autocast = Autocast::new(dtype);
                attention_core(&t[0], None, Some(mask), shape, autocast, recompute)
            }
        };
        checks.push(check(
            "attention_recomputed",
            &[x(&[2, 77, 3 * 512], 15, 1.0)?],
            &core(true),
            &core(false),
            dtype,
            device,
        )?);
        // A linear layer: the product with a transposed weight and its bias in one op.
        checks.push(check(
            "biased_product",
            &[
                x(&[400, 384], 12, 1.0)?,
                x(&[770, 384], 13, 0.1)?,
                x(&[770], 14, 1.0)?,
            ],
            &|t| ops::biased_product(&t[0], &t[1].t()?, &t[2]),
            &|t| added_in_f32(&t[0].matmul(&t[1].t()?)?, &t[2]),
            dtype,
            device,
        )?);
    }
    Ok(checks)
}

/// `y + b` composed from candle's ops in float32 and rounded once to `y`'s dtype: what the
/// bias kernels compute in every dtype (candle's own half-precision `broadcast_add` would sum
/// the bias gradient in the half type, rounding at every row).
fn added_in_f32(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    y.to_dtype(DType::F32)?
        .broadcast_add(&b.to_dtype(DType::F32)?)?
        .to_dtype(y.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_kernels_agree_with_the_compositions() {
        let checks = run(&Device::Cpu).unwrap();
        assert_eq!(checks.len(), 37);
        for c in &checks {
            assert!(c.ok, "{c:?}");
            // The CPU has fused kernels for float32 (the count is process-wide, so other
            // tests' fused ops may show on the half-precision rows).
            if c.dtype == "f32" {
                assert!(c.fused, "{c:?}");
            }
        }
    }

    #[test]
    fn a_difference_beyond_the_tolerance_fails_the_check() {
        let x = normal(&[8, 40], 1, 2.0, DType::F32, &Device::Cpu).unwrap();
        let c = check(
            "gelu_erf",
            &[x],
            &|t| ops::gelu_erf(&t[0]),
            &|t| ops::gelu_erf(&t[0])?.affine(1.0 + 1e-4, 0.0),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert!(!c.ok && c.forward > c.tolerance, "{c:?}");
    }
}
