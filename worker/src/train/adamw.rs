//! AdamW over flat buffers, with PyTorch's semantics.

use super::adamw_inplace::{AdamMoment, AdamWParam};
use super::flat::Segment;
use crate::comm::{FlatBuffer, Placement};
use crate::f32_view::with_f32_mut;
use crate::multiversion;
use crate::simd::KernelFamily;
use anyhow::Result;
use candle_core::Tensor;
use rayon::prelude::*;

/// Elements handed to one rayon task.
const CHUNK: usize = 1 << 15;

/// Adam's hyper-parameters (the learning rate and weight decay live in each [`Segment`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments, eps outside the square
/// root) as one fused pass over flat parameter, gradient and moment buffers.
#[derive(Debug, Clone)]
pub struct FlatAdamW {
    pub config: AdamWConfig,
    /// Number of updates applied so far.
    pub step: u64,
    pub exp_avg: FlatBuffer,
    pub exp_avg_sq: FlatBuffer,
}

/// Where an update reads and writes: `params[params_offset..]` and `grads[grads_offset..]`
/// line up with the moments, which cover exactly `segments` (offsets relative to them).
pub struct UpdateSpan<'a> {
    pub params_offset: usize,
    pub grads_offset: usize,
    pub segments: &'a [Segment],
}

impl FlatAdamW {
    /// Zero moments for `len` parameters, placed by `placement`.
    pub fn new(len: usize, config: AdamWConfig, placement: &Placement) -> Result<Self> {
        Ok(Self {
            config,
            step: 0,
            exp_avg: FlatBuffer::zeros(len, placement)?,
            exp_avg_sq: FlatBuffer::zeros(len, placement)?,
        })
    }

    /// One update of `params` in place (the trainer's flat parameter buffer, whose views are
    /// the model's variables; on the CPU when the other buffers are host memory): each
    /// segment's base learning rate times `lr_factor`, its weight decay, and `grads` (already
    /// clipped).
    pub fn update(
        &mut self,
        params: &Tensor,
        grads: &FlatBuffer,
        span: UpdateSpan<'_>,
        lr_factor: f64,
    ) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        let inv_bias2_sqrt = (1.0 / bias2_sqrt) as f32;
        let coefficients = |s: &Segment| {
            let lr = s.lr * lr_factor;
            let decay = (1.0 - lr * s.weight_decay) as f32;
            let step_size = (lr / bias1) as f32;
            [decay, b1, b2, step_size, inv_bias2_sqrt, eps]
        };
        let UpdateSpan {
            params_offset,
            grads_offset,
            segments,
        } = span;
        if let FlatBuffer::Device(_) = grads {
            let mut buffers =
                DeviceBuffers::new(params, [&mut self.exp_avg, &mut self.exp_avg_sq], grads)?;
            for run in equal_runs(segments) {
                let offsets = [run.offset + params_offset, run.offset, run.offset];
                buffers.adamw(
                    offsets,
                    run.offset + grads_offset,
                    run.len,
                    coefficients(&run),
                )?;
            }
            return Ok(());
        }
        let (FlatBuffer::Host(grads), FlatBuffer::Host(exp_avg), FlatBuffer::Host(exp_avg_sq)) =
            (grads, &mut self.exp_avg, &mut self.exp_avg_sq)
        else {
            anyhow::bail!("AdamW's buffers are placed differently");
        };
        let family = KernelFamily::active();
        with_f32_mut(params, "the parameter buffer", |params| {
            for s in segments {
                let coefficients = coefficients(s);
                let (p, g) = (s.offset + params_offset, s.offset + grads_offset);
                let range = s.offset..s.offset + s.len;
                params[p..p + s.len]
                    .par_chunks_mut(CHUNK)
                    .zip(grads[g..g + s.len].par_chunks(CHUNK))
                    .zip(exp_avg[range.clone()].par_chunks_mut(CHUNK))
                    .zip(exp_avg_sq[range].par_chunks_mut(CHUNK))
                    .for_each(|(((p, g), m), v)| adamw_chunk(family, p, g, m, v, coefficients));
            }
        })
    }
}

/// Neighbouring segments with the same learning rate and weight decay merged: one pass of
/// device ops each (a model has two or three groups, in a few hundred segments).
fn equal_runs(segments: &[Segment]) -> Vec<Segment> {
    let mut runs: Vec<Segment> = Vec::new();
    for s in segments {
        match runs.last_mut() {
            Some(r)
                if r.offset + r.len == s.offset
                    && r.lr == s.lr
                    && r.weight_decay == s.weight_decay =>
            {
                r.len += s.len;
            }
            _ => runs.push(s.clone()),
        }
    }
    runs
}

/// The device tensors of an update: parameters and moments (written in place) and gradients.
struct DeviceBuffers<'a> {
    written: [&'a Tensor; 3],
    grads: &'a Tensor,
}

impl<'a> DeviceBuffers<'a> {
    fn new(
        params: &'a Tensor,
        moments: [&'a mut FlatBuffer; 2],
        grads: &'a FlatBuffer,
    ) -> Result<Self> {
        let placed_apart = || anyhow::anyhow!("AdamW's buffers are placed differently");
        let FlatBuffer::Device(grads) = grads else {
            return Err(placed_apart());
        };
        match moments {
            [FlatBuffer::Device(m), FlatBuffer::Device(v)] => Ok(Self {
                written: [params, m, v],
                grads,
            }),
            _ => Err(placed_apart()),
        }
    }

    /// [`adamw_chunk`] on `len` elements, in place (`adamw_inplace`): parameters, `exp_avg` and
    /// `exp_avg_sq` from `offsets`, gradients from `grad_offset`.
    fn adamw(
        &mut self,
        offsets: [usize; 3],
        grad_offset: usize,
        len: usize,
        k: [f32; 6],
    ) -> Result<()> {
        let [decay, b1, b2, step_size, inv_bias2_sqrt, eps] = k;
        let g = self.grads.narrow(0, grad_offset, len)?;
        let [p, m, v] = [0, 1, 2].map(|i| self.written[i].narrow(0, offsets[i], len));
        let (p, m, v) = (p?, m?, v?);
        m.inplace_op2(
            &g,
            &AdamMoment {
                beta: b1,
                squared: false,
            },
        )?;
        v.inplace_op2(
            &g,
            &AdamMoment {
                beta: b2,
                squared: true,
            },
        )?;
        p.inplace_op3(
            &m,
            &v,
            &AdamWParam {
                k: [decay, step_size, inv_bias2_sqrt, eps],
            },
        )?;
        Ok(())
    }
}

multiversion! {
    /// One AdamW update of a chunk; `k` = `[decay, beta1, beta2, step_size, 1/√bias2, eps]`.
    pub(super) fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: [f32; 6]) {
        let [decay, b1, b2, step_size, inv_bias2_sqrt, eps] = k;
        for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *p *= decay;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let denom = v.sqrt() * inv_bias2_sqrt + eps;
            *p -= step_size * *m / denom;
        }
    }
}

/// Lanes of the float64 sum of squares in [`global_norm`] (one AVX-512 register).
const NORM_LANES: usize = 8;

multiversion! {
    /// `Σ g²` of a chunk in float64, element `i` into lane `i mod 8`, lanes summed in order.
    pub(super) fn sum_squares(grads: &[f32]) -> f64 {
        let mut lanes = [0f64; NORM_LANES];
        let mut chunks = grads.chunks_exact(NORM_LANES);
        for c in &mut chunks {
            for (lane, g) in lanes.iter_mut().zip(c) {
                *lane += (*g as f64) * (*g as f64);
            }
        }
        for (lane, g) in lanes.iter_mut().zip(chunks.remainder()) {
            *lane += (*g as f64) * (*g as f64);
        }
        lanes.iter().sum()
    }
}

/// The global L2 norm of a flat gradient buffer (accumulated in f64).
pub fn global_norm(grads: &[f32]) -> f64 {
    let family = KernelFamily::active();
    // Partial sums in chunk order, then summed sequentially: reproducible bit for bit.
    let partials: Vec<f64> = grads
        .par_chunks(CHUNK)
        .map(|c| sum_squares(family, c))
        .collect();
    partials.iter().sum::<f64>().sqrt()
}

/// Scales gradients as `torch.nn.utils.clip_grad_norm_` does: by
/// `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_to_norm(grads: &mut [f32], norm: f64, max_norm: f64) {
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        let coef = coef as f32;
        grads
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|g| *g *= coef));
    }
}

#[cfg(test)]
mod family_tests {
    use super::*;

    #[test]
    fn every_cpu_kernel_family_updates_and_measures_the_same_bits() {
        let n = 1000 + 13;
        let values = |seed: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| {
                    ((i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                        / (1 << 24) as f32)
                        - 0.5
                })
                .collect()
        };
        let run = |family: KernelFamily| {
            let (mut p, g, mut m) = (values(1), values(2), values(3));
            let mut v: Vec<f32> = values(4).iter().map(|x| x * x).collect();
            adamw_chunk(
                family,
                &mut p,
                &g,
                &mut m,
                &mut v,
                [0.999, 0.9, 0.999, 1e-3, 1.2, 1e-8],
            );
            (p, m, v, sum_squares(family, &g))
        };
        let reference = run(KernelFamily::Portable);
        let exact: f64 = values(2).iter().map(|g| (*g as f64).powi(2)).sum();
        assert!((reference.3 - exact).abs() < 1e-9 * exact);
        for family in KernelFamily::available() {
            let other = run(family);
            for (a, b) in [
                (&reference.0, &other.0),
                (&reference.1, &other.1),
                (&reference.2, &other.2),
            ] {
                assert!(
                    a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{family:?}"
                );
            }
            assert_eq!(reference.3.to_bits(), other.3.to_bits(), "{family:?}");
        }
    }
}
