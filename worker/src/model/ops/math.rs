//! Branch-free float32 `exp` and `erf` for the fused kernels.
//!
//! libm's `expf` and `erff` are scalar calls, so a loop over them runs one element at a time
//! whatever the vector family. These are polynomials with no branches: inlined into a
//! [`crate::multiversion!`] body they vectorise (16 lanes on AVX-512, 8 on AVX2). They never
//! fuse a multiply and an add (Rust does not contract), so every family returns the same bits.

/// `eˣ` in float32 without branches: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `eʳ` by its Taylor
/// series to `r⁷/7!` (truncation below 6·10⁻⁹ relative), `2ⁿ` built in the exponent bits.
/// Within 2 ulp of the exact value from -87.3 up; overflows to `+∞` only above 88.7.
///
/// Below -87.3 (where `eˣ` nears the smallest normal float, `2⁻¹²⁶`) the result is exactly 0,
/// as `exp(-∞)` is everywhere: a masked softmax position is then 0, as in PyTorch, not a
/// subnormal. Subnormal operands cost Intel CPUs a microcode assist per multiply: one masked
/// attention's subnormal probabilities, carried into every product of the backward pass, made
/// a B-32 training step 20× slower on a Xeon (docs/speed-history.md). AMD's cores take no such penalty.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    /// 1.5 · 2²³: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 split so that `n · LN2_HI` is exact for the `n` that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(-87.3, 88.7);
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
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
pub(crate) fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * exp(-z * z + poly);
    (1.0 - erfc).copysign(x)
}
