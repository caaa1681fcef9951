//! Layer normalisation over the last dimension with affine weight and bias.

use super::{f32_contiguous, f32_data, fused, portable, widened, widened_on_cpu, ROWS_PER_TASK};
use crate::multiversion;
use crate::simd::{lane_sum, lane_sum2, lane_sum3, KernelFamily};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `(x - mean) / sqrt(var + eps) · weight + bias` over the last dimension (biased variance, as
/// PyTorch): every transformer block normalises twice. Float32 on the CPU, or any float dtype on
/// a GPU, runs the fused kernels (with a fused backward for `x`, `weight` and `bias`); anything
/// else runs [`super::portable::layer_norm`]. Both return float32 for half-precision inputs.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm_to(x, weight, bias, eps, DType::F32)
}

/// [`layer_norm`] returned in `out`: under autocast, the half-precision operand of the matrix
/// product that reads it. The same numbers as `layer_norm(..)?.to_dtype(out)` (the float32
/// result rounded once), forward and backward, but the fused op rounds its own result, so the
/// float32 one is not kept for the backward pass as a cast's input is: 4 bytes per normalised
/// element less (two layer norms per transformer block, three in a cross-attention block).
pub fn layer_norm_to(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    out: DType,
) -> Result<Tensor> {
    check_affine(x, weight, bias)?;
    if widened_on_cpu(&[x, weight, bias]) {
        let (x, weight, bias) = (widened(x)?, widened(weight)?, widened(bias)?);
        return layer_norm_to(&x, &weight, &bias, eps, out);
    }
    if !fused(&[x, weight, bias]) {
        let y = portable::layer_norm(x, weight, bias, eps)?;
        return if y.dtype() == out {
            Ok(y)
        } else {
            y.to_dtype(out)
        };
    }
    x.contiguous()?.apply_op3(
        &f32_contiguous(weight)?,
        &f32_contiguous(bias)?,
        LayerNorm {
            eps: eps as f32,
            out,
        },
    )
}

/// Checks that `weight` and `bias` are both `[d]` for an input `[.., d]`.
pub(super) fn check_affine(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<()> {
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        bail!(
            "layer_norm: weight {:?} and bias {:?} must both be [{d}] for input {:?}",
            weight.dims(),
            bias.dims(),
            x.dims()
        );
    }
    Ok(())
}

struct LayerNorm {
    eps: f32,
    /// The output's dtype; the kernels return float32, rounded to it where it differs.
    out: DType,
}

impl LayerNorm {
    /// The kernels' float32 result `y` of `shape` in [`Self::out`] (candle's own conversion).
    fn rounded<S: BackendStorage>(&self, y: S, shape: &Shape) -> Result<S> {
        if y.dtype() == self.out {
            return Ok(y);
        }
        y.to_dtype(&Layout::contiguous(shape), self.out)
    }
}

/// Mean and reciprocal standard deviation of one row (sums in lanes: see [`crate::simd`]).
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lane_sum(x, |v| v) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

multiversion! {
    /// The forward of consecutive rows of width `w.len()` into `y`.
    pub(super) fn layer_norm_rows(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
        let d = w.len();
        let b = &b[..d];
        for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            let (mean, rstd) = row_stats(x, eps);
            for (((y, x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - mean) * rstd * w + b;
            }
        }
    }
}

/// The forward of one row into `y` (the op and the decoding kernels).
pub(crate) fn layer_norm_row(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    layer_norm_rows(KernelFamily::active(), y, x, w, b, eps)
}

multiversion! {
    /// The backward of consecutive rows: writes `dx` and adds each row's `g·x̂` and `g` to
    /// `acc` (`[dweight | dbias]`, `2·d`); `xhat` is scratch of width `d`.
    pub(super) fn layer_norm_backward_rows(
        dx: &mut [f32],
        x: &[f32],
        g: &[f32],
        w: &[f32],
        eps: f32,
        acc: &mut [f32],
        xhat: &mut [f32],
    ) {
        let d = w.len();
        let n = d as f32;
        let (acc_w, acc_b) = acc.split_at_mut(d);
        let xhat = &mut xhat[..d];
        for (dx, (x, g)) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d).zip(g.chunks_exact(d))) {
            let (mean, rstd) = row_stats(x, eps);
            for (xh, x) in xhat.iter_mut().zip(x) {
                *xh = (x - mean) * rstd;
            }
            let sum_gw = lane_sum2(g, w, |g, w| g * w);
            let sum_gw_xhat = lane_sum3(g, w, xhat, |g, w, xh| g * w * xh);
            for (((aw, ab), g), xh) in acc_w.iter_mut().zip(acc_b.iter_mut()).zip(g).zip(xhat.iter()) {
                *aw += g * xh;
                *ab += g;
            }
            for (((dx, g), w), xh) in dx.iter_mut().zip(g).zip(w).zip(xhat.iter()) {
                *dx = rstd * (g * w - sum_gw / n - xh * sum_gw_xhat / n);
            }
        }
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), s1, l1)?;
        let w = f32_data(self.name(), s2, l2)?;
        let b = f32_data(self.name(), s3, l3)?;
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        let family = KernelFamily::active();
        y.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(y, x)| layer_norm_rows(family, y, x, w, b, self.eps));
        let y = self.rounded(CpuStorage::F32(y), l1.shape())?;
        Ok((y, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (y, shape) =
            super::cuda::layer_norm(self.name(), (s1, l1), (s2, l2), (s3, l3), self.eps)?;
        Ok((self.rounded(y, &shape)?, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.dim(0)?;
        let rows = x.elem_count() / d;
        // One pass computes all three gradients, packed as rows [dx..., dweight, dbias], from
        // the float32 upstream gradient (a half-precision output's, widened: what the cast's
        // backward gave before the op rounded its own output).
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let packed = x.apply_op3_no_bwd(w, &grad, &LayerNormBackward { eps: self.eps })?;
        // Float32 from the kernels; the input's gradient in the input's dtype.
        let dx = packed
            .narrow(0, 0, rows)?
            .reshape(x.shape())?
            .to_dtype(x.dtype())?;
        let dw = packed.get(rows)?;
        let db = packed.get(rows + 1)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), s1, l1)?;
        let w = f32_data(self.name(), s2, l2)?;
        let g = f32_data(self.name(), s3, l3)?;
        let d = w.len();
        let rows = x.len() / d;
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx, _) = out.split_at_mut(rows * d);
        let family = KernelFamily::active();
        let partials: Vec<f32> = dx
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(
                x.par_chunks(d * ROWS_PER_TASK)
                    .zip(g.par_chunks(d * ROWS_PER_TASK)),
            )
            .map(|(dx, (x, g))| {
                // Per-task partial sums of dweight and dbias, reduced below.
                let mut acc = vec![0f32; 2 * d];
                let mut xhat = vec![0f32; d];
                layer_norm_backward_rows(family, dx, x, g, w, self.eps, &mut acc, &mut xhat);
                acc
            })
            .collect::<Vec<_>>()
            // Summed in task order, not rayon's adaptive tree: results are bit-for-bit
            // reproducible whatever the thread timing (resumed runs depend on it).
            .into_iter()
            .fold(vec![0f32; 2 * d], |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            });
        out[rows * d..].copy_from_slice(&partials);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::layer_norm_backward(self.name(), (s1, l1), (s2, l2), (s3, l3), self.eps)
    }
}
