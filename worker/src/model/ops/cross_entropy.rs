//! Per-row cross-entropy from logits and integer targets, fused with its backward: over the
//! whole vocabulary, or over the slice of it one tensor-parallel member holds.

use super::math::exp;
use super::{
    f32_data, fused, portable, u32_data, widened, widened_on_cpu, VocabSlice, ROWS_PER_TASK,
};
use crate::multiversion;
use crate::simd::{lane_max, lane_sum, KernelFamily};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `logsumexp(logits[n]) - logits[n, target[n]]` for each row `n` of `[N, V]` logits: the
/// contrastive and the caption losses.
///
/// Rows whose target equals `ignore` get loss 0 and no gradient (PyTorch's `ignore_index`); the
/// caller divides by the number of counted rows. Float32 on the CPU, or any float dtype on a
/// GPU, runs the fused kernel ([`cross_entropy_stats`]), whose backward reuses the forward's
/// log-sum-exp row by row (over a 49,408-word vocabulary the log-softmax is never
/// materialised); anything else runs [`super::portable::cross_entropy_rows`]. Both return
/// float32 for half-precision logits. On a GPU the targets are not read back: a counted target
/// outside the classes gives a NaN loss (which stops training) instead of an error.
pub fn cross_entropy_rows(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    check_targets("cross_entropy_rows", targets, n, v)?;
    if widened_on_cpu(&[logits]) {
        return cross_entropy_rows(&widened(logits)?, targets, ignore);
    }
    if !fused(&[logits]) {
        return portable::cross_entropy_rows(logits, targets, ignore);
    }
    let stats = cross_entropy_stats(logits, targets, ignore, VocabSlice::whole(v))?;
    stats.get(0)? - stats.get(1)?
}

/// The cross-entropy's two terms for each row of `[N, V]` logits over `slice`, as float32
/// `[2, N]`: the log-sum-exp of the row's columns, and the target's logit where the slice
/// holds the target (else 0); both 0 on rows whose target is `ignore`.
///
/// The whole-vocabulary loss is the first minus the second; the vocabulary-parallel one
/// combines every member's pair ([`crate::model::tensor_parallel::vocab_parallel_cross_entropy`]).
/// Its backward is `exp(x − lse) · g_lse + onehot · g_target`, reusing the forward's
/// log-sum-exps. Fused kernels for float32 on the CPU and every float dtype on a GPU;
/// [`super::portable::cross_entropy_stats`] elsewhere. A counted target at or past
/// `slice.vocab` is an error on the CPU and a NaN target logit on a GPU (see
/// [`cross_entropy_rows`]).
pub fn cross_entropy_stats(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
    slice: VocabSlice,
) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    check_targets("cross_entropy_stats", targets, n, v)?;
    slice.check("cross_entropy_stats", v)?;
    if widened_on_cpu(&[logits]) {
        return cross_entropy_stats(&widened(logits)?, targets, ignore, slice);
    }
    if !fused(&[logits]) {
        return portable::cross_entropy_stats(logits, targets, ignore, slice);
    }
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    logits
        .contiguous()?
        .apply_op2(&targets, CrossEntropyStats { ignore, slice })
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

/// [`cross_entropy_stats`] as a fused op.
struct CrossEntropyStats {
    ignore: Option<u32>,
    slice: VocabSlice,
}

/// Max and log-sum-exp of one row (in lanes: see [`crate::simd`]), on the active kernel family.
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    log_sum_exp_row(KernelFamily::active(), row)
}

multiversion! {
    /// Max and log-sum-exp of one row.
    pub(super) fn log_sum_exp_row(row: &[f32]) -> (f32, f32) {
        let max = lane_max(row);
        let sum = lane_sum(row, |x| exp::<M>(x - max));
        (max, max + sum.ln())
    }
}

multiversion! {
    /// `d = exp(x − lse) · g` over one row: the softmax part of the row's gradient.
    pub(super) fn softmax_times(d: &mut [f32], row: &[f32], lse: f32, g: f32) {
        for (d, &x) in d.iter_mut().zip(row) {
            *d = exp::<M>(x - lse) * g;
        }
    }
}

impl CrossEntropyStats {
    /// The column of a counted `target` in a slice of `width` columns, if the slice holds it;
    /// an error for a target outside the vocabulary.
    fn column(&self, target: u32, width: usize) -> Result<Option<usize>> {
        let t = target as usize;
        if t >= self.slice.vocab {
            bail!(
                "{}: target {t} is outside the {} classes",
                self.name(),
                self.slice.vocab
            );
        }
        let start = self.slice.start;
        Ok((start..start + width).contains(&t).then(|| t - start))
    }
}

impl CustomOp2 for CrossEntropyStats {
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
        let (n, v) = (targets.len(), l1.shape().dims()[1]);
        // [lse_0 .. lse_{n-1}, picked_0 .. picked_{n-1}]
        let mut stats = vec![0f32; 2 * n];
        let (lse, picked) = stats.split_at_mut(n);
        lse.par_iter_mut()
            .zip(picked.par_iter_mut())
            .zip(x.par_chunks(v).zip(targets.par_iter()))
            .try_for_each(|((lse, picked), (row, &target))| -> Result<()> {
                if Some(target) == self.ignore {
                    return Ok(());
                }
                if let Some(t) = self.column(target, v)? {
                    *picked = row[t];
                }
                *lse = log_sum_exp(row).1;
                Ok(())
            })?;
        Ok((CpuStorage::F32(stats), Shape::from((2, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::cross_entropy_stats(self.name(), (s1, l1), (s2, l2), self.ignore, self.slice)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        stats: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // [3, N]: the forward's log-sum-exps and the gradients of both terms.
        let aux = Tensor::cat(&[&stats.narrow(0, 0, 1)?, &grad.to_dtype(DType::F32)?], 0)?;
        let dlogits = logits.apply_op3_no_bwd(
            targets,
            &aux.contiguous()?,
            &CrossEntropyStatsBackward {
                ignore: self.ignore,
                slice: self.slice,
            },
        )?;
        Ok((Some(dlogits), None))
    }
}

/// dlogits[n] = exp(logits[n] − lse[n]) · g_lse[n] + onehot(target[n]) · g_target[n].
struct CrossEntropyStatsBackward {
    ignore: Option<u32>,
    slice: VocabSlice,
}

impl CustomOp3 for CrossEntropyStatsBackward {
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
        let aux = f32_data(self.name(), s3, l3)?;
        let (n, v) = (targets.len(), l1.shape().dims()[1]);
        let (lse, g_lse, g_target) = (&aux[..n], &aux[n..2 * n], &aux[2 * n..]);
        let family = KernelFamily::active();
        let start = self.slice.start;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v * ROWS_PER_TASK)
            .zip(x.par_chunks(v * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, (dx, x))| {
                for (i, (dx, row)) in dx.chunks_mut(v).zip(x.chunks(v)).enumerate() {
                    let n = task * ROWS_PER_TASK + i;
                    if Some(targets[n]) == self.ignore {
                        continue;
                    }
                    softmax_times(family, dx, row, lse[n], g_lse[n]);
                    let t = targets[n] as usize;
                    if (start..start + v).contains(&t) {
                        dx[t - start] += g_target[n];
                    }
                }
            });
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
        super::cuda::cross_entropy_stats_backward(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            self.ignore,
            self.slice,
        )
    }
}
