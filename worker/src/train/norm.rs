//! The clipping norm's parts on flat buffers anywhere: each segment's sum of squares, and
//! clipping a range, on the host (the fused kernels) or as device ops.

use super::adamw::{clip_to_norm, global_norm};
use super::flat::Segment;
use crate::comm::FlatBuffer;
use crate::model::tensor_parallel::{split_of, TensorParallel};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};
use std::ops::Range;

/// `Σ g²` in float64 of each segment of `grads[offset..]` (segment offsets relative to it).
pub fn segment_squares(
    grads: &FlatBuffer,
    offset: usize,
    segments: &[Segment],
) -> Result<Vec<f64>> {
    for s in segments {
        ensure!(
            offset + s.offset + s.len <= grads.len(),
            "segment {} lies outside the gradient buffer",
            s.name
        );
    }
    match grads {
        FlatBuffer::Host(v) => Ok(segments
            .iter()
            .map(|s| {
                v[offset + s.offset..offset + s.offset + s.len]
                    .iter()
                    .map(|&g| (g as f64) * (g as f64))
                    .sum()
            })
            .collect()),
        FlatBuffer::Device(_) if segments.is_empty() => Ok(Vec::new()),
        FlatBuffer::Device(t) => {
            let sums = segments
                .iter()
                .map(|s| {
                    t.narrow(0, offset + s.offset, s.len)?
                        .to_dtype(DType::F64)?
                        .sqr()?
                        .sum_all()
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            // One transfer for all segments.
            Ok(Tensor::stack(&sums, 0)?.to_vec1::<f64>()?)
        }
    }
}

/// Scales `grads[range]` as `torch.nn.utils.clip_grad_norm_` does, by
/// `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_range(
    grads: &mut FlatBuffer,
    range: Range<usize>,
    norm: f64,
    max_norm: f64,
) -> Result<()> {
    ensure!(
        range.end <= grads.len(),
        "clipping {range:?} of {}",
        grads.len()
    );
    match grads {
        FlatBuffer::Host(v) => clip_to_norm(&mut v[range], norm, max_norm),
        FlatBuffer::Device(t) => {
            let coef = (max_norm / (norm + 1e-6)).min(1.0);
            if coef < 1.0 {
                let scaled = t.narrow(0, range.start, range.len())?.affine(coef, 0.0)?;
                t.slice_set(&scaled, 0, range.start)?;
            }
        }
    }
    Ok(())
}

/// The global L2 norm of the whole model's gradients when each member holds the flat gradient
/// buffer `grads` of its own shards, laid out by `segments` (the trainer's flat layout, offsets
/// relative to `grads`): the split parameters' squares are summed over the group, the
/// replicated ones (identical on every member) counted once. The same value on every member;
/// non-finite on every member when any member's gradients are. Degree 1 is [`global_norm`],
/// bit for bit.
pub fn global_grad_norm(grads: &[f32], segments: &[Segment], tp: &TensorParallel) -> Result<f64> {
    if tp.is_single() {
        return Ok(global_norm(grads));
    }
    Ok(squared_grad_norm(grads, segments, tp)?.sqrt())
}

/// The square of [`global_grad_norm`] (to be summed further, e.g. over a sharding group whose
/// members each hold a block of the flat buffer: pass the block and its segments).
pub fn squared_grad_norm(grads: &[f32], segments: &[Segment], tp: &TensorParallel) -> Result<f64> {
    let squares = segments
        .iter()
        .map(|s| {
            ensure!(
                s.offset + s.len <= grads.len(),
                "segment {} lies outside the gradient buffer",
                s.name
            );
            Ok(grads[s.offset..s.offset + s.len]
                .iter()
                .map(|&g| (g as f64) * (g as f64))
                .sum())
        })
        .collect::<Result<Vec<f64>>>()?;
    combine_squares(segments, &squares, tp)
}

/// The whole model's squared gradient norm from `squares`, each segment's `Σ g²` on this member:
/// the split parameters' squares summed over the group, the replicated ones counted once (see
/// [`squared_grad_norm`]).
pub fn combine_squares(segments: &[Segment], squares: &[f64], tp: &TensorParallel) -> Result<f64> {
    ensure!(
        segments.len() == squares.len(),
        "{} squares for {} segments",
        squares.len(),
        segments.len()
    );
    let (mut split, mut replicated) = (0f64, 0f64);
    for (s, sq) in segments.iter().zip(squares) {
        if split_of(&s.name).is_replicated() {
            replicated += sq;
        } else {
            split += sq;
        }
    }
    if tp.is_single() {
        return Ok(split + replicated);
    }
    // The collective carries f32: each member's f64 goes as a high and a low part (≈ 48 bits),
    // summed in f64 in member order (the same bits on every member).
    let hi = split as f32;
    let mine = [hi, (split - hi as f64) as f32];
    let mut all = vec![0f32; 2 * tp.size()];
    tp.group()
        .all_gather(&mine, &mut all)
        .context("summing the split gradients' squares over the tensor-parallel group")?;
    let split: f64 = all.iter().map(|&x| x as f64).sum();
    Ok(split + replicated)
}
