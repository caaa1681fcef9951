//! The kernels' inner loops with AVX2 intrinsics, for weights the compiler does not vectorise
//! well by itself (bfloat16 widening). Each sums exactly as its portable twin in the parent
//! module: the same lanes, multiplies and adds kept separate, the same final order.

use super::WeightElement;
use std::arch::x86_64::*;

/// The first eight weights of `src` as float32 lanes.
#[target_feature(enable = "avx2")]
fn widen8<T: WeightElement>(src: &[T]) -> __m256 {
    let src = &src[..8];
    match T::BITS {
        // SAFETY: `src` holds 8 float32 (32 bytes); unaligned loads are allowed.
        32 => unsafe { _mm256_loadu_ps(src.as_ptr().cast()) },
        // bfloat16, the top half of a float32.
        _ => {
            // SAFETY: `src` holds 8 bfloat16 (16 bytes); unaligned loads are allowed.
            let halves = unsafe { _mm_loadu_si128(src.as_ptr().cast()) };
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
        }
    }
}

/// Eight float32 from the start of `src`.
#[target_feature(enable = "avx2")]
fn load8(src: &[f32]) -> __m256 {
    let src = &src[..8];
    // SAFETY: `src` holds 8 float32; unaligned loads are allowed.
    unsafe { _mm256_loadu_ps(src.as_ptr()) }
}

/// Stores eight lanes at the start of `dst`.
#[target_feature(enable = "avx2")]
fn store8(dst: &mut [f32], v: __m256) {
    let dst = &mut dst[..8];
    // SAFETY: `dst` holds 8 float32; unaligned stores are allowed.
    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v) }
}

/// [`super::dot_portable`] with AVX2.
#[target_feature(enable = "avx2")]
pub fn dot<T: WeightElement>(w: &[T], x: &[f32]) -> f32 {
    const LANES: usize = super::LANES;
    let n = w.len().min(x.len()) / LANES * LANES;
    let mut acc = [_mm256_setzero_ps(); LANES / 8];
    for k in (0..n).step_by(LANES) {
        let (w, x) = (&w[k..k + LANES], &x[k..k + LANES]);
        for (j, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(widen8(&w[8 * j..]), load8(&x[8 * j..])));
        }
    }
    let mut lanes = [0f32; LANES];
    for (j, acc) in acc.iter().enumerate() {
        store8(&mut lanes[8 * j..], *acc);
    }
    super::finish_dot(lanes, &w[n..], &x[n..])
}

/// [`super::axpy4_portable`] with AVX2.
#[target_feature(enable = "avx2")]
pub fn axpy4<T: WeightElement>(y: &mut [f32], x: [f32; 4], p: [&[T]; 4]) {
    let n = p.iter().fold(y.len(), |n, p| n.min(p.len())) / 8 * 8;
    let xs = x.map(|v| _mm256_set1_ps(v));
    for c in (0..n).step_by(8) {
        let mut acc = load8(&y[c..]);
        for (xv, p) in xs.iter().zip(&p) {
            acc = _mm256_add_ps(acc, _mm256_mul_ps(*xv, widen8(&p[c..])));
        }
        store8(&mut y[c..], acc);
    }
    super::axpy4_portable(&mut y[n..], x, p.map(|p| &p[n..]));
}
