//! Measuring a backend: all-reduce time and bandwidth in the NCCL-tests conventions.

use super::{Collective, ReduceOp};
use anyhow::{ensure, Result};
use std::time::Instant;

/// What [`bench_all_reduce`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AllReduceBench {
    /// Buffer size per member in bytes (`f32` elements × 4).
    pub bytes: usize,
    /// Members in the group.
    pub size: usize,
    /// Median seconds per all-reduce.
    pub seconds: f64,
    /// Fastest seconds per all-reduce.
    pub min_seconds: f64,
    /// Algorithm bandwidth: `bytes / seconds`, in GB/s (10⁹ bytes).
    pub algbw_gbps: f64,
    /// Bus bandwidth: `algbw × 2(n−1)/n`, what each link carries (NCCL-tests convention); 0 for
    /// a group of one.
    pub busbw_gbps: f64,
}

/// Times `iters` all-reduces of `bytes` (rounded down to whole `f32`s) after `warmup` untimed
/// ones; every member of `c` must call it with the same arguments. The buffer holds
/// [`pattern`] and is averaged ([`ReduceOp::Avg`], as costly as a sum) so that it stays finite
/// however many iterations run.
pub fn bench_all_reduce(
    c: &dyn Collective,
    bytes: usize,
    warmup: usize,
    iters: usize,
) -> Result<AllReduceBench> {
    let mut buf = pattern(bytes / 4, c.rank());
    time_all_reduce(
        c.size(),
        buf.len() * 4,
        warmup,
        iters,
        || c.barrier(),
        || c.all_reduce(&mut buf, ReduceOp::Avg),
    )
}

/// The values a member's benchmark buffer of `len` floats starts with (finite, rank-dependent).
pub fn pattern(len: usize, rank: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 31 + rank * 17) % 1024) as f32 * 0.25)
        .collect()
}

/// The figures of a group of `size` members all-reducing `bytes` each: `all_reduce` runs
/// `warmup` times untimed, then `iters` times, each after `barrier` so that the figure excludes
/// the members' skew; the median and the fastest are reported. Any backend's benchmark (host
/// rings, NCCL on device buffers) times itself through this.
pub fn time_all_reduce(
    size: usize,
    bytes: usize,
    warmup: usize,
    iters: usize,
    mut barrier: impl FnMut() -> Result<()>,
    mut all_reduce: impl FnMut() -> Result<()>,
) -> Result<AllReduceBench> {
    ensure!(iters > 0, "bench_all_reduce: iters must be at least 1");
    for _ in 0..warmup {
        all_reduce()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        barrier()?;
        let t = Instant::now();
        all_reduce()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    let algbw_gbps = bytes as f64 / seconds / 1e9;
    Ok(AllReduceBench {
        bytes,
        size,
        seconds,
        min_seconds: times[0],
        algbw_gbps,
        busbw_gbps: algbw_gbps * 2.0 * (size - 1) as f64 / size as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::SingleProcess;

    #[test]
    fn bench_single_process() {
        let b = bench_all_reduce(&SingleProcess, 4096, 1, 3).unwrap();
        assert_eq!((b.bytes, b.size, b.busbw_gbps), (4096, 1, 0.0));
        assert!(b.seconds >= 0.0 && b.min_seconds <= b.seconds);
    }
}
