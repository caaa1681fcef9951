//! The vocabulary-parallel cross-entropy composed from candle primitives and the collective
//! autograd: what runs on devices other than the CPU, for dtypes other than float32, and under
//! [`crate::model::ops::force_portable`]. The fused CPU op is in `vocab.rs`.

use super::TensorParallel;
use crate::model::ops::portable::{log_sum_exp, upcast, TargetColumns};
use candle_core::{IndexOp, Result, Tensor};

/// [`super::vocab_parallel_cross_entropy`] composed, in the compute dtype of
/// [`crate::model::ops::portable`] (float32 for half-precision logits), which it returns.
///
/// Each member computes its slice's log-sum-exp and its target logit (0 where another member
/// holds the target), places them in its own slot of a zero `[T, 2, N]` tensor and sums that
/// over the group (Megatron's `g`: one all-reduce forward, the gradient passed through), so
/// every member holds every member's pair and combines them stably in member order. The
/// backward needs no communication: each member's gradient reaches its own slot only.
pub fn vocab_parallel_cross_entropy_portable(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
    tp: &TensorParallel,
) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let (rank, size) = (tp.rank(), tp.size());
    let columns = TargetColumns::new(
        "vocab_parallel_cross_entropy",
        logits,
        targets,
        ignore,
        rank * v,
        v * size,
    )?;
    let x = upcast(logits)?;
    let mine = Tensor::stack(&[log_sum_exp(&x, 1)?, columns.picked(&x)?], 0)?;
    let all = tp
        .reduce_out(&mine.pad_with_zeros(0, 2 * rank, 2 * (size - 1 - rank))?)?
        .reshape((size, 2, n))?;
    let lse = log_sum_exp(&all.i((.., 0))?, 0)?;
    let target = all.i((.., 1))?.sum(0)?;
    (lse - target)?.mul(&columns.counted)
}
