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
                .map(|s| device_squares(&t.narrow(0, offset + s.offset, s.len)?))
                .collect::<candle_core::Result<Vec<_>>>()?;
            // One transfer for all segments.
            Ok(Tensor::stack(&sums, 0)?.to_vec1::<f64>()?)
        }
    }
}

/// `Σ g²` in float64 of `grads[range]` of a device buffer: what the norm needs when the
/// segments need not be told apart (tensor-parallel degree 1). One reduction over the range
/// instead of one per parameter.
pub fn device_range_squares(grads: &Tensor, range: Range<usize>) -> Result<f64> {
    ensure!(
        range.end <= grads.dim(0)?,
        "squaring {range:?} of {}",
        grads.dim(0)?
    );
    Ok(device_squares(&grads.narrow(0, range.start, range.len())?)?.to_scalar::<f64>()?)
}

/// Values per row of [`device_squares`]: candle's CUDA sum reduces each output in one thread
/// block, so a whole gradient summed as one output ran on one multiprocessor (the clip and
/// AdamW took 134 ms of B-32's bf16 step on an H100, against 24 ms in PyTorch); as rows, one
/// block sums each row, then one sums the rows' sums.
const SQUARES_ROW: usize = 4096;
/// Values per piece of [`device_squares`]: a piece's float64 copy is 128 MiB, however long the
/// gradient.
const SQUARES_PIECE: usize = 1 << 24;

/// `Σ g²` in float64 of a 1-D float32 tensor, as a 0-d float64 tensor on its device (nothing
/// is read back).
fn device_squares(t: &Tensor) -> candle_core::Result<Tensor> {
    squares_in_rows(t, SQUARES_ROW, SQUARES_PIECE)
}

/// [`device_squares`] with rows of `row` values and pieces of `piece` values.
fn squares_in_rows(t: &Tensor, row: usize, piece: usize) -> candle_core::Result<Tensor> {
    let n = t.dim(0)?;
    let mut sums = Vec::new();
    for start in (0..n).step_by(piece.max(1)) {
        let len = (n - start).min(piece);
        let squares = t.narrow(0, start, len)?.to_dtype(DType::F64)?.sqr()?;
        let rows = len / row;
        if rows > 0 {
            let full = squares.narrow(0, 0, rows * row)?.reshape((rows, row))?;
            sums.push(full.sum(1)?.sum_all()?);
        }
        if len % row > 0 {
            sums.push(squares.narrow(0, rows * row, len % row)?.sum_all()?);
        }
    }
    if sums.is_empty() {
        return Tensor::zeros((), DType::F64, t.device());
    }
    Tensor::stack(&sums, 0)?.sum_all()
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn host_squares(v: &[f32]) -> f64 {
        v.iter().map(|&g| (g as f64) * (g as f64)).sum()
    }

    #[test]
    fn squares_in_rows_and_pieces_equal_the_host_sum() {
        let v: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
        let want = host_squares(&v);
        // Whole rows only, a remainder, pieces with and without remainders, one value per row.
        for (row, piece) in [
            (10, 1000),
            (7, 1000),
            (7, 64),
            (1000, 300),
            (1, 1),
            (4096, 1 << 24),
        ] {
            let got = squares_in_rows(&t, row, piece)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                (got - want).abs() <= 1e-12 * want,
                "rows of {row}, pieces of {piece}: {got} vs {want}"
            );
        }
        let empty = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            device_squares(&empty).unwrap().to_scalar::<f64>().unwrap(),
            0.0
        );
    }

    #[test]
    fn device_range_squares_covers_exactly_the_range() {
        let v: Vec<f32> = (0..9000).map(|i| (i % 13) as f32 - 6.0).collect();
        let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
        let got = device_range_squares(&t, 100..8300).unwrap();
        assert_eq!(got, host_squares(&v[100..8300]));
        assert!(device_range_squares(&t, 100..9001).is_err());
    }
}
