//! The CUDA settings a training process needs, applied once when its device is opened:
//! no per-allocation event tracking (every kernel runs on the device's one stream) and a memory
//! pool that keeps what it has reserved (the driver's default returns it at every
//! synchronisation, so each step would allocate from the OS again). A CPU build has nothing to
//! configure.

use anyhow::Result;
use candle_core::{DType, Device};

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

/// Bytes the device's memory pool hands out now and the most it handed out since
/// [`reset_pool_peak`] (what the tensors use, not what the pool reserved); `None` on the CPU.
#[cfg(feature = "cuda")]
pub fn pool_usage(device: &Device) -> Result<Option<(u64, u64)>> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    if !device.is_cuda() {
        return Ok(None);
    }
    device.synchronize()?;
    let get = |attribute| -> Result<u64> {
        let mut value = 0u64;
        // SAFETY: the device's default pool lives as long as its context; both attributes are
        // u64 values (cuuint64_t), as cuMemPoolGetAttribute requires.
        unsafe { pool_attribute(device, attribute, &mut value, false)? };
        Ok(value)
    };
    Ok(Some((
        get(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        get(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
    )))
}

/// Restarts the pool's high watermark from what it hands out now (nothing on the CPU).
#[cfg(feature = "cuda")]
pub fn reset_pool_peak(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    if !device.is_cuda() {
        return Ok(());
    }
    device.synchronize()?;
    let mut zero = 0u64;
    // SAFETY: as in `pool_usage`; setting USED_MEM_HIGH to 0 is its documented reset.
    unsafe { pool_attribute(device, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut zero, true) }
}

/// Reads (or with `set`, writes) a u64 attribute of the device's default memory pool.
///
/// # Safety
/// `attribute` must be one whose value is a u64.
#[cfg(feature = "cuda")]
unsafe fn pool_attribute(
    device: &Device,
    attribute: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    value: &mut u64,
    set: bool,
) -> Result<()> {
    use anyhow::Context;
    use candle_core::cuda_backend::cudarc::driver::result;
    let Device::Cuda(cuda) = device else {
        return Ok(());
    };
    let stream = cuda.cuda_stream();
    let pool = result::device::get_default_mem_pool(stream.context().cu_device())
        .context("querying the device's default memory pool")?;
    let pointer = (value as *mut u64).cast();
    if set {
        result::mem_pool::set_attribute(pool, attribute, pointer)
    } else {
        result::mem_pool::get_attribute(pool, attribute, pointer)
    }
    .context("the device memory pool's usage")?;
    Ok(())
}

/// A CPU build has no device memory pool.
#[cfg(not(feature = "cuda"))]
pub fn pool_usage(_device: &Device) -> Result<Option<(u64, u64)>> {
    Ok(None)
}

/// A CPU build has no device memory pool.
#[cfg(not(feature = "cuda"))]
pub fn reset_pool_peak(_device: &Device) -> Result<()> {
    Ok(())
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
        "this rank needs about {:.1} GiB on the GPU ({}); {:.1} GiB is free",
        gib(estimate.total_bytes),
        estimate.by_part(),
        gib(free)
    );
    tracing::info!("device memory: {needs}");
    anyhow::ensure!(
        estimate.total_bytes <= free,
        "{needs}: lower --per_device_train_batch_size, add --grad_checkpointing True or --bf16 \
         True, or raise --sharding_parallel_degree or --tensor_parallel_degree"
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

/// Refuses `--bf16 True` on a GPU without bfloat16 arithmetic (compute capability below 8.0,
/// before Ampere), naming the card's capability and the alternative; anything else passes.
pub fn check_precision(device: &Device, compute: DType) -> Result<()> {
    if compute != DType::BF16 {
        return Ok(());
    }
    match compute_capability(device)? {
        Some(capability) => bf16_supported(capability),
        None => Ok(()),
    }
}

/// Whether a GPU of compute capability `(major, minor)` computes in bfloat16.
fn bf16_supported((major, minor): (i32, i32)) -> Result<()> {
    anyhow::ensure!(
        major >= 8,
        "--bf16 True: this GPU (compute capability {major}.{minor}) has no bfloat16 arithmetic, \
         which needs 8.0 (Ampere) or newer; train with --fp16 True (loss scaling) or in float32"
    );
    Ok(())
}

/// The `(major, minor)` compute capability of a CUDA device; `None` on the CPU.
#[cfg(feature = "cuda")]
fn compute_capability(device: &Device) -> Result<Option<(i32, i32)>> {
    use anyhow::Context;
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    let Device::Cuda(cuda) = device else {
        return Ok(None);
    };
    let context = cuda.cuda_stream().context().clone();
    let get = |a| {
        context
            .attribute(a)
            .context("querying the GPU's compute capability")
    };
    Ok(Some((
        get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    )))
}

/// A CPU build has no GPU.
#[cfg(not(feature = "cuda"))]
fn compute_capability(_device: &Device) -> Result<Option<(i32, i32)>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_needs_ampere_and_names_the_alternative() {
        for ok in [(8, 0), (8, 6), (9, 0), (10, 0)] {
            assert!(bf16_supported(ok).is_ok(), "{ok:?}");
        }
        let e = format!("{:#}", bf16_supported((7, 5)).unwrap_err());
        assert!(e.contains("7.5") && e.contains("--fp16 True"), "{e}");
        // Float32, float16 and the CPU pass.
        assert!(check_precision(&Device::Cpu, DType::BF16).is_ok());
        assert!(check_precision(&Device::Cpu, DType::F16).is_ok());
    }
}
