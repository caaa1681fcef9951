//! Attention's core recomputed in the backward pass gives the same bits as keeping its
//! probabilities and heads, and keeps no per-head tensor.

use super::MultiheadAttention;
use crate::compare::max_abs_diff;
use crate::model::autocast::Autocast;
use crate::model::tensor_parallel::TensorParallel;
use crate::model::transformer::causal_mask;
use anyhow::Result;
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

const BATCH: usize = 2;
const HEADS: usize = 4;
const WIDTH: usize = 64;
/// Query and key positions, distinct from each other and from the head width (16), so that a
/// `[B, H, T, S]` tensor in the graph is the probabilities.
const QUERIES: usize = 7;
const KEYS: usize = 11;

/// One attention with keys/values of width `kv_dim` (packed q/k/v weights when it is `WIDTH`).
fn attention(kv_dim: usize, dtype: DType) -> Result<(MultiheadAttention, VarMap)> {
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    let tp = TensorParallel::single().with_autocast(Autocast::new(dtype));
    let attn = MultiheadAttention::new(WIDTH, kv_dim, HEADS, 0.05, vb, &tp)?;
    Ok((attn, vars))
}

fn input(tokens: usize, width: usize) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::randn(
        0f32,
        1.0,
        (BATCH, tokens, width),
        &Device::Cpu,
    )?)?)
}

/// `Σ y ⊙ w` for a fixed weighting `w`, so that every output element has its own gradient.
fn backward(y: &Tensor) -> Result<GradStore> {
    let n = y.elem_count() as u32;
    let w = (Tensor::arange(0u32, n, &Device::Cpu)?.to_dtype(DType::F32)? * 0.37)?
        .sin()?
        .reshape(y.shape())?;
    Ok((y.to_dtype(DType::F32)? * w)?.sum_all()?.backward()?)
}

/// Both outputs and every gradient (the weights' and the inputs') equal bit for bit.
fn assert_same_bits(
    vars: &VarMap,
    inputs: &[&Var],
    (plain, recomputed): (&Tensor, &Tensor),
) -> Result<()> {
    assert_eq!(plain.dtype(), recomputed.dtype());
    assert_eq!(max_abs_diff(plain, recomputed)?, 0.0);
    let (g_plain, g_recomputed) = (backward(plain)?, backward(recomputed)?);
    let mut tensors: Vec<Tensor> = vars
        .all_vars()
        .iter()
        .map(|v| v.as_tensor().clone())
        .collect();
    tensors.extend(inputs.iter().map(|v| v.as_tensor().clone()));
    for t in &tensors {
        let a = g_plain.get(t).expect("a kept-probabilities gradient");
        let b = g_recomputed.get(t).expect("a recomputed gradient");
        assert_eq!(max_abs_diff(a, b)?, 0.0, "gradient of {:?}", t.dims());
    }
    Ok(())
}

/// Whether the graph behind `y` holds a tensor of `dims`.
fn keeps(y: &Tensor, dims: &[usize]) -> bool {
    y.sorted_nodes().iter().any(|n| n.dims() == dims)
}

/// Whether the graph behind `y` holds a per-head tensor (rank 4 or more: the heads' copies, the
/// scores or the probabilities).
fn keeps_heads(y: &Tensor) -> bool {
    y.sorted_nodes().iter().any(|n| n.rank() >= 4)
}

#[test]
fn recomputed_self_attention_probabilities_give_the_kept_ones_bits() -> Result<()> {
    let mask = causal_mask(QUERIES, &Device::Cpu)?;
    for dtype in [DType::F32, DType::BF16] {
        let (attn, vars) = attention(WIDTH, dtype)?;
        let x = input(QUERIES, WIDTH)?;
        let qkv = attn.self_projections(x.as_tensor())?;
        let [plain, recomputed] = [false, true]
            .map(|recompute| attn.attend_recomputing(&qkv, None, Some(&mask), recompute));
        let (plain, recomputed) = (plain?, recomputed?);
        // Self-attention's probabilities are [B, H, T, T]: look for them by that shape.
        let probabilities = [BATCH, HEADS, QUERIES, QUERIES];
        assert!(keeps(&plain, &probabilities), "{dtype:?}");
        assert!(!keeps_heads(&recomputed), "{dtype:?}");
        assert_same_bits(&vars, &[&x], (&plain, &recomputed))?;
        // The model's path over the same input.
        let model = attn.forward_self(x.as_tensor(), Some(&mask))?;
        assert_eq!(max_abs_diff(&model, &plain)?, 0.0);
    }
    Ok(())
}

#[test]
fn recomputed_cross_attention_probabilities_give_the_kept_ones_bits() -> Result<()> {
    // The decoder's (packed weights) and the attentional pooler's (keys of another width).
    for (kv_dim, dtype) in [(WIDTH, DType::F32), (WIDTH, DType::BF16), (48, DType::F32)] {
        let (attn, vars) = attention(kv_dim, dtype)?;
        let (x, kv) = (input(QUERIES, WIDTH)?, input(KEYS, kv_dim)?);
        let ac = Autocast::new(dtype);
        let q = attn.q_proj.forward(&ac.cast(x.as_tensor())?)?;
        let kv_proj = attn.cross_kv_packed(&ac.cast(kv.as_tensor())?)?;
        let [plain, recomputed] = [false, true]
            .map(|recompute| attn.attend_recomputing(&q, Some(&kv_proj), None, recompute));
        let (plain, recomputed) = (plain?, recomputed?);
        assert!(
            keeps(&plain, &[BATCH, HEADS, QUERIES, KEYS]),
            "{kv_dim} {dtype:?}"
        );
        assert!(!keeps_heads(&recomputed), "{kv_dim} {dtype:?}");
        assert_same_bits(&vars, &[&x, &kv], (&plain, &recomputed))?;
        // The model's path over the same inputs.
        let model = attn.forward_cross(x.as_tensor(), kv.as_tensor(), None)?;
        assert_eq!(max_abs_diff(&model, &plain)?, 0.0);
    }
    Ok(())
}

#[test]
fn a_frozen_attention_is_the_plain_composition() -> Result<()> {
    let (attn, _) = attention(WIDTH, DType::F32)?;
    let x = Tensor::randn(0f32, 1.0, (BATCH, QUERIES, WIDTH), &Device::Cpu)?;
    let kv = Tensor::randn(0f32, 1.0, (BATCH, KEYS, WIDTH), &Device::Cpu)?;
    let frozen = attn.map_weights(&mut |t| t.detach());
    let y = frozen.forward_cross(&x, &kv, None)?;
    assert!(!y.track_op());
    let (q, k, v) = frozen.self_qkv(&x)?;
    assert_eq!(
        max_abs_diff(
            &frozen.forward_self(&x, None)?,
            &frozen.attend(&q, &k, &v, None)?
        )?,
        0.0
    );
    Ok(())
}
