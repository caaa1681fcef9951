//! Compiles the worker's own CUDA kernels (kernels/fused_ops.cu) to PTX when the `cuda` feature
//! is on; the CPU build compiles nothing. The PTX is embedded in the binary and loaded by the
//! driver, which compiles it for the GPU it runs on (any GPU of `CUDA_COMPUTE_CAP` or newer).
//!
//! nvcc is taken from `NVCC`, else `CUDA_HOME/bin/nvcc`, else `PATH` (scripts/cuda/toolchain.sh
//! sets the first two); `CUDA_COMPUTE_CAP` (default 90, H100/H200) picks the virtual
//! architecture, as for candle's kernels.
//!
//! It also points the link at the toolkit's static CUDA runtime (`libcudart_static.a`).
//! candle-kernels links `-lcudart` for code we never call (its MoE and GGUF kernels); linked
//! dynamically, that would make `libcudart.so.13` a library the binary cannot start without.
//! Everything else CUDA (the driver, cuBLAS, cuRAND, NCCL) is opened at run time
//! (cudarc's `dynamic-loading`), so the CUDA binary starts on a machine without a GPU.

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
    link_static_cuda_runtime(&nvcc);
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

/// Makes `-lcudart` find the static runtime: a folder holding `libcudart.a`, a link to the
/// toolkit's `libcudart_static.a` (the runtime's own name for it), first on the search path.
/// The toolkit is `CUDA_HOME`, else the folder above nvcc's `bin`.
fn link_static_cuda_runtime(nvcc: &std::path::Path) {
    let home = std::env::var_os("CUDA_HOME")
        .map(PathBuf::from)
        .or_else(|| nvcc.parent()?.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/usr/local/cuda"));
    let candidates = [
        "lib",
        "lib64",
        "targets/x86_64-linux/lib",
        "targets/sbsa-linux/lib",
    ];
    let Some(archive) = candidates
        .iter()
        .map(|dir| home.join(dir).join("libcudart_static.a"))
        .find(|path| path.is_file())
    else {
        panic!(
            "no libcudart_static.a under {} ({}): the CUDA runtime's static library is needed \
             (the nvidia-cuda-runtime wheel and every CUDA toolkit have it)",
            home.display(),
            candidates.join(", ")
        );
    };
    let dir =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("cudart");
    std::fs::create_dir_all(&dir).expect("creating OUT_DIR/cudart");
    let link = dir.join("libcudart.a");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&archive, &link).expect("linking OUT_DIR/cudart/libcudart.a");
    println!("cargo:rerun-if-changed={}", archive.display());
    println!("cargo:rustc-link-search=native={}", dir.display());
}
