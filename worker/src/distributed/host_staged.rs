//! CUDA forwards of the collective autograd ops through host memory: the storage is copied to
//! the host, the CPU forward (and its host collective) runs, and the result is copied back.
//! Correct on any device and what GPU workers use until their collectives run on the device
//! (NCCL); a CPU build compiles them against candle's stand-in CUDA types.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, Layout, Result, Shape};

/// A CPU forward of one or more storages.
type HostForward<'a, const N: usize> =
    dyn FnOnce([(&CpuStorage, &Layout); N]) -> Result<(CpuStorage, Shape)> + 'a;

/// Runs `forward` on host copies of `args` and returns its result on their device.
pub(crate) fn via_host<const N: usize>(
    args: [(&CudaStorage, &Layout); N],
    forward: Box<HostForward<'_, N>>,
) -> Result<(CudaStorage, Shape)> {
    let device = args[0].0.device().clone();
    let host = args
        .iter()
        .map(|(s, _)| s.to_cpu_storage())
        .collect::<Result<Vec<_>>>()?;
    let inputs: [(&CpuStorage, &Layout); N] = std::array::from_fn(|i| (&host[i], args[i].1));
    let (out, shape) = forward(inputs)?;
    Ok((device.storage_from_cpu_storage(&out)?, shape))
}
