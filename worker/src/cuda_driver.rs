//! Checks before a CUDA device is opened, so that a machine that cannot run this build fails
//! with the cause and what to do, not with a driver error code at the first kernel: a driver
//! that initialises, one new enough for the build's PTX (CUDA 13.0, driver 580 or newer), and
//! a device index among the visible GPUs.

use anyhow::{bail, Result};

/// The CUDA version this build's PTX needs from the driver (`cuDriverGetVersion`'s encoding,
/// 1000 × major + 10 × minor): CUDA 13.0, the toolchain `scripts/cuda/toolchain.sh` pins.
pub const REQUIRED_DRIVER_CUDA: i32 = 13000;

/// Checks the driver and that `ordinal` names a visible GPU (CPU builds have nothing to check).
#[cfg(feature = "cuda")]
pub fn check(ordinal: usize) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "(unset)".into());
    if let Err(e) = result::init() {
        bail!(
            "the NVIDIA driver did not initialise ({e}): this is the CUDA build; run it where a \
             GPU and its driver (580 or newer) are installed, or use the CPU build \
             (target/release/coca-worker) with --device cpu"
        );
    }
    let mut version = 0;
    // SAFETY: cuDriverGetVersion writes one int through the pointer, which outlives the call.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| anyhow::anyhow!("asking the NVIDIA driver for its CUDA version: {e}"))?;
    let count = result::device::get_count()
        .map_err(|e| anyhow::anyhow!("counting the visible GPUs: {e}"))?;
    check_values(version, count.max(0) as usize, ordinal, &visible)
}

/// A CPU build opens no CUDA device.
#[cfg(not(feature = "cuda"))]
pub fn check(_ordinal: usize) -> Result<()> {
    Ok(())
}

/// The checks on what the driver reported: its CUDA `version`, `count` visible GPUs, the
/// requested `ordinal`, and `CUDA_VISIBLE_DEVICES` as set (for the message). Plain values, so
/// the CPU build's tests check every message.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn check_values(version: i32, count: usize, ordinal: usize, visible: &str) -> Result<()> {
    if version < REQUIRED_DRIVER_CUDA {
        bail!(
            "the NVIDIA driver supports CUDA {}.{}, and this build needs {}.{} (driver 580 or \
             newer): update the driver, or use the CPU build with --device cpu",
            version / 1000,
            version % 1000 / 10,
            REQUIRED_DRIVER_CUDA / 1000,
            REQUIRED_DRIVER_CUDA % 1000 / 10
        );
    }
    if count == 0 {
        bail!("no GPU is visible (CUDA_VISIBLE_DEVICES={visible}): use --device cpu");
    }
    if ordinal >= count {
        bail!(
            "--device cuda:{ordinal}, but {count} GPU(s) are visible (CUDA_VISIBLE_DEVICES=\
             {visible}): the index counts the visible GPUs from 0"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_drivers_missing_gpus_and_bad_indices_are_named() {
        assert!(check_values(13000, 1, 0, "0").is_ok());
        assert!(check_values(13020, 8, 7, "(unset)").is_ok());
        let old = check_values(12080, 1, 0, "0").unwrap_err().to_string();
        assert!(
            old.contains("supports CUDA 12.8") && old.contains("needs 13.0"),
            "{old}"
        );
        assert!(old.contains("--device cpu"), "{old}");
        let none = check_values(13000, 0, 0, "").unwrap_err().to_string();
        assert!(none.contains("no GPU is visible"), "{none}");
        let index = check_values(13000, 2, 2, "4,5").unwrap_err().to_string();
        assert!(
            index.contains("cuda:2") && index.contains("2 GPU(s)") && index.contains("4,5"),
            "{index}"
        );
    }
}
