//! Branch-free float32 `exp` and `erf` for the fused kernels.
//!
//! libm's `expf` and `erff` are scalar calls, so a loop over them runs one element at a time
//! whatever the vector family. These are polynomials with no branches: inlined into a
//! [`crate::multiversion!`] body they vectorise (16 lanes on AVX-512, 8 on AVX2). Each
//! multiply-add goes through the body's [`MulAdd`]: fused (rounded once) in the AVX2 and
//! AVX-512 bodies, so both return the same bits, and in the baseline body where the target
//! has FMA (aarch64); on x86 the baseline body multiplies and adds separately, and its
//! results differ from the others' in the last bits (`ops::tests` bounds by how much). Fused,
//! the GELU's AVX2 loop ran 1.5–2.5× faster than with separate multiplies and adds.

use crate::simd::MulAdd;

/// `eˣ` in float32 without branches: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `eʳ` by its Taylor
/// series to `r⁷/7!` (truncation below 6·10⁻⁹ relative, by Horner's rule),
/// `2ⁿ` built in the exponent bits.
/// Within 2 ulp of the exact value from -87.3 up; overflows to `+∞` only above 88.7.
///
/// Below -87.3 (where `eˣ` nears the smallest normal float, `2⁻¹²⁶`) the result is exactly 0,
/// as `exp(-∞)` is everywhere: a masked softmax position is then 0, as in PyTorch, not a
/// subnormal. Subnormal operands cost Intel CPUs a microcode assist per multiply: one masked
/// attention's subnormal probabilities, carried into every product of the backward pass, made
/// a B-32 training step 20× slower on a Xeon (docs/speed-history.md). AMD's cores take no such penalty.
#[inline(always)]
pub(crate) fn exp<M: MulAdd>(x: f32) -> f32 {
    /// 1.5 · 2²³: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 split so that `n · LN2_HI` is exact for the `n` that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(-87.3, 88.7);
    let shifted = M::mul_add(clamped, LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = M::mul_add(-n, LN2_LO, M::mul_add(-n, LN2_HI, clamped));
    let p = horner::<M, 8>(
        r,
        [
            1.0 / 5040.0,
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            1.0 / 2.0,
            1.0,
            1.0,
        ],
    );
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    // A select, not a branch: it vectorises as a compare and a blend. NaN stays NaN.
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// `erf(x)` in float32 without branches: `1 − erfc(|x|)` with the sign of `x`, `erfc` by the
/// Chebyshev fit of Numerical Recipes (`erfcc`, fractional error below 1.2·10⁻⁷), so the
/// absolute error is a few 10⁻⁷ everywhere (libm's `erff` is within 1 ulp).
#[inline(always)]
pub(crate) fn erf<M: MulAdd>(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / M::mul_add(0.5, z, 1.0);
    let poly = horner::<M, 10>(
        t,
        [
            0.170_872_77,
            -0.822_152_23,
            1.488_515_9,
            -1.135_204,
            0.278_868_07,
            -0.186_288_06,
            0.096_784_18,
            0.374_091_96,
            1.000_023_7,
            -1.265_512_2,
        ],
    );
    let erfc = t * exp::<M>(M::mul_add(-z, z, poly));
    (1.0 - erfc).copysign(x)
}

/// `c₀·xⁿ + c₁·xⁿ⁻¹ + … + cₙ` by Horner's rule, one multiply-add per coefficient after the
/// first (highest degree first).
#[inline(always)]
fn horner<M: MulAdd, const N: usize>(x: f32, coefficients: [f32; N]) -> f32 {
    coefficients[1..]
        .iter()
        .fold(coefficients[0], |acc, &c| M::mul_add(acc, x, c))
}
