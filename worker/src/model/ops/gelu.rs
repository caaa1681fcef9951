//! Exact (erf) GELU, as PyTorch's `nn.GELU()` default and open_clip use.
//!
//! The CPU kernels evaluate `erf` and `exp` with the branch-free polynomials of [`super::math`]
//! instead of libm's scalar calls, so each family's loop vectorises (16 lanes on AVX-512, 8
//! on AVX2): libm's `erff` was the forward's largest cost after the matrix products.

use super::math::{erf, exp};
use super::{f32_data, fused, portable, widened, widened_on_cpu, written_f32};
use crate::multiversion;
use crate::simd::{KernelFamily, MulAdd};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

const CHUNK: usize = 4096;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2π)
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `0.5 · x · (1 + erf(x / √2))`, the MLP's activation. Float32 on the CPU, or any float dtype
/// on a GPU, runs the fused kernel (with a fused backward); anything else runs
/// [`super::portable::gelu_erf`]. Both keep the input's dtype.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if widened_on_cpu(&[x]) {
        return gelu_erf(&widened(x)?)?.to_dtype(x.dtype());
    }
    if !fused(&[x]) {
        return portable::gelu_erf(x);
    }
    x.contiguous()?.apply_op1(GeluErf)
}

/// `0.5 · x · (1 + erf(x / √2))` of one value, multiplying and adding as `M` does (see
/// [`super::math`]).
#[inline(always)]
pub(super) fn gelu_erf_value<M: MulAdd>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf::<M>(x * FRAC_1_SQRT_2))
}

/// [`gelu_erf`] of float32 values on the CPU, in parallel chunks in the best kernel family:
/// the op's forward pass and the decoding kernels' activation, the same bits in both.
pub(crate) fn gelu_erf_f32(x: &[f32]) -> Vec<f32> {
    let family = KernelFamily::active();
    // SAFETY: the chunks of `y` and `x` pair up one for one (same lengths), and
    // `gelu_forward` writes every element of its output chunk.
    unsafe {
        written_f32(x.len(), |y| {
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(y, x)| gelu_forward(family, y, x))
        })
    }
}

multiversion! {
    /// `y = GELU(x)`, elementwise.
    pub(super) fn gelu_forward(y: &mut [MaybeUninit<f32>], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(gelu_erf_value::<M>(x));
        }
    }
}

multiversion! {
    /// `dx = g · (Φ(x) + x·φ(x))`, elementwise.
    pub(super) fn gelu_backward(dx: &mut [MaybeUninit<f32>], x: &[f32], g: &[f32]) {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf::<M>(x * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp::<M>(-0.5 * x * x);
            dx.write(g * (cdf + x * pdf));
        }
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), s, l)?;
        Ok((CpuStorage::F32(gelu_erf_f32(x)), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::gelu(self.name(), (s, l))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfBackward)?,
        ))
    }
}

/// d/dx GELU(x) = Φ(x) + x·φ(x), times the incoming gradient.
struct GeluErfBackward;

impl CustomOp2 for GeluErfBackward {
    fn name(&self) -> &'static str {
        "gelu-erf-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), s1, l1)?;
        let g = f32_data(self.name(), s2, l2)?;
        let family = KernelFamily::active();
        if g.len() != x.len() {
            candle_core::bail!(
                "{}: {} gradients for {} inputs",
                self.name(),
                g.len(),
                x.len()
            );
        }
        // SAFETY: the chunks of `dx`, `x` and `g` pair up one for one (same lengths), and
        // `gelu_backward` writes every element of its output chunk.
        let dx = unsafe {
            written_f32(x.len(), |dx| {
                dx.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                    .for_each(|(dx, (x, g))| gelu_backward(family, dx, x, g))
            })
        };
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
        super::cuda::gelu_backward(self.name(), (s1, l1), (s2, l2))
    }
}
