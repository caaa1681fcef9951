//! The vocabulary-parallel pieces: the token-embedding lookup over a slice of the vocabulary and
//! the cross-entropy over logits whose vocabulary is split across the group.

use super::vocab_portable::vocab_parallel_cross_entropy_portable;
use super::TensorParallel;
use crate::model::ops::{
    check_targets, cross_entropy_rows, embedding, f32_data, fused_on_cpu, log_sum_exp, u32_data,
    CrossEntropyBackward, VocabShard,
};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use coca_common::collective::Collective;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Embedding rows `[N, W]` of the ids `[N]` (u32, global vocabulary ids) from `weight`, this
/// member's rows `rank·Vₗ .. (rank+1)·Vₗ` of the full `[V, W]` table: the rows of ids another
/// member owns are zero, and the sum over the group is the full lookup. Degree 1 is a plain
/// [`embedding`] lookup.
pub fn vocab_parallel_embedding(
    weight: &Tensor,
    ids: &Tensor,
    tp: &TensorParallel,
) -> Result<Tensor> {
    if tp.is_single() {
        return embedding(weight, ids);
    }
    let local = weight.dim(0)?;
    let start = tp.rank() * local;
    let vocab = local * tp.size();
    let ids = ids.to_vec1::<u32>()?;
    let mut local_ids = Vec::with_capacity(ids.len());
    let mut mask = Vec::with_capacity(ids.len());
    for &id in &ids {
        let id = id as usize;
        if id >= vocab {
            bail!("token id {id} is outside the vocabulary of {vocab}");
        }
        let mine = (start..start + local).contains(&id);
        local_ids.push(if mine { (id - start) as u32 } else { 0 });
        mask.push(if mine { 1f32 } else { 0.0 });
    }
    let n = ids.len();
    let device = weight.device();
    let local_ids = Tensor::from_vec(local_ids, n, device)?;
    let mask = Tensor::from_vec(mask, (n, 1), device)?.to_dtype(weight.dtype())?;
    let rows = embedding(weight, &local_ids)?.broadcast_mul(&mask)?;
    tp.reduce_out(&rows)
}

/// Per-row cross-entropy `logsumexp(z[n]) − z[n, target[n]]` of logits `z` `[N, V]` whose
/// vocabulary is split over the group: `logits` is this member's `[N, V/T]` slice (columns
/// `rank·V/T ..`), `targets` `[N]` are global ids (the same on every member). Every member gets
/// the same `[N]` losses; rows whose target is `ignore` get 0 and no gradient. The backward
/// gives each member `(softmax − onehot)` of its own columns times the incoming gradient, with
/// no communication. Degree 1 is [`cross_entropy_rows`].
///
/// The forward all-gathers two floats per row (each member's log-sum-exp over its slice and
/// its target logit, zero where it does not own the target) and combines them stably; the full
/// logits are never gathered. Float32 logits on the CPU run the fused op; anything else runs
/// [`vocab_parallel_cross_entropy_portable`].
pub fn vocab_parallel_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
    tp: &TensorParallel,
) -> Result<Tensor> {
    if tp.is_single() {
        return cross_entropy_rows(logits, targets, ignore);
    }
    let (n, v) = logits.dims2()?;
    check_targets("vocab_parallel_cross_entropy", targets, n, v)?;
    if !fused_on_cpu(&[logits]) {
        return vocab_parallel_cross_entropy_portable(logits, targets, ignore, tp);
    }
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    logits.contiguous()?.apply_op2(
        &targets,
        ParallelCrossEntropy {
            group: tp.group().clone(),
            start: tp.rank() * v,
            vocab: v * tp.size(),
            ignore,
            lse: Mutex::new(None),
        },
    )
}

/// The summed cross-entropy over the non-pad targets of vocabulary-split logits `[B, L, V/T]`
/// against `labels` `[B, L]`, and how many targets were counted. The caption loss divides the
/// one by the other — over one batch, or over the whole data-parallel group.
pub fn caption_token_loss(
    logits: &Tensor,
    labels: &Tensor,
    pad_id: u32,
    tp: &TensorParallel,
) -> Result<(Tensor, f32)> {
    let (b, t, v) = logits.dims3()?;
    let labels = labels.to_dtype(DType::U32)?.flatten_all()?;
    let counted = labels
        .ne(pad_id)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    let rows =
        vocab_parallel_cross_entropy(&logits.reshape((b * t, v))?, &labels, Some(pad_id), tp)?;
    Ok((rows.sum_all()?, counted))
}

/// The caption loss (mean cross-entropy over the non-pad targets) of vocabulary-split logits
/// `[B, L, V/T]` against `labels` `[B, L]`.
pub fn caption_loss_parallel(
    logits: &Tensor,
    labels: &Tensor,
    pad_id: u32,
    tp: &TensorParallel,
) -> Result<Tensor> {
    let (sum, counted) = caption_token_loss(logits, labels, pad_id, tp)?;
    if counted == 0.0 {
        bail!(
            "caption loss: every label is padding ({:?} tokens)",
            labels.dims()
        );
    }
    sum / counted as f64
}

struct ParallelCrossEntropy {
    group: Arc<dyn Collective>,
    /// The first vocabulary id of this member's columns.
    start: usize,
    /// The full vocabulary size.
    vocab: usize,
    ignore: Option<u32>,
    /// The global log-sum-exp of every row, kept by the forward for the backward.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

impl ParallelCrossEntropy {
    /// The column of `target` in this member's slice of `width` columns, if it owns it.
    fn local_column(&self, target: u32, width: usize) -> Option<usize> {
        let t = target as usize;
        (self.start..self.start + width)
            .contains(&t)
            .then(|| t - self.start)
    }
}

impl CustomOp2 for ParallelCrossEntropy {
    fn name(&self) -> &'static str {
        "vocab-parallel-cross-entropy"
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
        let n = targets.len();
        // Every member sees the same targets, so a bad one fails on every member before any
        // collective (no member is left waiting).
        if let Some(&bad) = targets
            .iter()
            .find(|&&t| Some(t) != self.ignore && t as usize >= self.vocab)
        {
            bail!(
                "{}: target {bad} is outside the {} classes",
                self.name(),
                self.vocab
            );
        }
        // [lse_0 .. lse_{n-1}, target_0 .. target_{n-1}] of this member's slice.
        let mut mine = vec![0f32; 2 * n];
        let (lse, picked) = mine.split_at_mut(n);
        lse.par_iter_mut()
            .zip(picked.par_iter_mut())
            .zip(x.par_chunks(v).zip(targets.par_iter()))
            .for_each(|((lse, picked), (row, &target))| {
                if Some(target) == self.ignore {
                    return;
                }
                *lse = log_sum_exp(row).1;
                if let Some(t) = self.local_column(target, v) {
                    *picked = row[t];
                }
            });
        let size = self.group.size();
        let mut all = vec![0f32; 2 * n * size];
        self.group
            .all_gather(&mine, &mut all)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e:#}", self.name())))?;
        // Combined in member order on every member, so every member gets the same bits.
        let mut global = vec![0f32; n];
        let mut loss = vec![0f32; n];
        for i in 0..n {
            if Some(targets[i]) == self.ignore {
                continue;
            }
            let member_lse = |m: usize| all[m * 2 * n + i];
            let max = (0..size).map(member_lse).fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = (0..size).map(|m| (member_lse(m) - max).exp()).sum();
            let target: f32 = (0..size).map(|m| all[m * 2 * n + n + i]).sum();
            global[i] = max + sum.ln();
            loss[i] = global[i] - target;
        }
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("cross-entropy state lock poisoned".into()))? =
            Some(Arc::new(global));
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("cross-entropy state lock poisoned".into()))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: backward before forward", self.name()))
            })?;
        let dlogits = logits.apply_op3_no_bwd(
            targets,
            &grad.contiguous()?,
            &CrossEntropyBackward {
                ignore: self.ignore,
                shard: Some(VocabShard {
                    start: self.start,
                    lse,
                }),
            },
        )?;
        Ok((Some(dlogits), None))
    }
}
