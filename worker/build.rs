//! Compiles the worker's own CUDA kernels (kernels/fused_ops.cu) to PTX when the `cuda` feature
//! is on; the CPU build compiles nothing. The PTX is embedded in the binary and loaded by the
//! driver, which compiles it for the GPU it runs on (any GPU of `CUDA_COMPUTE_CAP` or newer).
//!
//! nvcc is taken from `NVCC`, else `CUDA_HOME/bin/nvcc`, else `PATH` (scripts/cuda/toolchain.sh
//! sets the first two); `CUDA_COMPUTE_CAP` (default 90, H100/H200) picks the virtual
//! architecture, as for candle's kernels.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels/fused_ops.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|home| PathBuf::from(home).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("fused_ops.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("kernels/fused_ops.cu")
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{} failed on kernels/fused_ops.cu ({s})", nvcc.display()),
        Err(e) => panic!(
            "the cuda feature needs nvcc to compile kernels/fused_ops.cu: running {} failed ({e}); \
             scripts/cuda/build.sh installs it (scripts/cuda/toolchain.sh)",
            nvcc.display()
        ),
    }
}
