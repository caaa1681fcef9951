//! Softmax over the last dimension, optionally scaled and with an additive mask, as attention
//! uses it: `softmax(scale · x + mask)`.

use super::math::exp;
use super::{f32_contiguous, f32_data, fused, portable, widened, widened_on_cpu, ROWS_PER_TASK};
use crate::multiversion;
use crate::simd::{lane_max, lane_sum, lane_sum2, KernelFamily};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `softmax(x)` over the last dimension. Float32 on the CPU, or any float dtype on a GPU, runs
/// the fused kernel (with a fused backward); anything else runs
/// [`super::portable::softmax_last_dim`]. Both return float32 for half-precision inputs.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if widened_on_cpu(&[x]) {
        return softmax_last_dim(&widened(x)?);
    }
    if !fused(&[x]) {
        return portable::softmax_last_dim(x);
    }
    x.contiguous()?.apply_op1(Softmax { scale: 1.0 })
}

/// `softmax(scale · scores + mask)` over the last dimension: attention's probabilities, in one
/// pass instead of three. Float32 on the CPU, or any float dtype on a GPU, runs the fused kernel
/// (with a fused backward for `scores`); anything else runs [`super::portable::masked_softmax`].
/// Both return float32 for half-precision inputs.
///
/// `scores` is `[B, H, T, S]`; `mask` is `[T, S]` (shared by the batch, e.g. causal) or
/// `[B, T, S]` (per sample, e.g. padding), broadcast over heads. The mask gets no gradient. A
/// row that is −∞ everywhere gives zeros (PyTorch gives NaN).
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    if widened_on_cpu(&[scores]) {
        return masked_softmax(&widened(scores)?, mask, scale);
    }
    let Some(mask) = mask else {
        if !fused(&[scores]) {
            return portable::masked_softmax(scores, None, scale);
        }
        return scores.contiguous()?.apply_op1(Softmax {
            scale: scale as f32,
        });
    };
    let mask_batch = mask_batch(scores, mask)?;
    if !fused(&[scores, mask]) {
        return portable::masked_softmax(scores, Some(mask), scale);
    }
    scores.contiguous()?.apply_op2(
        &f32_contiguous(mask)?,
        MaskedSoftmax {
            scale: scale as f32,
            mask_batch,
        },
    )
}

/// How many batch entries `mask` has for `scores` `[B, H, T, S]`: 1 for a shared `[T, S]`
/// mask, `B` for a `[B, T, S]` one; any other shape is an error.
pub(super) fn mask_batch(scores: &Tensor, mask: &Tensor) -> Result<usize> {
    mask_batch_of(scores.dims4()?, mask)
}

/// [`mask_batch`] for scores of dimensions `(B, H, T, S)`.
pub(super) fn mask_batch_of(
    (b, h, t, s): (usize, usize, usize, usize),
    mask: &Tensor,
) -> Result<usize> {
    match mask.dims() {
        [mt, ms] if (*mt, *ms) == (t, s) => Ok(1),
        [mb, mt, ms] if (*mb, *mt, *ms) == (b, t, s) => Ok(b),
        other => bail!(
            "masked_softmax: mask {other:?} does not fit scores {:?}",
            [b, h, t, s]
        ),
    }
}

/// An additive mask over the `[B, H, T, S]` scores, broadcast over the heads.
pub(super) struct HeadMask<'a> {
    /// `[mask batch, T, S]`, or `None` for no mask.
    pub mask: Option<&'a [f32]>,
    /// 1 when the mask is shared by the batch, else the batch size.
    pub batch: usize,
    /// Heads per batch entry.
    pub heads: usize,
}

/// `softmax(scale · x + mask)` of scores `x` `[B, H, T, S]` (`ts` = `(T, S)`), one task per
/// (batch, head) pair: all its rows share one mask block.
pub(super) fn softmax_heads(
    x: &[f32],
    mask: HeadMask,
    (t, s): (usize, usize),
    scale: f32,
) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    if t * s == 0 {
        return y;
    }
    let family = KernelFamily::active();
    y.par_chunks_mut(t * s)
        .zip(x.par_chunks(t * s))
        .enumerate()
        .for_each(|(bh, (y, x))| {
            let m = mask.mask.map(|m| {
                let mb = if mask.batch == 1 { 0 } else { bh / mask.heads };
                &m[mb * t * s..(mb + 1) * t * s]
            });
            softmax_rows(family, y, x, m, scale, s);
        });
    y
}

/// `softmax(scale · x + mask)` of one row into `y` (every op and the decoding kernels).
pub(crate) fn softmax_row(y: &mut [f32], x: &[f32], mask: Option<&[f32]>, scale: f32) {
    softmax_rows(KernelFamily::active(), y, x, mask, scale, x.len())
}

multiversion! {
    /// `softmax(scale · x + mask)` of consecutive rows of width `n` into `y` (`mask`, if any,
    /// holds one row per row of `x`).
    pub(super) fn softmax_rows(y: &mut [f32], x: &[f32], mask: Option<&[f32]>, scale: f32, n: usize) {
        for (r, (y, x)) in y.chunks_exact_mut(n).zip(x.chunks_exact(n)).enumerate() {
            match mask {
                Some(m) => y
                    .iter_mut()
                    .zip(x.iter().zip(&m[r * n..(r + 1) * n]))
                    .for_each(|(y, (x, m))| *y = x * scale + m),
                None => y.iter_mut().zip(x).for_each(|(y, x)| *y = x * scale),
            }
            let max = lane_max(y);
            if max == f32::NEG_INFINITY {
                // Every position masked: PyTorch yields NaN here; zeros keep training finite and
                // the row contributes nothing. Our models never build such rows.
                y.iter_mut().for_each(|y| *y = 0.0);
                continue;
            }
            y.iter_mut().for_each(|v| *v = exp::<M>(*v - max));
            let inv = 1.0 / lane_sum(y, |v| v);
            y.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

multiversion! {
    /// `dx = scale · y ⊙ (g − Σ g ⊙ y)` of consecutive rows of width `n`.
    pub(super) fn softmax_backward_rows(dx: &mut [f32], y: &[f32], g: &[f32], scale: f32, n: usize) {
        for (dx, (y, g)) in dx.chunks_exact_mut(n).zip(y.chunks_exact(n).zip(g.chunks_exact(n))) {
            let dot = lane_sum2(y, g, |y, g| y * g);
            for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
                *dx = scale * y * (g - dot);
            }
        }
    }
}

struct Softmax {
    scale: f32,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), s, l)?;
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        let family = KernelFamily::active();
        y.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(y, x)| softmax_rows(family, y, x, None, self.scale, n));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::softmax(self.name(), (s, l), None, self.scale)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        softmax_backward(x, y, grad, self.scale).map(Some)
    }
}

struct MaskedSoftmax {
    scale: f32,
    /// 1 when the mask is shared by the batch, else the batch size.
    mask_batch: usize,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), s1, l1)?;
        let mask = f32_data(self.name(), s2, l2)?;
        let dims = l1.shape().dims();
        let heads = HeadMask {
            mask: Some(mask),
            batch: self.mask_batch,
            heads: dims[1],
        };
        let y = softmax_heads(x, heads, (dims[2], dims[3]), self.scale);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let mask = super::cuda::SoftmaxMask {
            mask: (s2, l2),
            batch: self.mask_batch,
        };
        super::cuda::softmax(self.name(), (s1, l1), Some(mask), self.scale)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(softmax_backward(x, y, grad, self.scale)?), None))
    }
}

/// The gradient for the scores `x` from the float32 probabilities `y`, in `x`'s dtype.
pub(super) fn softmax_backward(
    x: &Tensor,
    y: &Tensor,
    grad: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward { scale })?
        .to_dtype(x.dtype())
}

/// dx = scale · y ⊙ (g − Σ g ⊙ y), row by row.
struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_data(self.name(), s1, l1)?;
        let g = f32_data(self.name(), s2, l2)?;
        let n = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; y.len()];
        let family = KernelFamily::active();
        dx.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(
                y.par_chunks(n * ROWS_PER_TASK)
                    .zip(g.par_chunks(n * ROWS_PER_TASK)),
            )
            .for_each(|(dx, (y, g))| softmax_backward_rows(family, dx, y, g, self.scale, n));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::softmax_backward(self.name(), (s1, l1), (s2, l2), self.scale)
    }
}
