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
    use crate::simd::KernelFamily;
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
    for family in KernelFamily::available() {
        for ((name, a), b) in names.iter().zip(&reference).zip(&run(family)) {
            assert_bits(family, name, a, b);
        }
    }
}

#[test]
fn polynomial_erf_and_exp_are_accurate_over_their_range() {
    // Every 1/1024 from −10 to 10 (erf) and −87 to 88 (exp), against double precision.
    let mut worst_erf = 0f64;
    for i in -10 * 1024..=10 * 1024 {
        let x = i as f32 / 1024.0;
        let err = (math::erf(x) as f64 - libm::erf(x as f64)).abs();
        worst_erf = worst_erf.max(err);
    }
    assert!(worst_erf < 4e-7, "erf is off by up to {worst_erf}");
    assert_eq!(math::erf(-0.0).to_bits(), (-0f32).to_bits());
    assert_eq!(math::erf(f32::INFINITY), 1.0);
    assert_eq!(math::erf(f32::NEG_INFINITY), -1.0);
    let mut worst_exp = 0f64;
    for i in -87 * 256..=88 * 256 {
        let x = i as f32 / 256.0;
        let exact = (x as f64).exp();
        worst_exp = worst_exp.max(((math::exp(x) as f64 - exact) / exact).abs());
    }
    assert!(
        worst_exp < 3.0 * f32::EPSILON as f64,
        "exp is off by up to {worst_exp} relative"
    );
    assert_eq!(math::exp(0.0), 1.0);
    // Never a subnormal: exactly 0 below -87.3, normal at it; NaN passes through.
    assert!(math::exp(-87.3) >= f32::MIN_POSITIVE);
    for x in [-87.31, -100.0, -1e4, f32::NEG_INFINITY] {
        assert_eq!(math::exp(x).to_bits(), 0, "exp({x})");
    }
    assert!(math::exp(f32::NAN).is_nan());
    assert_eq!(math::exp(88.8), f32::INFINITY);
    // GELU itself: erf's absolute error times |x| / 2, plus float32 rounding (as with libm's
    // `erff`, `1 + erf(x)` cancels to 0 below x ≈ −5.5).
    for i in -8 * 512..=8 * 512 {
        let x = i as f32 / 512.0;
        let exact = 0.5 * x as f64 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2));
        let got = gelu_erf_value(x) as f64;
        assert!(
            (got - exact).abs() <= 4e-7 * (x.abs() as f64).max(1e-6),
            "gelu({x}) = {got}, exact {exact}"
        );
    }
}

#[test]
fn transposed_views_are_copied_exactly_by_the_patched_candle() {
    // vendor/candle-core copies 2-D transposed views (`w.t()`, and the gradients of weights
    // used through them) in blocks: odd shapes, an offset into the storage, other dtypes.
    for (rows, cols) in [(1, 5), (5, 1), (7, 9), (8, 8), (17, 33), (64, 3)] {
        // Values bfloat16 holds exactly.
        let storage: Vec<f32> = (0..(rows * cols + 6)).map(|i| (i % 256) as f32).collect();
        let full = Tensor::from_vec(storage, rows * cols + 6, &Device::Cpu).unwrap();
        // A `[cols, rows]` matrix starting 6 elements into the storage, seen transposed.
        let matrix = full
            .narrow(0, 6, rows * cols)
            .unwrap()
            .reshape((cols, rows))
            .unwrap();
        let want: Vec<f32> = (0..rows)
            .flat_map(|i| (0..cols).map(move |j| ((6 + j * rows + i) % 256) as f32))
            .collect();
        for dtype in [DType::F32, DType::BF16, DType::U32] {
            let got = matrix
                .to_dtype(dtype)
                .unwrap()
                .t()
                .unwrap()
                .contiguous()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got, want, "{rows}x{cols} {dtype:?}");
        }
    }
}

#[test]
fn narrowed_gradients_are_the_padded_sums_with_the_patched_candle() {
    // vendor/candle-core adds the gradients of a tensor's slices into one buffer of its shape
    // in place (attention's q, k and v are slices of one packed tensor). Integer values, so
    // every sum is exact whatever its order: the gradient must equal the padded sum exactly.
    let dims = [3usize, 2, 5, 4];
    let ints = |seed: usize, shape: &[usize]| {
        let count: usize = shape.iter().product();
        let v: Vec<f32> = (0..count)
            .map(|i| ((i * 7 + seed) % 11) as f32 - 5.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    // A [3, 2, 5, 4] tensor zero but for `w` at `start..` along `dim`.
    let padded = |w: &Tensor, dim: usize, start: usize| {
        let len = w.dim(dim).unwrap();
        let zeros = |size: usize| {
            let mut d = dims.to_vec();
            d[dim] = size;
            Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap()
        };
        let after = dims[dim] - start - len;
        Tensor::cat(&[&zeros(start), w, &zeros(after)], dim).unwrap()
    };
    let (w0, w1, w2) = (
        ints(1, &[2, 5, 4]),
        ints(2, &[2, 5, 4]),
        ints(3, &[3, 2, 3, 4]),
    );
    let (k, v, c) = (ints(4, &[2, 5, 4]), ints(5, &[2, 5, 4]), ints(6, &dims));
    let want = [
        padded(&w0.unsqueeze(0).unwrap(), 0, 0),
        padded(&w1.unsqueeze(0).unwrap(), 0, 1),
        padded(&w2, 2, 1),
        padded(&k.unsqueeze(0).unwrap(), 0, 1),
        padded(&v.unsqueeze(0).unwrap(), 0, 2),
        c.clone(),
    ]
    .iter()
    .fold(
        Tensor::zeros(&dims, DType::F32, &Device::Cpu).unwrap(),
        |a, b| (a + b).unwrap(),
    );
    for dtype in [DType::F32, DType::BF16] {
        for direct_first in [true, false] {
            let x = Var::from_tensor(&ints(0, &dims).to_dtype(dtype).unwrap()).unwrap();
            let x = x.as_tensor();
            let term = |t: Tensor, w: &Tensor| {
                (t * w.to_dtype(dtype).unwrap())
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let direct = term(x.clone(), &c);
            // Slices along the first dimension (the packed q, k, v; keys and values again
            // through a slice of two), overlapping ones along the third.
            let kv = x.narrow(0, 1, 2).unwrap();
            let mut loss = [
                term(x.get(0).unwrap(), &w0),
                term(x.get(1).unwrap(), &w1),
                term(x.narrow(2, 1, 3).unwrap(), &w2),
                term(kv.get(0).unwrap(), &k),
                term(kv.get(1).unwrap(), &v),
            ]
            .into_iter()
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
            loss = match direct_first {
                true => (direct + loss).unwrap(),
                false => (loss + direct).unwrap(),
            };
            let grads = loss.backward().unwrap();
            let got = grads.get(x).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(got.dims(), dims);
            let diff = crate::compare::max_abs_diff(&got, &want).unwrap();
            assert_eq!(diff, 0.0, "{dtype:?}, direct use first: {direct_first}");
        }
    }
}

/// An identity op for the backward-freeing test: `dropped` is set when the op (so the tensor it
/// made) is freed; `seen` records, when its backward runs, whether `dropped` was set then.
struct Marker {
    dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Drop for Marker {
    fn drop(&mut self) {
        if self.seen.is_none() {
            self.dropped
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl candle_core::CustomOp1 for Marker {
    fn name(&self) -> &'static str {
        "marker"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Ok((s.clone(), l.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if let Some(seen) = &self.seen {
            let dropped = self.dropped.load(std::sync::atomic::Ordering::SeqCst);
            seen.store(dropped, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(Some(grad.clone()))
    }
}

#[test]
fn the_patched_backward_frees_each_node_once_differentiated() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::Arc;
    // x → probe (records, in its backward, whether `marked` was freed) → marked → loss. The
    // backward pass differentiates `marked` before `probe`.
    for freeing in [false, true] {
        let (dropped, seen) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let x = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let probe = x
            .as_tensor()
            .apply_op1(Marker {
                dropped: dropped.clone(),
                seen: Some(seen.clone()),
            })
            .unwrap();
        let marked = probe
            .apply_op1(Marker {
                dropped: dropped.clone(),
                seen: None,
            })
            .unwrap();
        let loss = (&marked * &marked).unwrap().sum_all().unwrap();
        drop((probe, marked));
        let grads = match freeing {
            true => loss.backward_freeing().unwrap(),
            false => loss.backward().unwrap(),
        };
        // The graph was freed during the pass only by `backward_freeing` (`backward(&self)`'s
        // caller still holds the root).
        assert_eq!(seen.load(SeqCst), freeing);
        let g = grads.get(x.as_tensor()).unwrap();
        assert_eq!(g.to_vec1::<f32>().unwrap(), [2.0, 4.0, 6.0]);
        // A kept gradient holds no graph (it was a product with the activations).
        assert!(!g.track_op());
    }
}

#[test]
fn products_fill_their_unzeroed_outputs_completely() {
    // vendor/candle-core leaves a product's output buffer unfilled (gemm writes every element):
    // freed NaN-filled memory of the output's size is handed out again for it, and no NaN may
    // survive. Shapes: single elements, odd sizes, the batched small products, a batch of
    // products too large for that path, k = 0, and (float32 and float64, whose sums of up to
    // 2100 terms stay exact) one that vendor/gemm-common's blocking cuts along both k (chunks
    // of at most 1024 on a 48 KiB L1, fewer on a smaller one) and m (at most 8 × 64 rows).
    let all = [DType::F32, DType::F64, DType::BF16, DType::F16];
    for (b, m, k, n, dtypes) in [
        (1, 1, 1, 1, &all[..]),
        (1, 5, 3, 7, &all),
        (4, 50, 64, 50, &all),
        (2, 130, 130, 130, &all),
        (1, 400, 77, 33, &all),
        (3, 7, 1, 9, &all),
        (2, 3, 0, 4, &all),
        (1, 600, 2100, 70, &all[..2]),
    ] {
        // Values in {-1, 0, 1}: every sum is an integer of at most k, exact in each dtype
        // tried with it.
        let value = |i: usize, seed: usize| ((i * 7 + seed) % 3) as f64 - 1.0;
        let lhs: Vec<f64> = (0..b * m * k).map(|i| value(i, 1)).collect();
        let rhs: Vec<f64> = (0..b * k * n).map(|i| value(i, 2)).collect();
        let mut want = vec![0f64; b * m * n];
        for (e, w) in want.iter_mut().enumerate() {
            let (batch, i, j) = (e / (m * n), e / n % m, e % n);
            *w = (0..k)
                .map(|p| lhs[batch * m * k + i * k + p] * rhs[batch * k * n + p * n + j])
                .sum();
        }
        for &dtype in dtypes {
            let tensor = |v: &[f64], shape: (usize, usize, usize)| {
                Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (l, r) = (tensor(&lhs, (b, m, k)), tensor(&rhs, (b, k, n)));
            drop(
                Tensor::full(f64::NAN, (b, m, n), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            );
            let got = l.matmul(&r).unwrap().to_dtype(DType::F64).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let wrong = got.iter().zip(&want).position(|(g, w)| g != w);
            assert!(
                wrong.is_none(),
                "{b}x{m}x{k}x{n} {dtype:?}: element {wrong:?} differs"
            );
        }
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
