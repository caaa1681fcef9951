//! Exact (erf) GELU, as PyTorch's `nn.GELU()` default and open_clip use.
//!
//! The CPU kernels evaluate `erf` and `exp` with branch-free polynomials ([`erf`], [`exp`])
//! instead of libm's scalar calls, so each family's loop vectorises (16 lanes on AVX-512, 8
//! on AVX2): libm's `erff` was the forward's largest cost after the matrix products. The
//! bodies never fuse a multiply and an add, so every family returns the same bits.

use super::{f32_data, fused, portable};
use crate::multiversion;
use crate::simd::KernelFamily;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 4096;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2π)
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `0.5 · x · (1 + erf(x / √2))`, the MLP's activation. Float32 on the CPU runs the fused
/// kernel (with a fused backward); anything else runs [`super::portable::gelu_erf`], which
/// keeps the input's dtype.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fused(&[x]) {
        return portable::gelu_erf(x);
    }
    x.contiguous()?.apply_op1(GeluErf)
}

/// `0.5 · x · (1 + erf(x / √2))` of one value (the op and the decoding kernels).
#[inline(always)]
pub(crate) fn gelu_erf_value(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// `eˣ` in float32 without branches: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `eʳ` by its Taylor
/// series to `r⁷/7!` (truncation below 6·10⁻⁹ relative), `2ⁿ` built in the exponent bits.
/// Within 2 ulp of the exact value; inputs are clamped to `[-87.3, 88.7]`, so results
/// underflow to about `2⁻¹²⁶` instead of 0 and overflow to `+∞` only above 88.7.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    /// 1.5 · 2²³: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 split so that `n · LN2_HI` is exact for the `n` that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    p * scale
}

/// `erf(x)` in float32 without branches: `1 − erfc(|x|)` with the sign of `x`, `erfc` by the
/// Chebyshev fit of Numerical Recipes (`erfcc`, fractional error below 1.2·10⁻⁷), so the
/// absolute error is a few 10⁻⁷ everywhere (libm's `erff` is within 1 ulp).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * exp(-z * z + poly);
    (1.0 - erfc).copysign(x)
}

multiversion! {
    /// `y = GELU(x)`, elementwise.
    pub(super) fn gelu_forward(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = gelu_erf_value(x);
        }
    }
}

multiversion! {
    /// `dx = g · (Φ(x) + x·φ(x))`, elementwise.
    pub(super) fn gelu_backward(dx: &mut [f32], x: &[f32], g: &[f32]) {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
            *dx = g * (cdf + x * pdf);
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
        let family = KernelFamily::active();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| gelu_forward(family, y, x));
        Ok((CpuStorage::F32(y), l.shape().clone()))
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
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(dx, (x, g))| gelu_backward(family, dx, x, g));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
