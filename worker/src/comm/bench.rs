//! `bench-collectives`: all-reduce bandwidth of the communicator a job's gradients use, on the
//! device they live on (host rings on the CPU; NCCL on device buffers in a CUDA job of the NCCL
//! build), in NCCL-tests' conventions.

use super::{Communicator, FlatBuffer, Placement};
use anyhow::Result;
use coca_common::collective::bench::{pattern, time_all_reduce, AllReduceBench};
use coca_common::collective::ReduceOp;

/// Times `iters` all-reduces (average) of a `bytes` buffer placed as `placement` after `warmup`
/// untimed ones; every member of `comm` calls it with the same arguments. Each operation
/// returns once its result is in place (NCCL's wait for its stream), so the times are the
/// device's.
pub fn bench_all_reduce(
    comm: &dyn Communicator,
    placement: &Placement,
    bytes: usize,
    warmup: usize,
    iters: usize,
) -> Result<AllReduceBench> {
    let mut buf = FlatBuffer::from_host(pattern(bytes / 4, comm.rank()), placement)?;
    let len = buf.len();
    time_all_reduce(
        comm.size(),
        len * 4,
        warmup,
        iters,
        || comm.barrier(),
        || comm.all_reduce(&mut buf, ReduceOp::Avg),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::HostTransport;
    use candle_core::Device;

    #[test]
    fn host_and_tensor_buffers_are_timed_alike_in_a_group_of_one() {
        let comm = HostTransport::single();
        for placement in [Placement::Host, Placement::Device(Device::Cpu)] {
            let b = bench_all_reduce(comm.as_ref(), &placement, 4096, 1, 3).unwrap();
            assert_eq!((b.bytes, b.size, b.busbw_gbps), (4096, 1, 0.0));
            assert!(b.seconds >= 0.0 && b.min_seconds <= b.seconds);
        }
    }
}
