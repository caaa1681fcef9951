//! The clipping norm's parts on flat buffers anywhere: each segment's sum of squares, and
//! clipping a range, on the host (the fused kernels) or as device ops.

use super::adamw::clip_to_norm;
use super::flat::Segment;
use crate::comm::FlatBuffer;
use anyhow::{ensure, Result};
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
