//! Softmax over the last dimension, optionally scaled and with an additive mask, as attention
//! uses it: `softmax(scale · x + mask)`.

use super::{f32_data, ROWS_PER_TASK};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `softmax(x)` over the last dimension, with a fused backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax { scale: 1.0 })
}

/// `softmax(scale · scores + mask)` over the last dimension, with a fused backward for `scores`.
///
/// `scores` is `[B, H, T, S]`; `mask` is `[T, S]` (shared by the batch, e.g. causal) or
/// `[B, T, S]` (per sample, e.g. padding), broadcast over heads. The mask gets no gradient.
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let scores = scores.contiguous()?;
    let Some(mask) = mask else {
        return scores.apply_op1(Softmax {
            scale: scale as f32,
        });
    };
    let (b, _h, t, s) = scores.dims4()?;
    let mask_batch = match mask.dims() {
        [mt, ms] if (*mt, *ms) == (t, s) => 1,
        [mb, mt, ms] if (*mb, *mt, *ms) == (b, t, s) => b,
        other => bail!(
            "masked_softmax: mask {other:?} does not fit scores {:?}",
            scores.dims()
        ),
    };
    scores.apply_op2(
        &mask.contiguous()?,
        MaskedSoftmax {
            scale: scale as f32,
            mask_batch,
        },
    )
}

/// `softmax(scale · x + mask)` of one row into `y` (every op and the decoding kernels).
pub(crate) fn softmax_row(y: &mut [f32], x: &[f32], mask: Option<&[f32]>, scale: f32) {
    match mask {
        Some(m) => y
            .iter_mut()
            .zip(x.iter().zip(m))
            .for_each(|(y, (x, m))| *y = x * scale + m),
        None => y.iter_mut().zip(x).for_each(|(y, x)| *y = x * scale),
    }
    let max = y.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // Every position masked: PyTorch yields NaN here; zeros keep training finite and the row
        // contributes nothing. Our models never build such rows.
        y.iter_mut().for_each(|y| *y = 0.0);
        return;
    }
    let mut sum = 0f32;
    for v in y.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    y.iter_mut().for_each(|v| *v *= inv);
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
        y.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(n).zip(x.chunks(n)) {
                    softmax_row(y, x, None, self.scale);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        softmax_backward(y, grad, self.scale).map(Some)
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
        let (b, h, t, s) = (dims[0], dims[1], dims[2], dims[3]);
        let mut y = vec![0f32; x.len()];
        // One task per (batch, head) pair: all its rows share one mask block.
        y.par_chunks_mut(t * s)
            .zip(x.par_chunks(t * s))
            .enumerate()
            .for_each(|(bh, (y, x))| {
                let mb = if self.mask_batch == 1 { 0 } else { bh / h };
                let m = &mask[mb * t * s..(mb + 1) * t * s];
                for ((y, x), m) in y.chunks_mut(s).zip(x.chunks(s)).zip(m.chunks(s)) {
                    softmax_row(y, x, Some(m), self.scale);
                }
            });
        debug_assert_eq!(y.len(), b * h * t * s);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(softmax_backward(y, grad, self.scale)?), None))
    }
}

fn softmax_backward(y: &Tensor, grad: &Tensor, scale: f32) -> Result<Tensor> {
    y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward { scale })
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
        dx.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(
                y.par_chunks(n * ROWS_PER_TASK)
                    .zip(g.par_chunks(n * ROWS_PER_TASK)),
            )
            .for_each(|(dx, (y, g))| {
                for (dx, (y, g)) in dx.chunks_mut(n).zip(y.chunks(n).zip(g.chunks(n))) {
                    let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                    for i in 0..n {
                        dx[i] = self.scale * y[i] * (g[i] - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
