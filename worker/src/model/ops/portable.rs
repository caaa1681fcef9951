//! The ops composed from candle primitives: what every device other than the CPU runs (candle's
//! CUDA backend has a kernel and a backward for each primitive used here), and what the CPU
//! runs for dtypes other than float32 or under [`super::force_portable`].
//!
//! Gradients come from candle's autograd through the composition, so they are exact. Inputs
//! in bfloat16 or float16 are computed in float32 (float64 stays float64): see the dtype table
//! in the [module docs](super).

use super::cross_entropy::check_targets;
use super::layer_norm::check_affine;
use super::softmax::mask_batch;
use candle_core::{bail, DType, Result, Tensor, D};

/// The dtype the portable ops compute in for inputs of `dtype`: float64 stays float64,
/// everything else (bfloat16, float16, float32) is float32, as PyTorch autocast runs its
/// float32 ops.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// `x` in its [`compute_dtype`] (the same tensor when it already is).
pub fn upcast(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(compute_dtype(x.dtype()))
}

/// The lowest finite value of a compute dtype.
fn lowest(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// The per-row shift of a stable exponential over `dim` (kept): the row maximum, as a constant
/// (the result never depends on it, so it needs no gradient), and the lowest finite value on
/// rows that are entirely −∞, so that `x − shift` stays −∞ there rather than NaN.
fn stable_shift(x: &Tensor, dim: usize) -> Result<Tensor> {
    x.max_keepdim(dim)?.detach().maximum(lowest(x.dtype()))
}

/// `log Σ exp(x)` over `dim` (removed), shifted by the row maximum: per row of logits, or, for
/// a vocabulary split into slices, over the slices' own log-sum-exps.
pub fn log_sum_exp(x: &Tensor, dim: usize) -> Result<Tensor> {
    let shift = stable_shift(x, dim)?;
    let sum = x.broadcast_sub(&shift)?.exp()?.sum_keepdim(dim)?;
    (sum.log()? + shift)?.squeeze(dim)
}

/// Softmax over the last dimension of `z` (already in its compute dtype). A row that is
/// entirely −∞ gives zeros, as the fused kernels do (PyTorch gives NaN).
fn stable_softmax(z: &Tensor) -> Result<Tensor> {
    let last = z.rank() - 1;
    let e = z.broadcast_sub(&stable_shift(z, last)?)?.exp()?;
    // At least 1 where the row has a finite entry (its maximum contributes exp(0)); 0 on a row
    // of −∞, whose `e` is all zeros. Adding 1 there (a constant) turns 0/0 into 0 with finite
    // gradients, and adds 0 everywhere else.
    let sum = e.sum_keepdim(last)?;
    let empty = sum.eq(0.0)?.to_dtype(sum.dtype())?;
    e.broadcast_div(&(sum + empty)?)
}

/// [`super::layer_norm`] composed: mean and biased variance (two passes, so a large mean
/// costs no precision) in the compute dtype; returns the compute dtype.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    check_affine(x, weight, bias)?;
    let dtype = compute_dtype(x.dtype());
    let x = x.to_dtype(dtype)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    centered
        .broadcast_mul(&rstd)?
        .broadcast_mul(&weight.to_dtype(dtype)?)?
        .broadcast_add(&bias.to_dtype(dtype)?)
}

/// [`super::softmax_last_dim`] composed, in the compute dtype (which it returns).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    stable_softmax(&upcast(x)?)
}

/// [`super::masked_softmax`] composed: `softmax(scale · scores + mask)` in the compute dtype
/// (which it returns); the mask gets no gradient.
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let z = (upcast(scores)? * scale)?;
    let z = match mask {
        None => z,
        Some(mask) => {
            let mask = mask.detach().to_dtype(z.dtype())?;
            // [B, T, S] → [B, 1, T, S]; [T, S] broadcasts as it is.
            let mask = match mask_batch(scores, &mask)? {
                1 if mask.rank() == 2 => mask,
                _ => mask.unsqueeze(1)?,
            };
            z.broadcast_add(&mask)?
        }
    };
    stable_softmax(&z)
}

/// [`super::gelu_erf`] composed: the erf and the products in the compute dtype; returns the
/// input's dtype (PyTorch's GELU is not an autocast op: it keeps its input's dtype and
/// computes in float32 internally).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    upcast(x)?.gelu_erf()?.to_dtype(x.dtype())
}

/// [`super::transpose_contiguous`] composed: a transposed view made contiguous, in the input's
/// dtype.
pub fn transpose_contiguous(x: &Tensor) -> Result<Tensor> {
    x.dims2()?;
    x.t()?.contiguous()
}

/// [`super::cross_entropy_rows`] composed: log-sum-exp and the picked logit in the compute
/// dtype (which it returns).
///
/// The targets are read on the host (one `[N]` transfer) to check them and to build the
/// gather indices; the logits never leave their device.
pub fn cross_entropy_rows(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
) -> Result<Tensor> {
    let (_, v) = logits.dims2()?;
    let columns = TargetColumns::new("cross_entropy_rows", logits, targets, ignore, 0, v)?;
    let x = upcast(logits)?;
    let picked = columns.picked(&x)?;
    (log_sum_exp(&x, 1)? - picked)?.mul(&columns.counted)
}

/// [`super::embedding_slice`] composed: candle's `index_select` (float32 u32 `ids`), the rows
/// of ids outside the slice zeroed by a mask built from the ids read on the host (which also
/// checks them).
pub fn embedding_slice(table: &Tensor, ids: &Tensor, slice: super::VocabSlice) -> Result<Tensor> {
    let v = table.dim(0)?;
    if slice == super::VocabSlice::whole(v) {
        return table.index_select(ids, 0);
    }
    let (mut local, mut mask) = (Vec::new(), Vec::new());
    for id in ids.to_vec1::<u32>()? {
        let id = id as usize;
        if id >= slice.vocab {
            bail!("token id {id} is outside the vocabulary of {}", slice.vocab);
        }
        let mine = (slice.start..slice.start + v).contains(&id);
        local.push(if mine { (id - slice.start) as u32 } else { 0 });
        mask.push(if mine { 1f32 } else { 0.0 });
    }
    let n = local.len();
    let local = Tensor::from_vec(local, n, table.device())?;
    let mask = Tensor::from_vec(mask, (n, 1), table.device())?.to_dtype(table.dtype())?;
    table.index_select(&local, 0)?.broadcast_mul(&mask)
}

/// [`super::cross_entropy_stats`] composed: `[2, N]` in the compute dtype (which it returns),
/// the log-sum-exp of each counted row and its target's logit where the slice holds it; zeros
/// on ignored rows. Reads the targets on the host, as [`cross_entropy_rows`] does.
pub fn cross_entropy_stats(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
    slice: super::VocabSlice,
) -> Result<Tensor> {
    let columns = TargetColumns::new(
        "cross_entropy_stats",
        logits,
        targets,
        ignore,
        slice.start,
        slice.vocab,
    )?;
    let x = upcast(logits)?;
    let lse = log_sum_exp(&x, 1)?.mul(&columns.counted)?;
    Tensor::stack(&[lse, columns.picked(&x)?], 0)
}

/// Where each row's target sits in a slice of columns of `[N, V]` logits, read from the host
/// targets: built once per loss, shared by the whole-vocabulary and the vocabulary-parallel
/// cross-entropy.
pub struct TargetColumns {
    /// `[N]` u32: the target's column in the slice, 0 where the slice does not hold it.
    pub index: Tensor,
    /// `[N]` compute dtype: 1 where the slice holds the (counted) target, else 0.
    pub owned: Tensor,
    /// `[N]` compute dtype: 1 for rows that count, 0 for rows whose target is `ignore`.
    pub counted: Tensor,
}

impl TargetColumns {
    /// For the slice of columns `start .. start + width` of a vocabulary of `vocab` classes;
    /// `logits` gives the device and dtype. A counted target outside the vocabulary is an
    /// error naming `op`.
    pub fn new(
        op: &str,
        logits: &Tensor,
        targets: &Tensor,
        ignore: Option<u32>,
        start: usize,
        vocab: usize,
    ) -> Result<Self> {
        let (n, width) = logits.dims2()?;
        check_targets(op, targets, n, width)?;
        let ids = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let (mut index, mut owned, mut counted) = (vec![0u32; n], vec![0f32; n], vec![0f32; n]);
        for (i, &t) in ids.iter().enumerate() {
            if Some(t) == ignore {
                continue;
            }
            let t = t as usize;
            if t >= vocab {
                bail!("{op}: target {t} is outside the {vocab} classes");
            }
            counted[i] = 1.0;
            if (start..start + width).contains(&t) {
                index[i] = (t - start) as u32;
                owned[i] = 1.0;
            }
        }
        let device = logits.device();
        let dtype = compute_dtype(logits.dtype());
        Ok(Self {
            index: Tensor::from_vec(index, n, device)?,
            owned: Tensor::from_vec(owned, n, device)?.to_dtype(dtype)?,
            counted: Tensor::from_vec(counted, n, device)?.to_dtype(dtype)?,
        })
    }

    /// `x[n, target[n]]` where the slice holds the target, else 0 (`x` in the compute dtype).
    pub fn picked(&self, x: &Tensor) -> Result<Tensor> {
        // candle's gather reads contiguous tensors only (the contrastive loss passes a transpose).
        x.contiguous()?
            .gather(&self.index.unsqueeze(1)?, 1)?
            .squeeze(1)?
            .mul(&self.owned)
    }
}
