//! `bench-collectives`: all-reduce bandwidth of the communicator a job's gradients use, on the
//! device they live on (host rings on the CPU; NCCL on device buffers in a CUDA job of the NCCL
//! build), in NCCL-tests' conventions.

use super::{Communicator, FlatBuffer, Placement};
use anyhow::{ensure, Context, Result};
use coca_common::collective::bench::{pattern, time_all_reduce, AllReduceBench};
use coca_common::collective::ReduceOp;

/// Elements per member of [`check_against_host`]'s buffers (times the group's size).
const CHECK_LEN: usize = 4096;

/// Runs every operation of `comm` (all-reduce as a sum and as an average, all-gather,
/// reduce-scatter, broadcast from the last member, barrier) on buffers placed as `placement`,
/// and the same on `host`, the same group's host transport, whose results are the CPU's: the
/// proof that a backend (NCCL on device buffers) computes what the rings do. Fails naming the
/// first operation that differs by more than a float32 rounding; else returns each
/// operation's name and largest difference. Every member calls it alike.
pub fn check_against_host(
    comm: &dyn Communicator,
    host: &dyn Communicator,
    placement: &Placement,
) -> Result<Vec<(&'static str, f32)>> {
    let (rank, size) = (comm.rank(), comm.size());
    ensure!(
        (host.rank(), host.size()) == (rank, size),
        "the host transport is member {} of {}, the communicator {rank} of {size}",
        host.rank(),
        host.size()
    );
    let input = pattern(CHECK_LEN * size, rank);
    let on = |c: &dyn Communicator, p: &Placement, op: &str| -> Result<Vec<f32>> {
        let mut buf = FlatBuffer::from_host(input.clone(), p)?;
        let out = match op {
            "all_reduce_sum" => {
                c.all_reduce(&mut buf, ReduceOp::Sum)?;
                buf
            }
            "all_reduce_avg" => {
                c.all_reduce(&mut buf, ReduceOp::Avg)?;
                buf
            }
            "all_gather" => c.all_gather(&buf)?,
            "reduce_scatter" => c.reduce_scatter(&buf, ReduceOp::Sum)?,
            "broadcast" => {
                c.broadcast(&mut buf, size - 1)?;
                buf
            }
            "barrier" => {
                c.barrier()?;
                buf
            }
            other => anyhow::bail!("no collective named {other}"),
        };
        out.to_vec()
    };
    let ops = [
        "all_reduce_sum",
        "all_reduce_avg",
        "all_gather",
        "reduce_scatter",
        "broadcast",
        "barrier",
    ];
    // Every operation runs on every member before any is compared, so that a member whose
    // result differs does not leave the others waiting in the next collective.
    let mut results = Vec::new();
    for op in ops {
        let got = on(comm, placement, op).with_context(|| format!("{op} of the backend"))?;
        let want = on(host, &Placement::Host, op).with_context(|| format!("{op} on the host"))?;
        results.push((op, got, want));
    }
    let mut checked = Vec::new();
    for (op, got, want) in results {
        ensure!(
            got.len() == want.len(),
            "{op}: {} elements, the host transport's {}",
            got.len(),
            want.len()
        );
        let mut worst = 0f32;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let diff = (g - w).abs();
            ensure!(
                diff <= 1e-6 * w.abs().max(1.0),
                "{op}: element {i} is {g}, the host transport's {w} (member {rank} of {size})"
            );
            worst = worst.max(diff);
        }
        checked.push((op, worst));
    }
    Ok(checked)
}

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
    use crate::distributed::loopback_ring::on_loopback_ring;
    use candle_core::Device;
    use coca_common::collective::Collective;
    use std::sync::Arc;

    /// The host transport, with its all-gather's first element off by `error` on member 0.
    struct OffByOne {
        inner: Arc<dyn Communicator>,
        error: f32,
    }

    impl Communicator for OffByOne {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn size(&self) -> usize {
            self.inner.size()
        }
        fn all_reduce(&self, buf: &mut FlatBuffer, op: ReduceOp) -> Result<()> {
            self.inner.all_reduce(buf, op)
        }
        fn all_gather(&self, input: &FlatBuffer) -> Result<FlatBuffer> {
            let mut out = self.inner.all_gather(input)?;
            if self.rank() == 0 {
                let first = out.range(0..1)?.to_vec()?[0];
                out.set(0, first + self.error)?;
            }
            Ok(out)
        }
        fn reduce_scatter(&self, input: &FlatBuffer, op: ReduceOp) -> Result<FlatBuffer> {
            self.inner.reduce_scatter(input, op)
        }
        fn broadcast(&self, buf: &mut FlatBuffer, root: usize) -> Result<()> {
            self.inner.broadcast(buf, root)
        }
        fn barrier(&self) -> Result<()> {
            self.inner.barrier()
        }
        fn transport(&self) -> &Arc<dyn Collective> {
            self.inner.transport()
        }
    }

    #[test]
    fn every_operation_is_checked_against_the_host_transport_and_an_error_is_named() {
        // Three members, device buffers (CPU tensors) against the host rings: all equal.
        let reports = on_loopback_ring("check-collectives", 3, |_, ring| {
            let host = HostTransport::shared(ring);
            check_against_host(
                host.as_ref(),
                host.as_ref(),
                &Placement::Device(Device::Cpu),
            )
            .unwrap()
        });
        for checked in &reports {
            let names: Vec<&str> = checked.iter().map(|(op, _)| *op).collect();
            assert_eq!(
                names,
                [
                    "all_reduce_sum",
                    "all_reduce_avg",
                    "all_gather",
                    "reduce_scatter",
                    "broadcast",
                    "barrier"
                ]
            );
            assert!(checked.iter().all(|(_, diff)| *diff == 0.0), "{checked:?}");
        }
        // One element of one member's all-gather a quarter off: that member names it.
        let errors = on_loopback_ring("check-collectives-off", 2, |_, ring| {
            let host = HostTransport::shared(ring);
            let off = OffByOne {
                inner: host.clone(),
                error: 0.25,
            };
            check_against_host(&off, host.as_ref(), &Placement::Host)
                .err()
                .map(|e| format!("{e:#}"))
        });
        let text = errors[0].as_deref().expect("member 0's all-gather was off");
        assert!(
            text.contains("all_gather: element 0") && text.contains("member 0 of 2"),
            "{text}"
        );
        assert!(errors[1].is_none(), "{:?}", errors[1]);
    }

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
