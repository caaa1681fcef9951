//! Collectives over [`FlatBuffer`]s, wherever they live: the interface the trainer (gradient
//! reduction, ZeRO's reduce-scatter and all-gather, the clipping norm) is written against, so
//! that one trainer runs on every backend.
//!
//! [`HostTransport`] serves it with a host collective (the TCP ring of CPU jobs, or a single
//! process): host buffers are reduced in place; device buffers through a host copy — correct on
//! any device, and what a GPU job without NCCL uses. An NCCL backend implements
//! [`Communicator`] on device buffers in place.

pub mod bench;
mod buffer;
pub mod failure_signal;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod peer_failure;
pub mod unique_id;
pub mod watchdog;

pub use buffer::{FlatBuffer, Placement, PlacementRule};

/// `COCA_GPU_COLLECTIVES=nccl|host`: which backend a GPU job's collectives use (read by
/// `distributed::job_groups`; defined here, below it, for NCCL's messages too).
pub const GPU_COLLECTIVES_ENV: &str = "COCA_GPU_COLLECTIVES";

use anyhow::{ensure, Result};
use candle_core::Tensor;
use coca_common::collective::{Collective, ReduceOp, SingleProcess};
use std::sync::Arc;

/// Host buffers are all-reduced in buckets of this many elements (64 MiB of f32), which bounds
/// the transport's buffers without costing bandwidth.
const HOST_BUCKET: usize = 16 << 20;

/// A process group's collectives on flat buffers.
pub trait Communicator: Send + Sync {
    /// This process's index in the group, `0..size()`.
    fn rank(&self) -> usize;

    /// Number of members.
    fn size(&self) -> usize;

    /// In place: every member ends with the reduction over members of `buf`.
    fn all_reduce(&self, buf: &mut FlatBuffer, op: ReduceOp) -> Result<()>;

    /// Every member's `input` (equal lengths), concatenated in member order.
    fn all_gather(&self, input: &FlatBuffer) -> Result<FlatBuffer>;

    /// `input.len() = n × size()`: this member's `n` elements of the reduction over members.
    fn reduce_scatter(&self, input: &FlatBuffer, op: ReduceOp) -> Result<FlatBuffer>;

    /// Member `root`'s `buf` copied into every member's `buf`.
    fn broadcast(&self, buf: &mut FlatBuffer, root: usize) -> Result<()>;

    /// Returns once every member has entered it.
    fn barrier(&self) -> Result<()>;

    /// The host collective of the same group, for the model's collectives on activations
    /// (tensor parallelism, the contrastive loss's gathers).
    fn transport(&self) -> &Arc<dyn Collective>;
}

/// A host collective serving buffers anywhere (device buffers through a host copy).
#[derive(Clone)]
pub struct HostTransport(pub Arc<dyn Collective>);

impl HostTransport {
    /// `comm` as a shared [`Communicator`].
    pub fn shared(comm: Arc<dyn Collective>) -> Arc<dyn Communicator> {
        Arc::new(Self(comm))
    }

    /// A group of one process.
    pub fn single() -> Arc<dyn Communicator> {
        Self::shared(Arc::new(SingleProcess))
    }
}

/// Host data of a device buffer, and the buffer rebuilt from reduced host data.
fn via_host(buf: &FlatBuffer, f: impl FnOnce(&[f32]) -> Result<Vec<f32>>) -> Result<FlatBuffer> {
    let placement = buf.placement();
    let out = match buf {
        FlatBuffer::Host(v) => f(v)?,
        FlatBuffer::Device(t) => f(&t.to_vec1::<f32>()?)?,
    };
    FlatBuffer::from_host(out, &placement)
}

impl Communicator for HostTransport {
    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn size(&self) -> usize {
        self.0.size()
    }

    fn all_reduce(&self, buf: &mut FlatBuffer, op: ReduceOp) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        match buf {
            FlatBuffer::Host(v) => v
                .chunks_mut(HOST_BUCKET)
                .try_for_each(|bucket| self.0.all_reduce(bucket, op)),
            FlatBuffer::Device(t) => {
                let mut host = t.to_vec1::<f32>()?;
                self.0.all_reduce(&mut host, op)?;
                *t = Tensor::from_vec(host, t.elem_count(), t.device())?;
                Ok(())
            }
        }
    }

    fn all_gather(&self, input: &FlatBuffer) -> Result<FlatBuffer> {
        via_host(input, |x| {
            let mut out = vec![0f32; x.len() * self.size()];
            self.0.all_gather(x, &mut out)?;
            Ok(out)
        })
    }

    fn reduce_scatter(&self, input: &FlatBuffer, op: ReduceOp) -> Result<FlatBuffer> {
        let size = self.size();
        ensure!(
            input.len().is_multiple_of(size),
            "reduce-scatter of {} elements over {size} members",
            input.len()
        );
        via_host(input, |x| {
            let mut out = vec![0f32; x.len() / size];
            self.0.reduce_scatter(x, &mut out, op)?;
            Ok(out)
        })
    }

    fn broadcast(&self, buf: &mut FlatBuffer, root: usize) -> Result<()> {
        match buf {
            FlatBuffer::Host(v) => self.0.broadcast(v, root),
            FlatBuffer::Device(_) => {
                *buf = via_host(buf, |x| {
                    let mut x = x.to_vec();
                    self.0.broadcast(&mut x, root)?;
                    Ok(x)
                })?;
                Ok(())
            }
        }
    }

    fn barrier(&self) -> Result<()> {
        self.0.barrier()
    }

    fn transport(&self) -> &Arc<dyn Collective> {
        &self.0
    }
}
