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
//! The collectives exchange host float32 buffers: a tensor on another device or in another
//! dtype is staged through the host as float32 and back (see `on_host`), gradients included.

use super::f32_data;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use coca_common::collective::{Collective, ReduceOp};
use std::sync::Arc;

/// A collective error as a candle error (the collective's message names group and peer).
fn comm_err(op: &str, e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: {e:#}"))
}

/// `op` of `x` as a host float32 tensor: `x` itself when it is one, else a copy (moved to the
/// CPU, cast to float32) whose result goes back to `x`'s device and dtype. Both moves carry
/// gradients, so the collectives' autograd works on every device until device collectives
/// (NCCL) replace the host ring.
fn on_host(x: &Tensor, op: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return op(x);
    }
    op(&x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?
        .to_dtype(x.dtype())?
        .to_device(x.device())
}

/// Row counts of every member for a local tensor of `rows` rows.
fn member_rows(comm: &dyn Collective, rows: usize) -> Result<Vec<usize>> {
    let mut counts = vec![0f32; comm.size()];
    comm.all_gather(&[rows as f32], &mut counts)
        .map_err(|e| comm_err("gathering row counts", e))?;
    Ok(counts.into_iter().map(|c| c as usize).collect())
}

/// Concatenates `x` `[n_r, ...]` of every member `r` along dim 0, in member order. The gradient
/// of each member's rows is the sum over members of the gradients of those rows.
pub fn all_gather_rows(x: &Tensor, comm: &Arc<dyn Collective>) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(x.clone());
    }
    let counts = member_rows(comm.as_ref(), x.dim(0)?)?;
    on_host(x, |x| {
        x.contiguous()?.apply_op1(AllGatherRows {
            comm: comm.clone(),
            counts,
        })
    })
}

/// Like [`all_gather_rows`] without a gradient path: the other members' rows as constants.
/// Also returns the offset of this member's rows.
pub fn gather_rows_detached(x: &Tensor, comm: &Arc<dyn Collective>) -> Result<(Tensor, usize)> {
    if comm.size() == 1 {
        return Ok((x.detach(), 0));
    }
    let counts = member_rows(comm.as_ref(), x.dim(0)?)?;
    let offset = counts[..comm.rank()].iter().sum();
    let all = on_host(&x.detach(), |x| {
        x.contiguous()?.apply_op1_no_bwd(&AllGatherRows {
            comm: comm.clone(),
            counts,
        })
    })?;
    Ok((all, offset))
}

/// Row counts and the group that [`all_gather_rows`] gathers over.
struct AllGatherRows {
    comm: Arc<dyn Collective>,
    counts: Vec<usize>,
}

impl AllGatherRows {
    fn max_rows(&self) -> usize {
        self.counts.iter().copied().max().unwrap_or(0)
    }
}

impl CustomOp1 for AllGatherRows {
    fn name(&self) -> &'static str {
        "all-gather-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), storage, layout)?;
        let dims = layout.shape().dims();
        let row: usize = dims[1..].iter().product();
        let max = self.max_rows();
        // Equal-length contributions: pad every member to the longest, then drop the padding.
        let mut padded = vec![0f32; max * row];
        padded[..x.len()].copy_from_slice(x);
        let mut gathered = vec![0f32; max * row * self.counts.len()];
        self.comm
            .all_gather(&padded, &mut gathered)
            .map_err(|e| comm_err(self.name(), e))?;
        let mut out = Vec::with_capacity(self.counts.iter().sum::<usize>() * row);
        for (member, &n) in self.counts.iter().enumerate() {
            let start = member * max * row;
            out.extend_from_slice(&gathered[start..start + n * row]);
        }
        let mut shape = dims.to_vec();
        shape[0] = self.counts.iter().sum();
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let grad = grad.flatten_all()?.to_vec1::<f32>()?;
        let row: usize = arg.dims()[1..].iter().product();
        let max = self.max_rows();
        let mut padded = vec![0f32; max * row * self.counts.len()];
        let mut from = 0;
        for (member, &n) in self.counts.iter().enumerate() {
            let start = member * max * row;
            padded[start..start + n * row].copy_from_slice(&grad[from..from + n * row]);
            from += n * row;
        }
        let mut mine = vec![0f32; max * row];
        self.comm
            .reduce_scatter(&padded, &mut mine, ReduceOp::Sum)
            .map_err(|e| comm_err("all-gather-rows backward", e))?;
        mine.truncate(arg.elem_count());
        Ok(Some(Tensor::from_vec(mine, arg.shape(), arg.device())?))
    }
}

/// Which way the all-reduce of the tensor-parallel pair goes.
#[derive(Clone, Copy)]
enum PairDirection {
    /// Identity forward, all-reduce backward.
    Copy,
    /// All-reduce forward, identity backward.
    Reduce,
}

struct GroupPair {
    comm: Arc<dyn Collective>,
    direction: PairDirection,
}

fn all_reduce_tensor(comm: &dyn Collective, x: &Tensor) -> Result<Tensor> {
    let mut data = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    comm.all_reduce(&mut data, ReduceOp::Sum)
        .map_err(|e| comm_err("all-reduce", e))?;
    Tensor::from_vec(data, x.shape(), x.device())
}

impl CustomOp1 for GroupPair {
    fn name(&self) -> &'static str {
        match self.direction {
            PairDirection::Copy => "copy-to-group",
            PairDirection::Reduce => "reduce-from-group",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), storage, layout)?;
        let mut data = x.to_vec();
        if let PairDirection::Reduce = self.direction {
            self.comm
                .all_reduce(&mut data, ReduceOp::Sum)
                .map_err(|e| comm_err(self.name(), e))?;
        }
        Ok((CpuStorage::F32(data), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match self.direction {
            PairDirection::Copy => all_reduce_tensor(self.comm.as_ref(), grad)?,
            PairDirection::Reduce => grad.clone(),
        }))
    }
}

/// Identity forward; the backward sums the gradient over the group (the input of a
/// column-parallel layer, whose members each see only part of the output).
pub fn copy_to_group(x: &Tensor, comm: &Arc<dyn Collective>) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(x.clone());
    }
    on_host(x, |x| {
        x.contiguous()?.apply_op1(GroupPair {
            comm: comm.clone(),
            direction: PairDirection::Copy,
        })
    })
}

/// Sums `x` over the group; the backward passes the gradient through (the output of a
/// row-parallel layer, whose members each hold a partial sum).
pub fn reduce_from_group(x: &Tensor, comm: &Arc<dyn Collective>) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(x.clone());
    }
    on_host(x, |x| {
        x.contiguous()?.apply_op1(GroupPair {
            comm: comm.clone(),
            direction: PairDirection::Reduce,
        })
    })
}
