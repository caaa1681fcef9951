//! coca: conversions between float32 and the half types over contiguous runs, at memory speed.
//!
//! Autocast converts every weight, and the operands and result of every half-precision product,
//! between float32 and bf16 (`to_dtype`, the bf16 `matmul`); `unary_map_vec_par` splits each
//! conversion over the threads and hands each thread contiguous runs. The release build targets
//! baseline x86-64 (SSE2), where the compiler vectorises bf16's rounding four elements at a
//! time: 7 GB/s on an AVX-512 Xeon, where an addition runs at 25-40 GB/s. [`convert_with`]
//! compiles the same element function for AVX2 and AVX-512 and runs the widest the CPU has
//! (28-30 GB/s there). bf16's conversions are bit operations, so every width gives the same
//! bits; f16 uses `half`'s slice conversions (F16C, IEEE rounding), which do the same.

use half::{bf16, f16};
use std::sync::OnceLock;

/// A vector width the conversion loop is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum VectorWidth {
    /// Baseline x86-64 (SSE2), or any other architecture.
    Portable,
    /// AVX2.
    Avx2,
    /// AVX-512 F/BW/VL.
    Avx512,
}

impl VectorWidth {
    /// Whether this CPU runs the width.
    pub fn is_available(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => std::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widths this CPU runs, narrowest first (what the tests compare).
    pub fn available() -> Vec<Self> {
        [Self::Portable, Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|w| w.is_available())
            .collect()
    }

    /// The width conversions use in this process: the widest available, no wider than
    /// `COCA_CPU_KERNELS` (`avx2`, `portable`: the worker's switch for its own kernels, so
    /// that a run held to AVX2 is held to it here too). Decided once.
    pub fn active() -> Self {
        static ACTIVE: OnceLock<VectorWidth> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let requested = std::env::var("COCA_CPU_KERNELS").map(|v| v.to_ascii_lowercase());
            let cap = match requested.as_deref() {
                Ok("portable") => Self::Portable,
                Ok("avx2") => Self::Avx2,
                _ => Self::Avx512,
            };
            let best = Self::available()
                .into_iter()
                .max()
                .unwrap_or(Self::Portable);
            best.min(cap)
        })
    }
}

/// `dst[i] = f(src[i])` with the loop compiled for `width` (which must be available: a width
/// the CPU lacks runs the portable loop).
pub fn convert_with<T: Copy, U: Copy, F: Fn(T) -> U>(
    width: VectorWidth,
    src: &[T],
    dst: &mut [U],
    f: F,
) {
    assert_eq!(
        src.len(),
        dst.len(),
        "conversion of {} elements into {}",
        src.len(),
        dst.len()
    );
    #[cfg(not(target_arch = "x86_64"))]
    let _ = width;
    #[cfg(target_arch = "x86_64")]
    if width.is_available() {
        match width {
            // SAFETY: the CPU has the features the function is compiled for.
            VectorWidth::Avx512 => return unsafe { convert_avx512(src, dst, f) },
            // SAFETY: as above.
            VectorWidth::Avx2 => return unsafe { convert_avx2(src, dst, f) },
            VectorWidth::Portable => {}
        }
    }
    convert_portable(src, dst, f)
}

#[inline(always)]
fn convert_portable<T: Copy, U: Copy, F: Fn(T) -> U>(src: &[T], dst: &mut [U], f: F) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f(s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn convert_avx512<T: Copy, U: Copy, F: Fn(T) -> U>(src: &[T], dst: &mut [U], f: F) {
    convert_portable(src, dst, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn convert_avx2<T: Copy, U: Copy, F: Fn(T) -> U>(src: &[T], dst: &mut [U], f: F) {
    convert_portable(src, dst, f)
}

/// float32 -> bf16 (round to nearest even, as `bf16::from_f32`) over a contiguous run.
pub fn bf16_from_f32_slice(src: &[f32], dst: &mut [bf16]) {
    convert_with(VectorWidth::active(), src, dst, bf16::from_f32)
}

/// bf16 -> float32 (exact) over a contiguous run.
pub fn f32_from_bf16_slice(src: &[bf16], dst: &mut [f32]) {
    convert_with(VectorWidth::active(), src, dst, bf16::to_f32)
}

/// float32 -> f16 over a contiguous run: `half`'s slice conversion, eight elements per F16C
/// instruction where the CPU has it (else `f16::from_f32` per element, as before).
pub fn f16_from_f32_slice(src: &[f32], dst: &mut [f16]) {
    use half::slice::HalfFloatSliceExt;
    dst.convert_from_f32_slice(src)
}

/// f16 -> float32 over a contiguous run, as [`f16_from_f32_slice`].
pub fn f32_from_f16_slice(src: &[f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst)
}
