//! AdamW over flat buffers, with PyTorch's semantics.

use super::flat::Segment;
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
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl FlatAdamW {
    /// Zero moments for `len` parameters.
    pub fn new(len: usize, config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            exp_avg: vec![0.0; len],
            exp_avg_sq: vec![0.0; len],
        }
    }

    /// One update: each segment's base learning rate times `lr_factor`, its weight decay, and
    /// `grads` (already clipped).
    pub fn update(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        segments: &[Segment],
        lr_factor: f64,
    ) {
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        for s in segments {
            let lr = s.lr * lr_factor;
            let decay = (1.0 - lr * s.weight_decay) as f32;
            let step_size = (lr / bias1) as f32;
            let inv_bias2_sqrt = (1.0 / bias2_sqrt) as f32;
            let range = s.offset..s.offset + s.len;
            params[range.clone()]
                .par_chunks_mut(CHUNK)
                .zip(grads[range.clone()].par_chunks(CHUNK))
                .zip(self.exp_avg[range.clone()].par_chunks_mut(CHUNK))
                .zip(self.exp_avg_sq[range].par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| {
                    for i in 0..p.len() {
                        p[i] *= decay;
                        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                        let denom = v[i].sqrt() * inv_bias2_sqrt + eps;
                        p[i] -= step_size * m[i] / denom;
                    }
                });
        }
    }
}

/// The global L2 norm of a flat gradient buffer (accumulated in f64).
pub fn global_norm(grads: &[f32]) -> f64 {
    // Partial sums in chunk order, then summed sequentially: reproducible bit for bit.
    let partials: Vec<f64> = grads
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>())
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
