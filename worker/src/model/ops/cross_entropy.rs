//! Per-row cross-entropy from logits and integer targets, fused with its backward.

use super::math::exp;
use super::{f32_data, fused, portable, u32_data, ROWS_PER_TASK};
use crate::multiversion;
use crate::simd::{lane_max, lane_sum, KernelFamily};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `logsumexp(logits[n]) - logits[n, target[n]]` for each row `n` of `[N, V]` logits: the
/// contrastive and the caption losses.
///
/// Rows whose target equals `ignore` get loss 0 and no gradient (PyTorch's `ignore_index`); the
/// caller divides by the number of counted rows. Float32 on the CPU, or any float dtype on a
/// GPU, runs the fused kernel, whose backward recomputes the log-softmax row by row (over a
/// 49,408-word vocabulary it is never materialised); anything else runs
/// [`super::portable::cross_entropy_rows`]. Both return float32 for half-precision logits. On a
/// GPU the targets are not read back: a counted target outside the classes gives a NaN loss
/// (which stops training) instead of an error.
pub fn cross_entropy_rows(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    check_targets("cross_entropy_rows", targets, n, v)?;
    if !fused(&[logits]) {
        return portable::cross_entropy_rows(logits, targets, ignore);
    }
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    logits
        .contiguous()?
        .apply_op2(&targets, CrossEntropy { ignore })
}

/// Checks that `targets` is `[n]` for logits `[n, v]`.
pub(crate) fn check_targets(op: &str, targets: &Tensor, n: usize, v: usize) -> Result<()> {
    if targets.dims() != [n] {
        bail!(
            "{op}: targets {:?} do not fit logits [{n}, {v}]",
            targets.dims()
        );
    }
    Ok(())
}

struct CrossEntropy {
    ignore: Option<u32>,
}

/// Max and log-sum-exp of one row (in lanes: see [`crate::simd`]), on the active kernel family
/// (this op and the vocabulary-parallel one).
pub(crate) fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    log_sum_exp_row(KernelFamily::active(), row)
}

multiversion! {
    /// Max and log-sum-exp of one row.
    pub(super) fn log_sum_exp_row(row: &[f32]) -> (f32, f32) {
        let max = lane_max(row);
        let sum = lane_sum(row, |x| exp(x - max));
        (max, max + sum.ln())
    }
}

multiversion! {
    /// `d = exp(x − lse) · g` over one row: the softmax part of the row's gradient.
    pub(super) fn softmax_times(d: &mut [f32], row: &[f32], lse: f32, g: f32) {
        for (d, &x) in d.iter_mut().zip(row) {
            *d = exp(x - lse) * g;
        }
    }
}

fn check_target(op: &str, target: u32, vocab: usize) -> Result<usize> {
    let t = target as usize;
    if t >= vocab {
        bail!("{op}: target {t} is outside the {vocab} classes");
    }
    Ok(t)
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), s1, l1)?;
        let targets = u32_data(self.name(), s2, l2)?;
        let v = l1.shape().dims()[1];
        let mut loss = vec![0f32; targets.len()];
        loss.par_iter_mut()
            .zip(x.par_chunks(v).zip(targets.par_iter()))
            .try_for_each(|(loss, (row, &target))| -> Result<()> {
                if Some(target) == self.ignore {
                    return Ok(());
                }
                let t = check_target(self.name(), target, v)?;
                *loss = log_sum_exp(row).1 - row[t];
                Ok(())
            })?;
        Ok((CpuStorage::F32(loss), Shape::from(targets.len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::cross_entropy(self.name(), (s1, l1), (s2, l2), self.ignore)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dlogits = logits.apply_op3_no_bwd(
            targets,
            &grad.contiguous()?,
            &CrossEntropyBackward {
                ignore: self.ignore,
                shard: None,
            },
        )?;
        Ok((Some(dlogits), None))
    }
}

/// dlogits[n] = (softmax(logits[n]) − onehot(target[n])) · grad[n].
pub(crate) struct CrossEntropyBackward {
    pub(crate) ignore: Option<u32>,
    /// For a slice of the vocabulary (tensor parallelism): the logits are columns
    /// `start..start + V` of the whole row, and each row's log-sum-exp over the whole vocabulary
    /// is given.
    pub(crate) shard: Option<VocabShard>,
}

/// Where a vocabulary slice starts and every row's log-sum-exp over the whole vocabulary.
pub(crate) struct VocabShard {
    pub(crate) start: usize,
    pub(crate) lse: std::sync::Arc<Vec<f32>>,
}

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
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
        let targets = u32_data(self.name(), s2, l2)?;
        let g = f32_data(self.name(), s3, l3)?;
        let v = l1.shape().dims()[1];
        let family = KernelFamily::active();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v * ROWS_PER_TASK)
            .zip(x.par_chunks(v * ROWS_PER_TASK))
            .enumerate()
            .try_for_each(|(task, (dx, x))| -> Result<()> {
                for (i, (dx, row)) in dx.chunks_mut(v).zip(x.chunks(v)).enumerate() {
                    let n = task * ROWS_PER_TASK + i;
                    if Some(targets[n]) == self.ignore {
                        continue;
                    }
                    let lse = match &self.shard {
                        Some(shard) => shard.lse[n],
                        None => log_sum_exp(row).1,
                    };
                    softmax_times(family, dx, row, lse, g[n]);
                    match &self.shard {
                        None => dx[check_target(self.name(), targets[n], v)?] -= g[n],
                        Some(shard) => {
                            let t = targets[n] as usize;
                            if (shard.start..shard.start + v).contains(&t) {
                                dx[t - shard.start] -= g[n];
                            }
                        }
                    }
                }
                Ok(())
            })?;
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
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
        if self.shard.is_some() {
            bail!(
                "{}: the vocabulary-parallel backward runs on the CPU only",
                self.name()
            );
        }
        super::cuda::cross_entropy_backward(self.name(), (s1, l1), (s2, l2), (s3, l3), self.ignore)
    }
}
