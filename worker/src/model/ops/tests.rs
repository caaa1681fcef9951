//! Each fused op against the same computation composed from candle primitives (which have
//! backward passes), forward and backward.

use super::*;
use candle_core::{DType, Device, Tensor, Var, D};

pub(super) fn rand(shape: &[usize], seed: u64) -> Tensor {
    // A small deterministic generator keeps the tests independent of candle's RNG.
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    crate::compare::max_abs_diff(a, b).unwrap()
}

/// Runs `f` on fresh variables made from `inputs` and returns the output and every gradient of
/// `sum(output * weights)`.
pub(super) fn value_and_grads(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors);
    let weights = rand(out.dims(), 99).to_dtype(out.dtype()).unwrap();
    let grads = (&out * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = vars
        .iter()
        .map(|v| {
            grads
                .get(v)
                .expect("gradient must reach every input")
                .clone()
        })
        .collect();
    (out, g)
}

fn assert_same(fused: &(Tensor, Vec<Tensor>), reference: &(Tensor, Vec<Tensor>), tol: f32) {
    let d = max_abs_diff(&fused.0, &reference.0);
    assert!(d < tol, "forward differs by {d}");
    for (i, (a, b)) in fused.1.iter().zip(&reference.1).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d < tol, "gradient of input {i} differs by {d}");
    }
}

#[test]
fn layer_norm_matches_primitives() {
    let inputs = [rand(&[3, 5, 24], 1), rand(&[24], 2), rand(&[24], 3)];
    let fused = value_and_grads(&inputs, |t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap());
    let reference = value_and_grads(&inputs, |t| {
        let mean = t[0].mean_keepdim(D::Minus1).unwrap();
        let centered = t[0].broadcast_sub(&mean).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normed = centered
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        normed
            .broadcast_mul(&t[1])
            .unwrap()
            .broadcast_add(&t[2])
            .unwrap()
    });
    assert_same(&fused, &reference, 1e-4);
}

#[test]
fn gelu_matches_primitives() {
    let inputs = [rand(&[7, 33], 4)];
    let fused = value_and_grads(&inputs, |t| gelu_erf(&t[0]).unwrap());
    let reference = value_and_grads(&inputs, |t| t[0].gelu_erf().unwrap());
    assert_same(&fused, &reference, 1e-5);
}

#[test]
fn add_bias_matches_broadcast_add() {
    // 300 columns: more than one task's block, with a tail; 3-D input as the layers pass.
    let inputs = [rand(&[4, 70, 300], 5), rand(&[300], 6)];
    let fused = value_and_grads(&inputs, |t| add_bias(&t[0], &t[1]).unwrap());
    let reference = value_and_grads(&inputs, |t| t[0].broadcast_add(&t[1]).unwrap());
    assert_same(&fused, &reference, 1e-4);
    // The gradient columns sum in row order: the same bits as a plain loop.
    let g = rand_vec(9 * 300, 7);
    let plain: Vec<f32> = (0..300)
        .map(|c| (0..9).fold(0f32, |s, r| s + g[r * 300 + c]))
        .collect();
    assert_bits(
        crate::simd::KernelFamily::Portable,
        "column sums",
        &bias::column_sums(&g, 300),
        &plain,
    );
    assert!(add_bias(&inputs[0], &rand(&[299], 8)).is_err());
}

#[test]
fn half_precision_biases_add_like_candle_and_sum_their_gradients_in_float32() {
    // bf16/f16 on the CPU: the forward values are candle's (`x · w` rounded once, then each sum
    // `y + b` rounded once), and the bias gradient is summed in float32 and rounded once, as
    // the GPU kernel sums it. Summed in the half type (candle's `broadcast_add` backward), ones
    // stop adding up at 256 (bf16) or 2048 (f16).
    let rows = 3000;
    for dtype in [DType::BF16, DType::F16] {
        let x = rand(&[rows, 40], 21).to_dtype(dtype).unwrap();
        let w = rand(&[70, 40], 22).to_dtype(dtype).unwrap();
        let b = Var::from_tensor(&rand(&[70], 23).to_dtype(dtype).unwrap()).unwrap();
        let y = biased_product(&x, &w.t().unwrap(), b.as_tensor()).unwrap();
        let want = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert_eq!(y.dtype(), dtype);
        assert_eq!(max_abs_diff(&y, &want), 0.0, "{dtype:?} biased product");
        let added = add_bias(&want.detach(), b.as_tensor()).unwrap();
        let want_added = want.broadcast_add(&b).unwrap();
        assert_eq!(max_abs_diff(&added, &want_added), 0.0, "{dtype:?} bias sum");

        // d(sum y)/db: a column of ones per bias element, `rows` long.
        let exact = match dtype {
            DType::BF16 => half::bf16::from_f64(rows as f64).to_f64(),
            _ => half::f16::from_f64(rows as f64).to_f64(),
        };
        for y in [y, added] {
            let grads = y.sum_all().unwrap().backward().unwrap();
            let db = grads.get(b.as_tensor()).unwrap();
            assert_eq!(db.dtype(), dtype);
            let db: Vec<f32> = db.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
            assert!(
                db.iter().all(|&v| v as f64 == exact),
                "{dtype:?}: {:?} != {exact}",
                &db[..3]
            );
        }
    }
}

#[test]
fn biased_product_equals_the_product_then_the_bias() {
    // A transposed weight (a linear layer's `Wᵀ` view) and a contiguous one; 300 output
    // columns: more than one task's block of rows, with a tail.
    let (x, weight, b) = (rand(&[37, 64], 10), rand(&[300, 64], 11), rand(&[300], 12));
    for transposed in [true, false] {
        let inputs = [x.clone(), weight.clone(), b.clone()];
        let w = |t: &Tensor| {
            if transposed {
                t.t().unwrap()
            } else {
                t.reshape((64, 300)).unwrap()
            }
        };
        let fused = value_and_grads(&inputs, |t| {
            biased_product(&t[0], &w(&t[1]), &t[2]).unwrap()
        });
        let reference = value_and_grads(&inputs, |t| {
            add_bias(&t[0].matmul(&w(&t[1])).unwrap(), &t[2]).unwrap()
        });
        // The same ops in the same order: the same bits, forward and backward.
        assert_same(&fused, &reference, f32::MIN_POSITIVE);
        // The weight's gradient reaches it contiguous: for `Wᵀ`, the transpose of `gᵀ · x`
        // (`xᵀ · g` reached it as a transposed view, which the trainer had to copy).
        assert!(fused.1[1].is_contiguous(), "transposed: {transposed}");
        let composed = value_and_grads(&inputs, |t| {
            t[0].matmul(&w(&t[1]))
                .unwrap()
                .broadcast_add(&t[2])
                .unwrap()
        });
        assert_same(&fused, &composed, 1e-4);
    }
    assert!(biased_product(&x, &weight, &b).is_err());
    assert!(biased_product(&x, &weight.t().unwrap(), &rand(&[299], 13)).is_err());
}

#[test]
fn attention_probs_equal_the_product_then_the_softmax() {
    let (b, h, t, s, d) = (2, 3, 5, 7, 4);
    let scale = 0.5;
    // Additive masks: shared by the batch (causal-like) and per sample (padding-like).
    let shared = Tensor::from_vec(
        (0..t * s)
            .map(|i| {
                if i % s > i / s + 2 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect::<Vec<f32>>(),
        (t, s),
        &Device::Cpu,
    )
    .unwrap();
    let per_sample = rand(&[b, t, s], 21);
    for mask in [None, Some(&shared), Some(&per_sample)] {
        let inputs = [rand(&[b, h, t, d], 22), rand(&[b, h, s, d], 23)];
        let fused = value_and_grads(&inputs, |x| {
            attention_probs(&x[0], &x[1].t().unwrap(), mask, scale).unwrap()
        });
        let reference = value_and_grads(&inputs, |x| {
            let scores = x[0].matmul(&x[1].t().unwrap()).unwrap();
            masked_softmax(&scores, mask, scale).unwrap()
        });
        // The same ops in the same order: the same bits, forward and backward.
        assert_same(&fused, &reference, f32::MIN_POSITIVE);
        // `k`'s gradient reaches it contiguous (the transpose of `gᵀ · q`), as candle's
        // patched `matmul` hands it back: nothing to copy where the heads were split.
        assert!(fused.1[1].is_contiguous());
        let composed = value_and_grads(&inputs, |x| {
            let scores = x[0].matmul(&x[1].t().unwrap()).unwrap();
            portable::masked_softmax(&scores, mask, scale).unwrap()
        });
        assert_same(&fused, &composed, 1e-5);
    }
    let q = rand(&[b, h, t, d], 24);
    assert!(attention_probs(&q, &rand(&[b, h, d + 1, s], 25), None, scale).is_err());
    assert!(attention_probs(
        &q,
        &rand(&[b, h, d, s], 26),
        Some(&rand(&[t, s + 1], 27)),
        scale
    )
    .is_err());
}

/// Values a product would be slowed down by (Intel CPUs take a microcode assist per
/// subnormal operand).
fn subnormals(t: &Tensor) -> usize {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.iter().filter(|x| x.is_subnormal()).count()
}

#[test]
fn masked_positions_are_exact_zeros_and_no_op_emits_subnormals() {
    // A causal mask, as the text tower's: in each row the positions after the diagonal are
    // -inf, so their probabilities and every gradient through them are exactly 0 (PyTorch's
    // result); subnormals there made the B-32 training step 20× slower on a Xeon.
    let (b, h, t, d) = (2, 2, 9, 4);
    let causal = Tensor::from_vec(
        (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect::<Vec<f32>>(),
        (t, t),
        &Device::Cpu,
    )
    .unwrap();
    let inputs = [rand(&[b, h, t, d], 31), rand(&[b, h, t, d], 32)];
    let (probs, grads) = value_and_grads(&inputs, |x| {
        attention_probs(&x[0], &x[1].t().unwrap(), Some(&causal), 1.0).unwrap()
    });
    let rows = probs.flatten_to(2).unwrap().to_vec2::<f32>().unwrap();
    for (r, row) in rows.iter().enumerate() {
        let i = r % t;
        assert!(
            row[i + 1..].iter().all(|p| p.to_bits() == 0),
            "row {r}: {row:?}"
        );
    }
    assert_eq!(subnormals(&probs), 0);
    for g in &grads {
        assert_eq!(subnormals(g), 0);
    }
    // Far-negative GELU inputs: the derivative is 0 there, not e^(-x²/2)'s clamped remainder.
    let x = Tensor::new(&[-30f32, -20.0, -14.0, -13.5, 0.5], &Device::Cpu).unwrap();
    let (y, dx) = value_and_grads(&[x], |t| gelu_erf(&t[0]).unwrap());
    assert_eq!(subnormals(&y) + subnormals(&dx[0]), 0, "{y} {}", dx[0]);
}

#[test]
fn masked_softmax_matches_primitives() {
    let scale = 0.35;
    let (b, h, t, s) = (2, 3, 4, 5);
    let mut mask = rand(&[b, t, s], 5)
        .ge(-1.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    // 0 where allowed, -inf where masked; keep column 0 allowed so no row is fully masked.
    mask = mask
        .ones_like()
        .unwrap()
        .sub(&mask)
        .unwrap()
        .affine(-1e30, 0.0)
        .unwrap();
    let mask = mask
        .slice_assign(
            &[0..b, 0..t, 0..1],
            &Tensor::zeros((b, t, 1), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
    let inputs = [rand(&[b, h, t, s], 6)];
    let fused = value_and_grads(&inputs, |x| {
        masked_softmax(&x[0], Some(&mask), scale).unwrap()
    });
    let reference = value_and_grads(&inputs, |x| {
        let z = (&x[0] * scale)
            .unwrap()
            .broadcast_add(&mask.unsqueeze(1).unwrap())
            .unwrap();
        candle_nn::ops::softmax(&z, D::Minus1).unwrap()
    });
    assert_same(&fused, &reference, 1e-5);
    let shared = mask.get(0).unwrap();
    let fused = value_and_grads(&inputs, |x| {
        masked_softmax(&x[0], Some(&shared), 1.0).unwrap()
    });
    let reference = value_and_grads(&inputs, |x| {
        candle_nn::ops::softmax(&x[0].broadcast_add(&shared).unwrap(), D::Minus1).unwrap()
    });
    assert_same(&fused, &reference, 1e-5);
    let fused = value_and_grads(&inputs, |x| softmax_last_dim(&x[0]).unwrap());
    let reference = value_and_grads(&inputs, |x| {
        candle_nn::ops::softmax(&x[0], D::Minus1).unwrap()
    });
    assert_same(&fused, &reference, 1e-5);
}

#[test]
fn cross_entropy_matches_primitives_and_ignores_padding() {
    let targets = Tensor::new(&[3u32, 0, 7, 0, 1], &Device::Cpu).unwrap();
    let inputs = [rand(&[5, 9], 7)];
    let fused = value_and_grads(&inputs, |x| {
        cross_entropy_rows(&x[0], &targets, Some(0)).unwrap()
    });
    let keep = Tensor::new(&[1f32, 0., 1., 0., 1.], &Device::Cpu).unwrap();
    let reference = value_and_grads(&inputs, |x| {
        let logp = candle_nn::ops::log_softmax(&x[0], D::Minus1).unwrap();
        let picked = logp
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        (picked.neg().unwrap() * &keep).unwrap()
    });
    assert_same(&fused, &reference, 1e-5);
    let bad = Tensor::new(&[3u32, 0, 70, 0, 1], &Device::Cpu).unwrap();
    assert!(cross_entropy_rows(&inputs[0], &bad, None).is_err());
}

/// The raw data of a [`rand`] tensor.
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    rand(&[n], seed).to_vec1().unwrap()
}

/// Asserts two kernels' outputs are the same bits.
fn assert_bits(family: crate::simd::KernelFamily, what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    let differ = a
        .iter()
        .zip(b)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differ, 0, "{what}: {differ} values differ under {family:?}");
}

#[test]
fn every_cpu_kernel_family_computes_the_same_bits() {
    use crate::simd::{BaselineMulAdd, KernelFamily, MulAdd};
    // Widths with a tail after the 16 lanes, as real rows have (50 tokens, 77 positions).
    let (rows, d) = (7, 77);
    let x = rand_vec(rows * d, 1);
    let (w, b, g) = (rand_vec(d, 2), rand_vec(d, 3), rand_vec(rows * d, 4));
    let mask: Vec<f32> = (0..rows * d)
        .map(|i| {
            if i % d > (i / d) * 11 {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    // A transpose with full 8 × 8 blocks and both edges.
    let (t_rows, t_cols) = (21, 77);
    let t_src = rand_vec(t_rows * t_cols, 5);
    let run = |family: KernelFamily| {
        let mut transposed = vec![0f32; t_rows * t_cols];
        transpose::transpose_columns(family, &mut transposed, &t_src, t_rows, t_cols, 0);
        let mut ln = vec![0f32; rows * d];
        layer_norm::layer_norm_rows(family, &mut ln, &x, &w, &b, 1e-5);
        let (mut ln_dx, mut acc, mut xhat) =
            (vec![0f32; rows * d], vec![0f32; 2 * d], vec![0f32; d]);
        layer_norm::layer_norm_backward_rows(
            family, &mut ln_dx, &x, &g, &w, 1e-5, &mut acc, &mut xhat,
        );
        let mut sm = vec![0f32; rows * d];
        softmax::softmax_rows(family, &mut sm, &x, Some(&mask), 0.125, d);
        let mut sm_dx = vec![0f32; rows * d];
        softmax::softmax_backward_rows(family, &mut sm_dx, &sm, &g, 0.125, d);
        // GELU over a wide range: its erf and exp are polynomials in every family.
        let wide: Vec<f32> = x.iter().map(|v| 12.0 * v).collect();
        // SAFETY: both kernels write every element of their output (as long as their inputs).
        let gelu_y = unsafe { written_f32(rows * d, |y| gelu::gelu_forward(family, y, &wide)) };
        let gelu_dx =
            unsafe { written_f32(rows * d, |dx| gelu::gelu_backward(family, dx, &wide, &g)) };
        // Cross-entropy's row log-sum-exp and softmax gradient over the same wide values.
        let (max, lse) = cross_entropy::log_sum_exp_row(family, &wide);
        let mut ce_dx = vec![0f32; rows * d];
        cross_entropy::softmax_times(family, &mut ce_dx, &wide, lse, 0.5);
        [
            ln,
            ln_dx,
            acc,
            sm,
            sm_dx,
            gelu_y,
            gelu_dx,
            vec![max, lse],
            ce_dx,
            transposed,
        ]
    };
    let reference = run(KernelFamily::Portable);
    for (i, &t) in reference[9].iter().enumerate() {
        let (c, r) = (i / t_rows, i % t_rows);
        assert_eq!(t, t_src[r * t_cols + c], "transpose at row {c}, column {r}");
    }
    // The lanes change the order of the sums, not their accuracy: the plain row code agrees.
    let mut plain = vec![0f32; d];
    let (mean, var) = {
        let r = &x[..d];
        let mean = r.iter().sum::<f32>() / d as f32;
        (
            mean,
            r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32,
        )
    };
    for i in 0..d {
        plain[i] = (x[i] - mean) / (var + 1e-5).sqrt() * w[i] + b[i];
    }
    let worst = plain
        .iter()
        .zip(&reference[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-5,
        "layer norm rows differ from the plain formula by {worst}"
    );
    let names = [
        "layer norm",
        "layer norm dx",
        "layer norm dweight/dbias",
        "softmax",
        "softmax dx",
        "gelu",
        "gelu dx",
        "cross-entropy log-sum-exp",
        "cross-entropy dx",
        "transpose",
    ];
    // The ops whose `exp` or `erf` polynomials multiply and add as the family does.
    let polynomial = |name: &str| {
        ["softmax", "gelu", "cross-entropy"]
            .iter()
            .any(|p| name.starts_with(p))
    };
    let fused_reference = KernelFamily::available()
        .into_iter()
        .find(|&f| f != KernelFamily::Portable)
        .map(run);
    for family in KernelFamily::available() {
        let got = run(family);
        for (i, name) in names.iter().enumerate() {
            if family == KernelFamily::Portable || !polynomial(name) || BaselineMulAdd::FUSED {
                assert_bits(family, name, &reference[i], &got[i]);
            } else {
                // The AVX2 and AVX-512 bodies fuse alike; the baseline's separate rounding
                // stays within an ulp of theirs (0.95 at most on these rows).
                let fused = fused_reference.as_ref().expect("a vector family ran");
                assert_bits(family, name, &fused[i], &got[i]);
                let worst = worst_ulps(&reference[i], &got[i]);
                assert!(
                    worst <= 2.0,
                    "{name}: the baseline is {worst} ulps from {family:?}"
                );
            }
        }
    }
}

/// The largest `|a − b|` over `a` and `b`, in float32 ulps of the larger magnitude (of 1 for
/// values below 1, where the kernels' sums cancel).
fn worst_ulps(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs() / (a.abs().max(b.abs()).max(1.0) * f32::EPSILON))
        .fold(0f32, f32::max)
}

#[test]
fn polynomial_erf_and_exp_are_accurate_over_their_range() {
    use crate::simd::{Fused, Separate};
    polynomials_are_accurate::<Fused>();
    polynomials_are_accurate::<Separate>();
}

/// [`polynomial_erf_and_exp_are_accurate_over_their_range`] with multiply-adds done as `M` does.
fn polynomials_are_accurate<M: crate::simd::MulAdd>() {
    let rule = if M::FUSED { "fused" } else { "separate" };
    let (erf, exp) = (math::erf::<M>, math::exp::<M>);
    // Every 1/1024 from −10 to 10 (erf) and −87 to 88 (exp), against double precision.
    let mut worst_erf = 0f64;
    for i in -10 * 1024..=10 * 1024 {
        let x = i as f32 / 1024.0;
        let err = (erf(x) as f64 - libm::erf(x as f64)).abs();
        worst_erf = worst_erf.max(err);
    }
    assert!(worst_erf < 4e-7, "{rule}: erf is off by up to {worst_erf}");
    assert_eq!(erf(-0.0).to_bits(), (-0f32).to_bits());
    assert_eq!(erf(f32::INFINITY), 1.0);
    assert_eq!(erf(f32::NEG_INFINITY), -1.0);
    let mut worst_exp = 0f64;
    for i in -87 * 256..=88 * 256 {
        let x = i as f32 / 256.0;
        let exact = (x as f64).exp();
        worst_exp = worst_exp.max(((exp(x) as f64 - exact) / exact).abs());
    }
    assert!(
        worst_exp < 3.0 * f32::EPSILON as f64,
        "{rule}: exp is off by up to {worst_exp} relative"
    );
    assert_eq!(exp(0.0), 1.0);
    // Never a subnormal: exactly 0 below -87.3, normal at it; NaN passes through.
    assert!(exp(-87.3) >= f32::MIN_POSITIVE);
    for x in [-87.31, -100.0, -1e4, f32::NEG_INFINITY] {
        assert_eq!(exp(x).to_bits(), 0, "{rule}: exp({x})");
    }
    assert!(exp(f32::NAN).is_nan());
    assert_eq!(exp(88.8), f32::INFINITY);
    // GELU itself: erf's absolute error times |x| / 2, plus float32 rounding (as with libm's
    // `erff`, `1 + erf(x)` cancels to 0 below x ≈ −5.5).
    for i in -8 * 512..=8 * 512 {
        let x = i as f32 / 512.0;
        let exact = 0.5 * x as f64 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2));
        let got = gelu_erf_value::<M>(x) as f64;
        assert!(
            (got - exact).abs() <= 4e-7 * (x.abs() as f64).max(1e-6),
            "{rule}: gelu({x}) = {got}, exact {exact}"
        );
    }
}

/// Every element of `a` and `b` the same bits (both converted to float32 exactly).
fn assert_same_bits(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dtype(), b.dtype(), "{what}");
    assert_eq!(a.dims(), b.dims(), "{what}");
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        v.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    assert!(bits(a) == bits(b), "{what}: the bits differ");
}

#[test]
fn half_precision_norms_and_residual_sums_equal_their_compositions_bit_for_bit() {
    // A block under autocast: the float32 residual stream normalised into the compute dtype,
    // and a compute-dtype branch added back. The ops round once where the composition casts.
    let x = rand(&[37, 130], 21);
    let (w, b) = (rand(&[130], 22), rand(&[130], 23));
    for dtype in [DType::BF16, DType::F16] {
        let inputs = [x.clone(), w.clone(), b.clone()];
        let op = value_and_grads(&inputs, |t| {
            layer_norm_to(&t[0], &t[1], &t[2], 1e-5, dtype).unwrap()
        });
        let composed = value_and_grads(&inputs, |t| {
            layer_norm(&t[0], &t[1], &t[2], 1e-5)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        });
        assert_same_bits(&op.0, &composed.0, "layer_norm_to");
        for (i, (a, c)) in op.1.iter().zip(&composed.1).enumerate() {
            assert_same_bits(a, c, &format!("layer_norm_to's gradient {i}"));
        }
        let branch = rand(&[37, 130], 24).to_dtype(dtype).unwrap();
        let inputs = [x.clone(), branch];
        let op = value_and_grads(&inputs, |t| add_widened(&t[0], &t[1]).unwrap());
        let composed = value_and_grads(&inputs, |t| {
            (&t[0] + t[1].to_dtype(DType::F32).unwrap()).unwrap()
        });
        assert_eq!(op.0.dtype(), DType::F32);
        assert_same_bits(&op.0, &composed.0, "add_widened");
        assert_eq!(op.1[1].dtype(), dtype, "the branch's gradient in its dtype");
        for (i, (a, c)) in op.1.iter().zip(&composed.1).enumerate() {
            assert_same_bits(a, c, &format!("add_widened's gradient {i}"));
        }
    }
    // Float32 in and out: the plain ops.
    let plain = layer_norm_to(&x, &w, &b, 1e-5, DType::F32).unwrap();
    assert_same_bits(
        &plain,
        &layer_norm(&x, &w, &b, 1e-5).unwrap(),
        "float32 norm",
    );
    let sum = add_widened(&x, &x).unwrap();
    assert_same_bits(&sum, &(&x + &x).unwrap(), "float32 sum");
}
