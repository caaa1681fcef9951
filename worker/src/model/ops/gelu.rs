//! Exact (erf) GELU, as PyTorch's `nn.GELU()` default and open_clip use.

use super::{f32_data, fused, portable};
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
pub(crate) fn gelu_erf_value(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * FRAC_1_SQRT_2))
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = gelu_erf_value(x);
                }
            });
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
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(dx, (x, g))| {
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    let cdf = 0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2));
                    let pdf = INV_SQRT_2PI * (-0.5 * x * x).exp();
                    *dx = g * (cdf + x * pdf);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
