//! The kernels' inner loops with AVX2 intrinsics, for weights the compiler does not vectorise
//! well by itself (bfloat16 widening). Each sums exactly as its portable twin in the parent
//! module: the same lanes, multiplies and adds kept separate, the same final order.

use super::{WeightElement, LANES};
use std::arch::x86_64::*;

/// The eight weights at `src` as float32 lanes.
///
/// # Safety
/// `src` must point to 8 readable elements.
#[target_feature(enable = "avx2")]
unsafe fn widen8<T: WeightElement>(src: *const T) -> __m256 {
    match T::BITS {
        // SAFETY: 8 float32 (32 bytes) are readable; unaligned loads are allowed.
        32 => unsafe { _mm256_loadu_ps(src.cast()) },
        // bfloat16, the top half of a float32.
        _ => {
            // SAFETY: 8 bfloat16 (16 bytes) are readable; unaligned loads are allowed.
            let halves = unsafe { _mm_loadu_si128(src.cast()) };
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

/// [`super::tile_portable`] with AVX2: two registers of lanes per product (even and odd
/// blocks of 8), reduced as [`super::sum_lanes`] does.
#[target_feature(enable = "avx2")]
pub fn tile<T: WeightElement, const R: usize>(w: &[T], x: [&[f32]; R]) -> [f32; R] {
    let len = super::common_len(w, &x);
    let n = len / LANES * LANES;
    let (w_at, x_at) = (w.as_ptr(), x.map(<[f32]>::as_ptr));
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for k in (0..n).step_by(LANES) {
        // SAFETY (all loads): k + 16 ≤ n ≤ the length of every row.
        let wv = unsafe { [widen8(w_at.add(k)), widen8(w_at.add(k + 8))] };
        for (acc, x) in acc.iter_mut().zip(&x_at) {
            let xv = unsafe { [_mm256_loadu_ps(x.add(k)), _mm256_loadu_ps(x.add(k + 8))] };
            for ((acc, wv), xv) in acc.iter_mut().zip(&wv).zip(&xv) {
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(*wv, *xv));
            }
        }
    }
    let mut sums = [0f32; R];
    for ((sum, acc), x) in sums.iter_mut().zip(&acc).zip(&x) {
        *sum = if n == len {
            sum_registers(acc[0], acc[1])
        } else {
            let mut lanes = [0f32; LANES];
            store8(&mut lanes, acc[0]);
            store8(&mut lanes[8..], acc[1]);
            super::add_tail(&mut lanes, &w[n..len], &x[n..len]);
            super::sum_lanes(lanes)
        };
    }
    sums
}

/// [`super::sum_lanes`] of two registers (lanes 0–7 and 8–15), in registers.
#[target_feature(enable = "avx2")]
fn sum_registers(low: __m256, high: __m256) -> f32 {
    // a = l[i] + l[i+8]
    let a = _mm256_add_ps(low, high);
    // (a0+a4, a1+a5, a2+a6, a3+a7)
    let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    // (s0+s2, s1+s3, ..)
    let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    // t0+t1
    _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)))
}

/// [`super::axpy4_portable`] with AVX2.
#[target_feature(enable = "avx2")]
pub fn axpy4<T: WeightElement>(y: &mut [f32], x: [f32; 4], p: [&[T]; 4]) {
    let n = p.iter().fold(y.len(), |n, p| n.min(p.len())) / 8 * 8;
    let xs = x.map(|v| _mm256_set1_ps(v));
    let p_at = p.map(<[T]>::as_ptr);
    for c in (0..n).step_by(8) {
        let mut acc = load8(&y[c..]);
        for (xv, p) in xs.iter().zip(&p_at) {
            // SAFETY: c + 8 ≤ n ≤ the length of every row of `p`.
            acc = _mm256_add_ps(acc, _mm256_mul_ps(*xv, unsafe { widen8(p.add(c)) }));
        }
        store8(&mut y[c..], acc);
    }
    super::axpy4_portable(&mut y[n..], x, p.map(|p| &p[n..]));
}
