//! `--device cpu|cuda|cuda:N|auto` (also PaddleMIX's `gpu`, `gpu:N`): the device a worker
//! computes on, as a value every command resolves once and hands to the model, the data and the
//! trainer. One code path serves every device; nothing below the command line names one.
//!
//! Under `coca-launch --nproc-per-node gpu` each worker sees one GPU in its
//! `CUDA_VISIBLE_DEVICES`, so `cuda` (ordinal 0) is that GPU. A CPU build (the default) refuses
//! CUDA with the command that builds a CUDA binary.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use std::fmt;
use std::str::FromStr;

/// What a CPU build says when CUDA is asked for.
pub const CUDA_BUILD_HINT: &str = "this coca-worker was built without CUDA: build one with \
     `scripts/cuda/build.sh` and run target/cuda/release/coca-worker (it computes on the CPU too)";

/// The device flag as the user wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The GPU when this build has CUDA and one is visible, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A CUDA device by ordinal among the visible ones (`cuda` = 0).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let cuda_ordinal = |index: &str| {
            index
                .parse::<usize>()
                .map(Self::Cuda)
                .map_err(|_| format!("`{s}`: the CUDA device index must be a number (e.g. cuda:0)"))
        };
        match lower.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other
                .strip_prefix("cuda:")
                .or_else(|| other.strip_prefix("gpu:"))
            {
                Some(index) => cuda_ordinal(index),
                None => Err(format!(
                    "unknown device `{s}`: expected cpu, cuda, cuda:N or auto"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl serde::Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether the launcher started this process as a GPU worker
/// ([`coca_common::topology::DEVICE_KIND_ENV`]).
pub fn launched_for_gpu() -> bool {
    std::env::var(coca_common::topology::DEVICE_KIND_ENV).as_deref() == Ok("gpu")
}

/// Refuses to be a GPU worker without CUDA: the launcher started one worker per GPU, and this
/// binary cannot use one.
pub fn check_launched_kind() -> Result<()> {
    if launched_for_gpu() && !cuda_built() {
        bail!(
            "the launcher started one worker per GPU (--nproc-per-node gpu/auto), but \
             {CUDA_BUILD_HINT}; or start CPU workers with --nproc-per-node N"
        );
    }
    Ok(())
}

/// Whether this binary was built with the `cuda` feature.
pub const fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

/// The device flags every compute command takes.
#[derive(Args, Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DeviceArgs {
    /// Where to compute: cpu, cuda, cuda:N (among CUDA_VISIBLE_DEVICES) or auto (the GPU when
    /// this build has CUDA and one is visible).
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// TF32 tensor cores for float32 matmuls on the GPU (off by default, as in PyTorch, so
    /// float32 equals the CPU at float32 tolerances).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false",
          value_parser = crate::cli::parse_bool)]
    pub tf32: bool,
}

impl DeviceArgs {
    /// What can be checked without touching a device (the launcher's pre-flight check): CUDA
    /// asked of a CPU build, `--tf32` on the CPU.
    pub fn check(&self) -> Result<()> {
        if self.tf32 && matches!(self.device, DeviceChoice::Cpu) {
            bail!("--tf32 applies to CUDA matmuls; --device cpu computes in float32");
        }
        if matches!(self.device, DeviceChoice::Cuda(_)) && !cuda_built() {
            bail!("--device {}: {CUDA_BUILD_HINT}", self.device);
        }
        Ok(())
    }

    /// Opens the chosen device and applies the precision settings.
    pub fn open(&self) -> Result<Device> {
        self.check()?;
        let device = self.device.open()?;
        if device.is_cuda() {
            candle_core::cuda::set_gemm_reduced_precision_f32(self.tf32);
        }
        Ok(device)
    }
}

impl DeviceChoice {
    /// Whether [`Self::open`] gives a GPU (or fails trying to): `cuda:N`, or `auto` in a CUDA
    /// build where the NVIDIA driver is installed. Decided without initialising the driver
    /// (which can take seconds), for the checks made before any worker starts.
    pub fn is_gpu(self) -> bool {
        match self {
            Self::Cpu => false,
            Self::Cuda(_) => true,
            Self::Auto => launched_for_gpu() || crate::cuda_driver::driver_present(),
        }
    }

    /// The device, checked: a CPU build asked for CUDA, a missing driver or an index beyond the
    /// visible GPUs is an error naming the cause. `auto` is the CPU where no GPU is usable
    /// (said in the log), except in a worker the launcher started for a GPU.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto if launched_for_gpu() => Self::Cuda(0).open(),
            Self::Auto => match crate::cuda_driver::why_no_gpu() {
                None => open_cuda(0).context("--device auto found a GPU but could not open it"),
                Some(why) => {
                    if why.is_fault() {
                        tracing::warn!("--device auto: {why}; computing on the CPU");
                    } else if cuda_built() {
                        tracing::info!("--device auto: {why}; computing on the CPU");
                    }
                    Ok(Device::Cpu)
                }
            },
            Self::Cuda(_) if !cuda_built() => bail!("--device {self}: {CUDA_BUILD_HINT}"),
            Self::Cuda(ordinal) => open_cuda(ordinal),
        }
    }
}

/// Opens CUDA device `ordinal` with the allocator settings training needs.
fn open_cuda(ordinal: usize) -> Result<Device> {
    crate::cuda_driver::check(ordinal)?;
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "(unset)".into());
    let device = Device::new_cuda_with_stream(ordinal).with_context(|| {
        format!(
            "opening CUDA device {ordinal} (CUDA_VISIBLE_DEVICES={visible}): is the NVIDIA driver \
             loaded and the index below the number of visible GPUs?"
        )
    })?;
    crate::cuda_setup::configure(&device)
        .with_context(|| format!("configuring CUDA device {ordinal}"))?;
    Ok(device)
}

/// A device as reports and logs name it: `cpu`, `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_is_named_or_auto_in_a_cuda_build() {
        assert!(!DeviceChoice::Cpu.is_gpu());
        assert!(DeviceChoice::Cuda(1).is_gpu());
        assert_eq!(
            DeviceChoice::Auto.is_gpu(),
            launched_for_gpu() || crate::cuda_driver::driver_present()
        );
    }

    #[test]
    fn parses_every_spelling() {
        for (text, want) in [
            ("cpu", DeviceChoice::Cpu),
            ("CPU", DeviceChoice::Cpu),
            ("auto", DeviceChoice::Auto),
            ("cuda", DeviceChoice::Cuda(0)),
            ("gpu", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
            ("gpu:1", DeviceChoice::Cuda(1)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>(), Ok(want), "{text}");
        }
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains(bad) || bad.is_empty(), "{bad}: {err}");
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn cpu_build_refuses_cuda_with_the_build_command() {
        if cuda_built() {
            eprintln!("skipped: this build has CUDA");
            return;
        }
        let err = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("scripts/cuda/build.sh"), "{err}");
        assert!(err.contains("--device cuda:0"), "{err}");
        assert!(DeviceChoice::Auto.open().unwrap().is_cpu());
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
    }

    #[test]
    fn tf32_on_the_cpu_is_refused() {
        let args = DeviceArgs {
            device: DeviceChoice::Cpu,
            tf32: true,
        };
        assert!(args.open().unwrap_err().to_string().contains("--tf32"));
    }
}
