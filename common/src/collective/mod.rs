//! Collective communication over a process group: the one interface that data, sharding and
//! tensor parallelism are written against.
//!
//! Backends: [`SingleProcess`] (a group of one: every operation is the identity), the CPU ring
//! over TCP (`ring`), and later NCCL on GPUs. Buffers are `f32` slices; callers flatten tensors.
//!
//! Contract shared by every backend:
//! - Every member calls the same operations in the same order with the same lengths; a length
//!   that differs between members is an error on at least one member, never a hang.
//! - All-reduce leaves bit-identical results on every member (so replicas never drift apart).
//! - A peer that dies makes the pending operation fail promptly on the others (a closed socket
//!   is an error, not a wait).

use anyhow::{ensure, Result};
use std::time::Duration;

pub mod bench;
pub mod memory_kv;
pub mod ring;

pub use self::memory_kv::MemoryKeyValue;
pub use self::ring::RingCollective;

/// Reduction applied by all-reduce and reduce-scatter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise sum divided by the group size.
    Avg,
}

/// A process group that can run collectives. Shared between threads (`&self` everywhere), so
/// autograd operations can hold it in an `Arc`.
pub trait Collective: Send + Sync {
    /// This process's index in the group, `0..size()`.
    fn rank(&self) -> usize;

    /// Number of members.
    fn size(&self) -> usize;

    /// In place: every member ends with the reduction over members of `buf`.
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;

    /// `output.len() == input.len() × size()`; member `i`'s input lands in
    /// `output[i·n .. (i+1)·n]`.
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()>;

    /// `input.len() == output.len() × size()`; `output` is the reduction over members of their
    /// `input[rank·n .. (rank+1)·n]`.
    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()>;

    /// Copies member `root`'s `buf` into every member's `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;

    /// Returns once every member has entered it.
    fn barrier(&self) -> Result<()>;
}

/// A group of one process: every collective is the identity. Runs by hand (no launcher) use it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce(&self, _buf: &mut [f32], _op: ReduceOp) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()> {
        ensure!(
            input.len() == output.len(),
            "all_gather: output has {} elements, expected {}",
            output.len(),
            input.len()
        );
        output.copy_from_slice(input);
        Ok(())
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], _op: ReduceOp) -> Result<()> {
        self.all_gather(input, output)
    }

    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        ensure!(root == 0, "broadcast: root {root} outside a group of 1");
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// A group that knows its rank and size but cannot communicate: every collective is an
/// error. For building one rank's share of something (a tensor-parallel shard, a ZeRO
/// partition) without its peers, e.g. in memory reports and layout checks.
#[derive(Debug, Clone, Copy)]
pub struct LayoutOnly {
    pub rank: usize,
    pub size: usize,
}

impl LayoutOnly {
    fn refuse(&self) -> Result<()> {
        anyhow::bail!(
            "a layout-only group (member {} of {}) cannot communicate",
            self.rank,
            self.size
        )
    }
}

impl Collective for LayoutOnly {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, _: &mut [f32], _: ReduceOp) -> Result<()> {
        self.refuse()
    }

    fn all_gather(&self, _: &[f32], _: &mut [f32]) -> Result<()> {
        self.refuse()
    }

    fn reduce_scatter(&self, _: &[f32], _: &mut [f32], _: ReduceOp) -> Result<()> {
        self.refuse()
    }

    fn broadcast(&self, _: &mut [f32], _: usize) -> Result<()> {
        self.refuse()
    }

    fn barrier(&self) -> Result<()> {
        self.refuse()
    }
}

/// The key-value store the control plane offers, as far as collectives need it: backends
/// publish their endpoints under a key and read their peers'.
pub trait KeyValue: Send + Sync {
    /// Stores `value` under `key` (overwriting).
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;

    /// Blocks until `key` has a value or `timeout` passes (an error naming the key).
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>>;
}
