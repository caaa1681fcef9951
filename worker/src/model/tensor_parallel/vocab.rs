//! The vocabulary-parallel pieces: the token-embedding lookup over a slice of the vocabulary and
//! the cross-entropy over logits whose vocabulary is split across the group.

use super::TensorParallel;
use crate::model::ops::{
    cross_entropy_rows, cross_entropy_stats, embedding, embedding_slice, portable, VocabSlice,
};
use candle_core::{bail, DType, IndexOp, Result, Tensor};

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
    let slice = VocabSlice {
        start: tp.rank() * local,
        vocab: local * tp.size(),
    };
    tp.reduce_out(&embedding_slice(weight, ids, slice)?)
}

/// Per-row cross-entropy `logsumexp(z[n]) − z[n, target[n]]` of logits `z` `[N, V]` whose
/// vocabulary is split over the group: `logits` is this member's `[N, V/T]` slice (columns
/// `rank·V/T ..`), `targets` `[N]` are global ids (the same on every member). Every member gets
/// the same float32 `[N]` losses; rows whose target is `ignore` get 0 and no gradient. The
/// backward gives each member `(softmax − onehot)` of its own columns times the incoming
/// gradient, with no communication. Degree 1 is [`cross_entropy_rows`].
///
/// Each member computes its slice's log-sum-exp and target logit
/// ([`crate::model::ops::cross_entropy_stats`]: fused kernels on the CPU and on GPUs), the
/// group all-gathers those two floats per row (on the device, through the communicator), and
/// every member combines them stably in member order; the full logits are never gathered. The
/// gradient of each member's pair comes from its own loss only.
pub fn vocab_parallel_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
    tp: &TensorParallel,
) -> Result<Tensor> {
    if tp.is_single() {
        return cross_entropy_rows(logits, targets, ignore);
    }
    combine_over_group(logits, targets, ignore, tp, cross_entropy_stats)
}

/// [`vocab_parallel_cross_entropy`] with each member's terms composed from candle primitives
/// ([`portable::cross_entropy_stats`]) whatever the device: what the tests hold the fused
/// kernels to.
pub fn vocab_parallel_cross_entropy_portable(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
    tp: &TensorParallel,
) -> Result<Tensor> {
    if tp.is_single() {
        return portable::cross_entropy_rows(logits, targets, ignore);
    }
    combine_over_group(logits, targets, ignore, tp, portable::cross_entropy_stats)
}

/// The member's `[2, N]` terms from `stats`, gathered into `[T, 2, N]`, combined into the
/// loss: the log-sum-exp over the members' log-sum-exps minus the owner's target logit, on
/// counted rows (the gathered terms of an ignored row are all zero).
fn combine_over_group(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
    tp: &TensorParallel,
    stats: fn(&Tensor, &Tensor, Option<u32>, VocabSlice) -> Result<Tensor>,
) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let slice = VocabSlice {
        start: tp.rank() * v,
        vocab: v * tp.size(),
    };
    let mine = stats(logits, targets, ignore, slice)?;
    let all = tp.gather_keeping_own(&mine)?.reshape((tp.size(), 2, n))?;
    let lse = portable::log_sum_exp(&all.i((.., 0))?, 0)?;
    let target = all.i((.., 1))?.sum(0)?;
    let counted = match ignore {
        Some(id) => targets
            .to_dtype(DType::U32)?
            .ne(id)?
            .to_dtype(lse.dtype())?,
        None => Tensor::ones(n, lse.dtype(), lse.device())?,
    };
    (lse - target)?.mul(&counted)
}

/// The summed cross-entropy over the non-pad targets of vocabulary-split logits `[B, L, V/T]`
/// against `labels` `[B, L]`, and how many targets were counted, both float32 scalars where the
/// logits live (nothing is read back to the host). The caption loss divides the one by the
/// other — over one batch, or over the whole data-parallel group.
pub fn caption_token_loss(
    logits: &Tensor,
    labels: &Tensor,
    pad_id: u32,
    tp: &TensorParallel,
) -> Result<(Tensor, Tensor)> {
    let (b, t, v) = logits.dims3()?;
    let labels = labels.to_dtype(DType::U32)?.flatten_all()?;
    let counted = labels.ne(pad_id)?.to_dtype(DType::F32)?.sum_all()?;
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
    let counted = counted.to_scalar::<f32>()?;
    if counted == 0.0 {
        bail!(
            "caption loss: every label is padding ({:?} tokens)",
            labels.dims()
        );
    }
    sum / counted as f64
}
