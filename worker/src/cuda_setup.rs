//! The CUDA settings a training process needs, applied once when its device is opened:
//! no per-allocation event tracking (every kernel runs on the device's one stream) and a memory
//! pool that keeps what it has reserved (the driver's default returns it at every
//! synchronisation, so each step would allocate from the OS again). A CPU build has nothing to
//! configure.

use anyhow::Result;
use candle_core::Device;

/// Applies the settings to a device just opened (before any tensor exists on it).
#[cfg(feature = "cuda")]
pub fn configure(device: &Device) -> Result<()> {
    use anyhow::Context;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let Device::Cuda(cuda) = device else {
        return Ok(());
    };
    // SAFETY: called right after the device is created, before any tensor exists on it; every
    // kernel and collective of this process is issued on the device's single stream
    // (`Device::new_cuda_with_stream`), so no cross-stream synchronisation is needed.
    unsafe { cuda.disable_event_tracking() };
    let stream = cuda.cuda_stream();
    let mut threshold = u64::MAX;
    // SAFETY: the pool is the device's default pool, alive as long as the context; the value
    // is a u64 as CU_MEMPOOL_ATTR_RELEASE_THRESHOLD requires.
    unsafe {
        let pool = result::device::get_default_mem_pool(stream.context().cu_device())
            .context("querying the device's default memory pool")?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .context("keeping the memory pool's reservations between steps")?;
    }
    Ok(())
}

/// Bytes of device memory in use (the whole card's total minus free: with the pool keeping its
/// reservations, about the peak this process reached); `None` on the CPU.
#[cfg(feature = "cuda")]
pub fn memory_in_use(device: &Device) -> Result<Option<u64>> {
    use anyhow::Context;
    use candle_core::cuda_backend::cudarc::driver::result;
    if !device.is_cuda() {
        return Ok(None);
    }
    device.synchronize()?;
    let (free, total) = result::mem_get_info().context("querying the device's free memory")?;
    Ok(Some((total - free) as u64))
}

/// A CPU build has no device memory to report.
#[cfg(not(feature = "cuda"))]
pub fn memory_in_use(_device: &Device) -> Result<Option<u64>> {
    Ok(None)
}

/// Refuses, before training, a layout whose estimated bytes per rank exceed the device's free
/// memory, naming the figures (the CPU is checked by the launcher against host memory).
pub fn check_fits(
    device: &Device,
    estimate: &crate::memory_estimate::MemoryEstimate,
) -> Result<()> {
    let Some(free) = free_memory(device)? else {
        return Ok(());
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let needs = format!(
        "this rank needs about {:.1} GiB on the GPU (weights {:.1}, gradients {:.1}, AdamW \
         moments {:.1}, activations {:.1} GiB); {:.1} GiB is free",
        gib(estimate.total_bytes),
        gib(estimate.parameter_bytes),
        gib(estimate.gradient_bytes),
        gib(estimate.optimizer_bytes),
        gib(estimate.activation_bytes),
        gib(free)
    );
    tracing::info!("device memory: {needs}");
    anyhow::ensure!(
        estimate.total_bytes <= free,
        "{needs}: lower --per_device_train_batch_size, or raise --sharding_parallel_degree or \
         --tensor_parallel_degree"
    );
    Ok(())
}

/// Free bytes on a CUDA device; `None` on the CPU.
#[cfg(feature = "cuda")]
fn free_memory(device: &Device) -> Result<Option<u64>> {
    use anyhow::Context;
    use candle_core::cuda_backend::cudarc::driver::result;
    if !device.is_cuda() {
        return Ok(None);
    }
    let (free, _) = result::mem_get_info().context("querying the device's free memory")?;
    Ok(Some(free as u64))
}

/// A CPU build has no device memory.
#[cfg(not(feature = "cuda"))]
fn free_memory(_device: &Device) -> Result<Option<u64>> {
    Ok(None)
}

/// A CPU build has no CUDA device to configure.
#[cfg(not(feature = "cuda"))]
pub fn configure(_device: &Device) -> Result<()> {
    Ok(())
}
