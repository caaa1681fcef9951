//! Collectives as autograd operations, so that a loss spanning several processes backpropagates
//! into each process's own activations.
//!
//! - [`all_gather_rows`]: concatenates every member's rows (members may hold different row
//!   counts); the backward sums the gathered gradient over members and hands each its own rows
//!   (a reduce-scatter) — open_clip's `gather_with_grad`.
//! - [`copy_to_group`] / [`reduce_from_group`]: Megatron's pair for tensor parallelism —
//!   identity forward with an all-reduced backward, and the reverse.
//!
//! Every member must apply the same operations in the same order, forward and backward; candle's
//! backward visits the graph in a deterministic order, so identical graphs keep members in step.
//!
//! The exchanges go through a [`Communicator`] on flat float32 buffers where the tensors live,
//! as the trainer's gradients do: host vectors for CPU tensors, device tensors otherwise (and
//! on the CPU under `COCA_FLAT_BUFFERS=tensors`) — NCCL's collectives in a GPU job of the NCCL
//! build, a host copy on the host transport. Half-precision tensors are exchanged as
//! float32 (the cast carries gradients). The row counts (a few numbers) go over the group's host
//! transport.

use super::f32_data;
use crate::comm::{Communicator, FlatBuffer, Placement, PlacementRule};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use coca_common::collective::ReduceOp;
use std::sync::{Arc, OnceLock};

/// A collective error as a candle error (the collective's message names group and peer; a
/// peer's closed connection is recorded for the exit code, which the text cannot carry).
fn comm_err(op: &str, e: anyhow::Error) -> candle_core::Error {
    crate::comm::peer_failure::note_collective_error(&e);
    candle_core::Error::Msg(format!("{op}: {e:#}"))
}

/// `x`'s values as a float32 buffer where `x` lives: a host vector for a CPU tensor (unless
/// `COCA_FLAT_BUFFERS=tensors` asks for the device code path there too), else a tensor — a
/// copy, since a device communicator reduces in place and `x` may share its storage with the
/// graph.
fn flat(op: &str, x: &Tensor) -> Result<FlatBuffer> {
    let x = x.to_dtype(DType::F32)?.flatten_all()?;
    match buffer_rule()
        .map_err(|e| comm_err(op, anyhow::anyhow!(e)))?
        .placement(x.device())
    {
        Placement::Host => Ok(FlatBuffer::Host(x.to_vec1::<f32>()?)),
        Placement::Device(_) => {
            FlatBuffer::from_tensor(&x.force_contiguous()?).map_err(|e| comm_err(op, e))
        }
    }
}

/// [`PlacementRule::from_env`], read once per process (the trainer reads it once too).
fn buffer_rule() -> std::result::Result<PlacementRule, String> {
    static RULE: OnceLock<std::result::Result<PlacementRule, String>> = OnceLock::new();
    RULE.get_or_init(|| PlacementRule::from_env().map_err(|e| format!("{e:#}")))
        .clone()
}

/// `buf` as a tensor of `shape` on `like`'s device, in `like`'s dtype.
fn unflat(buf: FlatBuffer, shape: &[usize], like: &Tensor) -> Result<Tensor> {
    let t = match buf {
        FlatBuffer::Host(v) => Tensor::from_vec(v, shape, like.device())?,
        FlatBuffer::Device(t) => t.reshape(shape)?,
    };
    t.to_dtype(like.dtype())
}

/// The sum of `x` over the group (no gradient path).
fn all_reduce_tensor(op: &str, comm: &dyn Communicator, x: &Tensor) -> Result<Tensor> {
    let mut buf = flat(op, x)?;
    comm.all_reduce(&mut buf, ReduceOp::Sum)
        .map_err(|e| comm_err(op, e))?;
    unflat(buf, x.dims(), x)
}

/// Row counts of every member for a local tensor of `rows` rows.
fn member_rows(comm: &dyn Communicator, rows: usize) -> Result<Vec<usize>> {
    let mut counts = vec![0f32; comm.size()];
    comm.transport()
        .all_gather(&[rows as f32], &mut counts)
        .map_err(|e| comm_err("gathering row counts", e))?;
    Ok(counts.into_iter().map(|c| c as usize).collect())
}

/// `parts` concatenated along dim 0, skipping empty ones (`[0, rest...]` if all are).
fn cat_rows(parts: Vec<Tensor>, like: &Tensor) -> Result<Tensor> {
    let parts: Vec<Tensor> = parts
        .into_iter()
        .filter(|p| p.dim(0).unwrap_or(0) > 0)
        .collect();
    if parts.is_empty() {
        let mut shape = like.dims().to_vec();
        shape[0] = 0;
        return Tensor::zeros(shape.as_slice(), like.dtype(), like.device());
    }
    Tensor::cat(&parts, 0)
}

/// The rows of `[Σ counts, ...]` `x`, member by member, each padded with zero rows to the
/// longest member's count: the equal blocks a reduce-scatter exchanges.
fn padded_blocks(x: &Tensor, counts: &[usize]) -> Result<Tensor> {
    let max = counts.iter().copied().max().unwrap_or(0);
    let mut parts = Vec::with_capacity(counts.len());
    let mut start = 0;
    for &n in counts {
        parts.push(x.narrow(0, start, n)?.pad_with_zeros(0, 0, max - n)?);
        start += n;
    }
    cat_rows(parts, x)
}

/// Every member's rows of `x` (no gradient path), in member order.
fn gather(x: &Tensor, comm: &dyn Communicator, counts: &[usize]) -> Result<Tensor> {
    let op = "all-gather-rows";
    let max = counts.iter().copied().max().unwrap_or(0);
    // Equal blocks: this member's rows padded to the longest member's.
    let mine = x.pad_with_zeros(0, 0, max - x.dim(0)?)?;
    let all = comm
        .all_gather(&flat(op, &mine)?)
        .map_err(|e| comm_err(op, e))?;
    let mut shape = x.dims().to_vec();
    shape[0] = max * counts.len();
    let all = unflat(all, &shape, x)?;
    let parts = counts
        .iter()
        .enumerate()
        .map(|(member, &n)| all.narrow(0, member * max, n))
        .collect::<Result<Vec<_>>>()?;
    cat_rows(parts, x)
}

/// What the gradient of a group op's output becomes for its input.
#[derive(Clone)]
enum Backward {
    /// Passed through (the sum over the group in the forward pass).
    PassThrough,
    /// Summed over the group (an identity forward pass feeding split layers).
    AllReduce,
    /// Of the gathered rows: each member's own rows, summed over the members' gradients.
    OwnRowsSummed { counts: Vec<usize> },
}

/// `target`'s output is `value`'s values (computed beside the graph by a collective); its
/// gradient is the output's, transformed by `backward` over `comm`.
struct GroupOp {
    comm: Arc<dyn Communicator>,
    backward: Backward,
}

impl CustomOp2 for GroupOp {
    fn name(&self) -> &'static str {
        match self.backward {
            Backward::PassThrough => "reduce-from-group",
            Backward::AllReduce => "copy-to-group",
            Backward::OwnRowsSummed { .. } => "all-gather-rows",
        }
    }

    /// The backward pass moves gradients: it reads no result and no argument's values (only
    /// the target's shape), so the graph holds handles and may drop them (a row-parallel
    /// product, its sum over the group and the sum's copy).
    fn bwd_reads_result(&self) -> bool {
        false
    }

    fn bwd_reads_args(&self) -> bool {
        false
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let value = f32_data(self.name(), s2, l2)?;
        Ok((CpuStorage::F32(value.to_vec()), l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::copy_f32(self.name(), s2, l2)
    }

    fn bwd(
        &self,
        target: &Tensor,
        _value: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = match &self.backward {
            Backward::PassThrough => grad.clone(),
            Backward::AllReduce => all_reduce_tensor(self.name(), self.comm.as_ref(), grad)?,
            Backward::OwnRowsSummed { counts } => {
                let op = "all-gather-rows backward";
                let rank = self.comm.rank();
                let blocks = padded_blocks(grad, counts)?;
                let mine = self
                    .comm
                    .reduce_scatter(&flat(op, &blocks)?, ReduceOp::Sum)
                    .map_err(|e| comm_err(op, e))?;
                let mut shape = grad.dims().to_vec();
                shape[0] = counts.iter().copied().max().unwrap_or(0);
                let mine = unflat(mine, &shape, grad)?.narrow(0, 0, counts[rank])?;
                // Only this member's rows of the gathered tensor lead back to its input.
                let offset: usize = counts[..rank].iter().sum();
                let after = target.dim(0)? - offset - counts[rank];
                mine.pad_with_zeros(0, offset, after)?
            }
        };
        Ok((Some(grad), None))
    }
}

/// `op` applied to `x` in float32 (the collectives exchange float32), its result in `x`'s dtype.
fn in_f32(x: &Tensor, op: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return op(x);
    }
    op(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
}

/// Every member's rows of `x` in member order: this member's own rows tracked, the others
/// constants.
fn own_rows_tracked(x: &Tensor, comm: &dyn Communicator, counts: &[usize]) -> Result<Tensor> {
    let all = gather(&x.detach(), comm, counts)?;
    let offset: usize = counts[..comm.rank()].iter().sum();
    let n = x.dim(0)?;
    let before = all.narrow(0, 0, offset)?;
    let after = all.narrow(0, offset + n, all.dim(0)? - offset - n)?;
    Tensor::cat(&[&before, x, &after], 0)
}

/// Concatenates `x` `[n_r, ...]` of every member `r` along dim 0, in member order. The gradient
/// of each member's rows is the sum over members of the gradients of those rows.
pub fn all_gather_rows(x: &Tensor, comm: &Arc<dyn Communicator>) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(x.clone());
    }
    let counts = member_rows(comm.as_ref(), x.dim(0)?)?;
    in_f32(x, |x| {
        let tracked = own_rows_tracked(x, comm.as_ref(), &counts)?;
        // The op sums every member's gradient of the tracked rows.
        tracked.apply_op2(
            &tracked,
            GroupOp {
                comm: comm.clone(),
                backward: Backward::OwnRowsSummed { counts },
            },
        )
    })
}

/// Like [`all_gather_rows`], but the gradient reaches only this member's own rows, from this
/// member's loss (the other members' rows are constants): open_clip's gather without
/// `gather_with_grad`.
pub fn gather_rows_keeping_own(x: &Tensor, comm: &Arc<dyn Communicator>) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(x.clone());
    }
    let counts = member_rows(comm.as_ref(), x.dim(0)?)?;
    in_f32(x, |x| own_rows_tracked(x, comm.as_ref(), &counts))
}

/// [`gather_rows_keeping_own`] where every member holds as many rows as this one (known
/// beforehand): one all-gather, without exchanging row counts first.
pub fn gather_equal_rows_keeping_own(x: &Tensor, comm: &Arc<dyn Communicator>) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(x.clone());
    }
    let counts = vec![x.dim(0)?; comm.size()];
    in_f32(x, |x| own_rows_tracked(x, comm.as_ref(), &counts))
}

/// The sum of `x` over the group, as a constant (no gradient path): a count or a statistic every
/// member needs, summed where `x` lives (on the device in a GPU job, so nothing waits for it).
pub fn sum_over_group(x: &Tensor, comm: &Arc<dyn Communicator>) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(x.detach());
    }
    all_reduce_tensor("sum-over-group", comm.as_ref(), &x.detach())
}

/// Identity forward; the backward sums the gradient over the group (the input of a
/// column-parallel layer, whose members each see only part of the output).
pub fn copy_to_group(x: &Tensor, comm: &Arc<dyn Communicator>) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(x.clone());
    }
    in_f32(x, |x| {
        let x = x.contiguous()?;
        x.apply_op2(
            &x,
            GroupOp {
                comm: comm.clone(),
                backward: Backward::AllReduce,
            },
        )
    })
}

/// Sums `x` over the group; the backward passes the gradient through (the output of a
/// row-parallel layer, whose members each hold a partial sum).
pub fn reduce_from_group(x: &Tensor, comm: &Arc<dyn Communicator>) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(x.clone());
    }
    in_f32(x, |x| {
        let sum = all_reduce_tensor("reduce-from-group", comm.as_ref(), &x.detach())?;
        x.contiguous()?.apply_op2(
            &sum,
            GroupOp {
                comm: comm.clone(),
                backward: Backward::PassThrough,
            },
        )
    })
}
