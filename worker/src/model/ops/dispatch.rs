//! Which implementation an op runs: the fused CPU kernel or the portable composition.
//!
//! The fused kernels exist for float32 on the CPU and, in the `cuda` build, for float32,
//! bfloat16 and float16 on a GPU (the transpose copy: on the CPU only). Half-precision inputs on
//! the CPU run the CPU's kernels on float32 copies ([`widened_on_cpu`]); everything else takes
//! the portable path. `COCA_PORTABLE_OPS=1` (read once per process) or [`force_portable`] sends
//! every op down the portable path on the CPU too, so the math the GPU runs is tested here.

use candle_core::{DType, Tensor};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// The environment variable that forces the portable path (`1` or `true`).
pub const PORTABLE_OPS_ENV: &str = "COCA_PORTABLE_OPS";

/// 0: not read yet; 1: fused where possible; 2: portable everywhere.
static MODE: AtomicU8 = AtomicU8::new(0);

/// How many times an op chose its fused kernel in this process.
static FUSED: AtomicUsize = AtomicUsize::new(0);

/// Sends every op of this process down the portable path from now on (irreversible).
///
/// Exists for test binaries and tools that prove the device math on the CPU. It is
/// process-global: call it only where every test of the process wants it (a test binary of
/// its own), never from tests that share a process with fused-path tests.
pub fn force_portable() {
    MODE.store(2, Ordering::Relaxed);
}

/// Whether the portable path is forced ([`PORTABLE_OPS_ENV`] or [`force_portable`]): the ops,
/// and generation's choice of decoder, key off it.
pub fn portable_forced() -> bool {
    match MODE.load(Ordering::Relaxed) {
        0 => {
            let on = switch_on(std::env::var(PORTABLE_OPS_ENV).ok().as_deref());
            // A concurrent force_portable wins over the environment.
            let _ = MODE.compare_exchange(0, 1 + on as u8, Ordering::Relaxed, Ordering::Relaxed);
            MODE.load(Ordering::Relaxed) == 2
        }
        mode => mode == 2,
    }
}

/// Whether a value of [`PORTABLE_OPS_ENV`] turns the switch on: `1` or `true` (any case).
pub(super) fn switch_on(value: Option<&str>) -> bool {
    value.is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true"))
}

/// How many ops of this process ran their fused kernel: tests under [`force_portable`] check
/// that it stays 0.
pub fn fused_dispatches() -> usize {
    FUSED.load(Ordering::Relaxed)
}

/// Whether an op with CPU and CUDA kernels runs them over `tensors`: every tensor float32 on
/// the CPU, or (in the `cuda` build) every tensor float32, bfloat16 or float16 on a GPU; and the
/// portable path not forced. (The fused ops make their inputs contiguous, and cast their float32
/// auxiliaries, themselves.)
pub(crate) fn fused(tensors: &[&Tensor]) -> bool {
    count(
        !portable_forced()
            && (tensors.iter().all(|t| on_cpu_in_f32(t)) || tensors.iter().all(|t| on_cuda(t))),
    )
}

/// Whether an op runs its fused float32 CPU kernels on float32 copies of `tensors` (the bias
/// ops widen element by element instead, without a copy): all on the CPU, each float32,
/// bfloat16 or float16 and not all float32 (autocast's half-precision products return them),
/// and the portable path not forced. Widening is exact and the op's
/// portable composition widens them too, so the numbers are the portable path's up to the
/// float32 rounding of each; the fused kernels take one pass where the composition takes
/// several, each with a temporary kept for the backward pass.
pub(crate) fn widened_on_cpu(tensors: &[&Tensor]) -> bool {
    !portable_forced()
        && tensors.iter().all(|t| {
            t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
        })
        && tensors.iter().any(|t| t.dtype() != DType::F32)
}

/// `t` in float32 (a copy when it is not): the input of a fused CPU kernel that
/// [`widened_on_cpu`] chose.
pub(crate) fn widened(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)
}

/// Whether an op with CPU kernels only (the transpose copy) runs them over `tensors`: every
/// tensor float32 on the CPU, and the portable path not forced.
pub(crate) fn fused_on_cpu(tensors: &[&Tensor]) -> bool {
    count(!portable_forced() && tensors.iter().all(|t| on_cpu_in_f32(t)))
}

fn on_cpu_in_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// A tensor our CUDA kernels take: on a GPU, in a dtype they are built for.
fn on_cuda(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// Counts a fused dispatch ([`fused_dispatches`]).
fn count(fused: bool) -> bool {
    if fused {
        FUSED.fetch_add(1, Ordering::Relaxed);
    }
    fused
}
