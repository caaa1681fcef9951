//! Checks before a CUDA device is opened, so that a machine that cannot run this build fails
//! with the cause and what to do, not with a driver error code at the first kernel (or, as
//! cudarc does when a library is missing, a panic): the driver and the CUDA libraries present,
//! a driver that initialises, one new enough for the build's PTX (CUDA 13.0, driver 580 or
//! newer), and a device index among the visible GPUs.
//!
//! The CUDA build opens the driver and the libraries when a device is first asked for (cudarc's
//! `dynamic-loading`), so it starts, and computes on the CPU, where they are absent.

use anyhow::{bail, Result};

/// The CUDA version this build's PTX needs from the driver (`cuDriverGetVersion`'s encoding,
/// 1000 × major + 10 × minor): CUDA 13.0, the toolchain `scripts/cuda/toolchain.sh` pins.
pub const REQUIRED_DRIVER_CUDA: i32 = 13000;

/// Where the CUDA 13 libraries come from, for the messages that ask for them.
const WHERE_CUDA_LIBRARIES: &str =
    "a CUDA 13 toolkit's lib64, or PyTorch's site-packages/nvidia/cu13/lib";

/// Whether this build has CUDA and the driver's library loads (nothing is initialised: cheap
/// enough for the checks made before any worker starts).
#[cfg(feature = "cuda")]
pub fn driver_present() -> bool {
    // SAFETY: loading and unloading libcuda runs no CUDA call.
    unsafe { candle_core::cuda_backend::cudarc::driver::sys::is_culib_present() }
}

/// A CPU build uses no driver.
#[cfg(not(feature = "cuda"))]
pub fn driver_present() -> bool {
    false
}

/// Why `--device auto` computes on the CPU: the reason no GPU is usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoGpu {
    /// A CPU build.
    NotBuilt,
    /// libcuda.so.1 does not load: no NVIDIA driver on this machine.
    NoDriver,
    /// The driver loads but `cuInit` fails (a broken install, a driver/kernel mismatch).
    DriverFailed(String),
    /// The driver works and no GPU is visible (`CUDA_VISIBLE_DEVICES` as set).
    NoneVisible(String),
}

impl NoGpu {
    /// Whether the user should hear of it: a driver that is there but fails is a fault, the
    /// rest are how the machine is.
    pub fn is_fault(&self) -> bool {
        matches!(self, Self::DriverFailed(_))
    }
}

impl std::fmt::Display for NoGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotBuilt => f.write_str("this build has no CUDA"),
            Self::NoDriver => f.write_str("no NVIDIA driver (libcuda.so.1 could not be loaded)"),
            Self::DriverFailed(e) => write!(f, "the NVIDIA driver did not initialise ({e})"),
            Self::NoneVisible(visible) => {
                write!(f, "no GPU is visible (CUDA_VISIBLE_DEVICES={visible})")
            }
        }
    }
}

/// The driver loaded and initialised (`cuInit`, idempotent), or why not.
#[cfg(feature = "cuda")]
fn driver_ready() -> std::result::Result<(), NoGpu> {
    if !driver_present() {
        return Err(NoGpu::NoDriver);
    }
    candle_core::cuda_backend::cudarc::driver::result::init()
        .map_err(|e| NoGpu::DriverFailed(e.to_string()))
}

/// `None` when this process can compute on a GPU (the build has CUDA, the driver loads and
/// initialises, a GPU is visible), else why not. What `--device auto` asks; never fails.
#[cfg(feature = "cuda")]
pub fn why_no_gpu() -> Option<NoGpu> {
    use candle_core::cuda_backend::cudarc::driver::result;
    if let Err(why) = driver_ready() {
        return Some(why);
    }
    match result::device::get_count() {
        Ok(count) if count > 0 => None,
        _ => Some(NoGpu::NoneVisible(
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "(unset)".into()),
        )),
    }
}

/// A CPU build has no GPU to use.
#[cfg(not(feature = "cuda"))]
pub fn why_no_gpu() -> Option<NoGpu> {
    Some(NoGpu::NotBuilt)
}

/// Checks the driver, the libraries a device needs, and that `ordinal` names a visible GPU
/// (CPU builds have nothing to check).
#[cfg(feature = "cuda")]
pub fn check(ordinal: usize) -> Result<()> {
    use candle_core::cuda_backend::cudarc::{cublas, curand, driver::result, driver::sys};
    if let Err(why) = driver_ready() {
        bail!(
            "{why}: run GPU work where a GPU and its driver (580 or newer) are installed, or use \
             --device cpu"
        );
    }
    // SAFETY (both): loading and unloading a library runs no CUDA call.
    let libraries = [
        ("libcublas.so.13 (cuBLAS)", unsafe {
            cublas::sys::is_culib_present()
        }),
        ("libcurand.so.10 (cuRAND)", unsafe {
            curand::sys::is_culib_present()
        }),
    ];
    check_libraries(&libraries)?;
    check_cublas_major(cublas_major()?, || {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        mapped_library(&maps, "libcublas.so")
    })?;
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "(unset)".into());
    let mut version = 0;
    // SAFETY: cuDriverGetVersion writes one int through the pointer, which outlives the call.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| anyhow::anyhow!("asking the NVIDIA driver for its CUDA version: {e}"))?;
    let count = result::device::get_count()
        .map_err(|e| anyhow::anyhow!("counting the visible GPUs: {e}"))?;
    check_values(version, count.max(0) as usize, ordinal, &visible)
}

/// Names the CUDA libraries (of `(name, present)`) that could not be loaded, and where they
/// come from.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn check_libraries(libraries: &[(&str, bool)]) -> Result<()> {
    let missing: Vec<&str> = libraries
        .iter()
        .filter(|(_, present)| !present)
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        bail!(
            "the CUDA 13 libraries {} could not be loaded: put their folder on LD_LIBRARY_PATH \
             ({WHERE_CUDA_LIBRARIES}), or use --device cpu",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The major version of the cuBLAS that cudarc loaded. Its list of names starts with the
/// unversioned `libcublas.so` and ends with older ones (`libcublas.so.12`, `.11`, ...), so a
/// CUDA 12 toolkit on the library path would otherwise be taken without a word.
#[cfg(feature = "cuda")]
fn cublas_major() -> Result<i32> {
    use candle_core::cuda_backend::cudarc::cublas::sys;
    let mut major = 0;
    // SAFETY: cublasGetProperty writes one int through the pointer, which outlives the call,
    // and needs no handle or context.
    let status =
        unsafe { sys::cublasGetProperty(sys::libraryPropertyType::MAJOR_VERSION, &mut major) };
    if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        bail!("asking cuBLAS for its version: {status:?}");
    }
    Ok(major)
}

/// The file of the first library mapped into this process whose name starts with `stem`, from
/// the text of `/proc/self/maps`: which cuBLAS was loaded, for the message.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn mapped_library(maps: &str, stem: &str) -> Option<String> {
    maps.lines()
        .map(|line| {
            line.split_whitespace()
                .skip(5)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .find(|path| {
            std::path::Path::new(path)
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(stem))
        })
}

/// Refuses a cuBLAS of another CUDA major version than the build's; `file` tells where it was
/// loaded from, asked only for the message.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn check_cublas_major(major: i32, file: impl FnOnce() -> Option<String>) -> Result<()> {
    let required = REQUIRED_DRIVER_CUDA / 1000;
    if major != required {
        bail!(
            "the cuBLAS loaded ({}) is CUDA {major}'s, and this build needs CUDA {required}'s \
             libcublas.so.{required}: put its folder ({WHERE_CUDA_LIBRARIES}) first on \
             LD_LIBRARY_PATH, or use --device cpu",
            file().as_deref().unwrap_or("libcublas")
        );
    }
    Ok(())
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
    fn missing_libraries_are_named_with_where_they_come_from() {
        assert!(check_libraries(&[("a", true), ("b", true)]).is_ok());
        let err = check_libraries(&[("libcublas.so.13 (cuBLAS)", false), ("libthere.so", true)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("libcublas.so.13 (cuBLAS)"), "{err}");
        assert!(!err.contains("libthere.so"), "{err}");
        assert!(
            err.contains("LD_LIBRARY_PATH") && err.contains("--device cpu"),
            "{err}"
        );
    }

    #[test]
    fn a_cublas_of_another_cuda_is_refused_naming_its_file() {
        let maps =
            "7f00-7f10 r--p 00000000 08:01 42 /opt/cuda-12.4/lib64/libcublasLt.so.12.4.5.8\n\
                    7f10-7f20 r-xp 00001000 08:01 43 /opt/cuda 12/lib64/libcublas.so.12.4.5.8\n\
                    7f20-7f30 rw-p 00000000 00:00 0 [heap]\n";
        let file = mapped_library(maps, "libcublas.so");
        assert_eq!(
            file.as_deref(),
            Some("/opt/cuda 12/lib64/libcublas.so.12.4.5.8")
        );
        assert_eq!(mapped_library(maps, "libcurand.so"), None);
        assert!(check_cublas_major(13, || unreachable!("asked only for a message")).is_ok());
        let err = check_cublas_major(12, || file.clone())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/opt/cuda 12/lib64/libcublas.so.12.4.5.8")
                && err.contains("CUDA 12's")
                && err.contains("libcublas.so.13")
                && err.contains("LD_LIBRARY_PATH")
                && err.contains("--device cpu"),
            "{err}"
        );
        let unknown = check_cublas_major(11, || None).unwrap_err().to_string();
        assert!(unknown.contains("(libcublas) is CUDA 11's"), "{unknown}");
    }

    #[test]
    fn no_gpu_is_seen_without_a_driver() {
        // This holds on the machines CI and these tests run on (no NVIDIA driver); on a GPU
        // machine the check is that the answer and the driver's presence agree.
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            eprintln!("skipped: this machine has an NVIDIA driver");
            return;
        }
        assert!(why_no_gpu().is_some_and(|why| !why.is_fault()));
        if cfg!(feature = "cuda") {
            let err = check(0).unwrap_err().to_string();
            assert!(
                err.contains("libcuda.so.1") && err.contains("--device cpu"),
                "{err}"
            );
        }
    }

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
