//! The portable compositions against the fused kernels, forward and the gradient of every
//! input, on shapes like the model's (odd widths, causal and padding masks, fully masked rows,
//! ignored targets); and their dtype rules for half-precision inputs.

use super::tests::{rand, value_and_grads};
use super::*;
use candle_core::{DType, Device, Tensor};

/// Portable against fused: each difference at most this much of the larger of 1 and the
/// fused tensor's largest element.
const TOL: f32 = 1e-5;

/// Largest `|a − b|` over the larger of 1 and `max |b|`; infinite if either holds a NaN or an
/// infinity where the other does not agree.
fn scaled_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let flat = |t: &Tensor| -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(&b).fold(0f32, |m, (x, y)| {
        let d = (x - y).abs();
        m.max(if d.is_nan() { f32::INFINITY } else { d })
    });
    worst / scale
}

/// Runs `fused` (which must reach the fused kernel) and `portable` on fresh variables of
/// `inputs`, asserts that the outputs and every input's gradient agree within [`TOL`], and
/// returns both runs.
fn assert_portable_matches(
    what: &str,
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Tensor,
    portable: impl Fn(&[Tensor]) -> Tensor,
) -> [(Tensor, Vec<Tensor>); 2] {
    assert!(
        !portable_forced(),
        "unset {PORTABLE_OPS_ENV}: these tests compare with the fused kernels"
    );
    let before = fused_dispatches();
    let reference = value_and_grads(inputs, fused);
    assert!(fused_dispatches() > before, "{what}: no fused kernel ran");
    let ours = value_and_grads(inputs, portable);
    let mut worst = scaled_diff(&ours.0, &reference.0);
    assert!(worst <= TOL, "{what}: forward differs by {worst}");
    for (i, (a, b)) in ours.1.iter().zip(&reference.1).enumerate() {
        let d = scaled_diff(a, b);
        assert!(d <= TOL, "{what}: gradient of input {i} differs by {d}");
        worst = worst.max(d);
    }
    eprintln!("{what}: portable vs fused within {worst:e}");
    [ours, reference]
}

#[test]
fn layer_norm_portable_matches_fused() {
    for (shape, seed) in [(&[2, 50, 64][..], 1), (&[3, 77, 37], 4), (&[5, 768], 7)] {
        let d = shape[shape.len() - 1];
        let x = ((rand(shape, seed) * 3.0).unwrap() + 1.5).unwrap();
        let inputs = [x, rand(&[d], seed + 1), rand(&[d], seed + 2)];
        assert_portable_matches(
            &format!("layer norm {shape:?}"),
            &inputs,
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            |t| portable::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        );
    }
}

/// An additive mask of 0 and −∞ where `masked(row, col)`.
fn mask(rows: usize, cols: usize, masked: impl Fn(usize, usize) -> bool) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| match masked(i / cols, i % cols) {
            true => f32::NEG_INFINITY,
            false => 0.0,
        })
        .collect()
}

#[test]
fn softmaxes_portable_match_fused() {
    let x = rand(&[3, 50, 49], 10);
    assert_portable_matches(
        "softmax",
        &[x],
        |t| softmax_last_dim(&t[0]).unwrap(),
        |t| portable::softmax_last_dim(&t[0]).unwrap(),
    );
    // The text tower's shape: causal [T, T], 1/√64 scale.
    let t = 77;
    let causal = Tensor::from_vec(mask(t, t, |q, k| k > q), (t, t), &Device::Cpu).unwrap();
    let scores = (rand(&[2, 3, t, t], 11) * 4.0).unwrap();
    assert_portable_matches(
        "causal masked softmax",
        &[scores],
        |x| masked_softmax(&x[0], Some(&causal), 0.125).unwrap(),
        |x| portable::masked_softmax(&x[0], Some(&causal), 0.125).unwrap(),
    );
    // Per-sample padding masks [B, T, S] with one fully masked row (sample 1, query 3).
    let (b, h, t, s) = (2, 3, 9, 11);
    let per_sample = mask(b * t, s, |row, k| {
        let (sample, q) = (row / t, row % t);
        (sample == 1 && q == 3) || k > q + 2 || (k + sample) % 5 == 4
    });
    let per_sample = Tensor::from_vec(per_sample, (b, t, s), &Device::Cpu).unwrap();
    let scores = rand(&[b, h, t, s], 12);
    let [ours, _] = assert_portable_matches(
        "padding masked softmax",
        std::slice::from_ref(&scores),
        |x| masked_softmax(&x[0], Some(&per_sample), 0.35).unwrap(),
        |x| portable::masked_softmax(&x[0], Some(&per_sample), 0.35).unwrap(),
    );
    // The fully masked row: zeros and no gradient, never NaN.
    for tensor in [&ours.0, &ours.1[0]] {
        for head in 0..h {
            let row = tensor.get(1).unwrap().get(head).unwrap().get(3).unwrap();
            assert_eq!(
                row.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
    }
    assert_portable_matches(
        "scaled softmax without a mask",
        &[scores],
        |x| masked_softmax(&x[0], None, 0.35).unwrap(),
        |x| portable::masked_softmax(&x[0], None, 0.35).unwrap(),
    );
}

#[test]
fn gelu_and_transpose_portable_match_fused() {
    let x = (rand(&[2, 50, 257], 13) * 4.0).unwrap();
    assert_portable_matches(
        "gelu",
        &[x],
        |t| gelu_erf(&t[0]).unwrap(),
        |t| portable::gelu_erf(&t[0]).unwrap(),
    );
    assert_portable_matches(
        "transpose",
        &[rand(&[37, 129], 14)],
        |t| transpose_contiguous(&t[0]).unwrap(),
        |t| portable::transpose_contiguous(&t[0]).unwrap(),
    );
}

#[test]
fn cross_entropy_portable_matches_fused() {
    let (n, v) = (37, 517);
    let logits = (rand(&[n, v], 15) * 5.0).unwrap();
    // Every fifth target is the ignored id 0; the others spread over the vocabulary.
    let targets: Vec<u32> = (0..n as u32)
        .map(|i| {
            if i % 5 == 2 {
                0
            } else {
                (i * 97 + 3) % v as u32
            }
        })
        .collect();
    let targets = Tensor::from_vec(targets, n, &Device::Cpu).unwrap();
    for ignore in [Some(0), None] {
        let [ours, _] = assert_portable_matches(
            &format!("cross-entropy, ignore {ignore:?}"),
            std::slice::from_ref(&logits),
            |x| cross_entropy_rows(&x[0], &targets, ignore).unwrap(),
            |x| portable::cross_entropy_rows(&x[0], &targets, ignore).unwrap(),
        );
        if ignore.is_some() {
            let loss = ours.0.to_vec1::<f32>().unwrap();
            for row in (2..n).step_by(5) {
                assert_eq!(loss[row], 0.0);
                let grad = ours.1[0].get(row).unwrap().abs().unwrap();
                assert_eq!(grad.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
            }
        }
    }
    // The contrastive loss passes a transpose: strided logits.
    let transposed = logits.t().unwrap().contiguous().unwrap();
    assert_portable_matches(
        "cross-entropy of a transpose",
        &[transposed],
        |x| cross_entropy_rows(&x[0].t().unwrap(), &targets, Some(0)).unwrap(),
        |x| portable::cross_entropy_rows(&x[0].t().unwrap(), &targets, Some(0)).unwrap(),
    );
    let bad = Tensor::from_vec(vec![v as u32; n], n, &Device::Cpu).unwrap();
    let err = portable::cross_entropy_rows(&logits, &bad, Some(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the 517 classes"), "{err}");
}

/// Half-precision inputs: the portable path computes in float32, so its result equals the
/// fused float32 kernel's on the same (exactly upcast) values, in the dtype autocast returns;
/// and it stays close to the float32 result on the unrounded inputs.
#[test]
fn half_precision_inputs_compute_in_float32() {
    for half in [DType::BF16, DType::F16] {
        let x32 = (rand(&[4, 9, 77], 20) * 3.0).unwrap();
        let (w32, b32) = (rand(&[77], 21), rand(&[77], 22));
        let h = |t: &Tensor| t.to_dtype(half).unwrap();
        let up = |t: &Tensor| t.to_dtype(half).unwrap().to_dtype(DType::F32).unwrap();
        let check =
            |what: &str, ours: Tensor, dtype: DType, exact: Tensor, tol: f32, rounded: Tensor| {
                assert_eq!(ours.dtype(), dtype, "{what} in {half:?}");
                let d = scaled_diff(&ours, &exact);
                assert!(
                    d <= tol,
                    "{what} in {half:?}: {d} from float32 on the same values"
                );
                let r = scaled_diff(&ours, &rounded);
                assert!(
                    r <= 5e-2,
                    "{what} in {half:?}: {r} from float32 on unrounded inputs"
                );
            };
        let ln = layer_norm(&h(&x32), &h(&w32), &h(&b32), 1e-5).unwrap();
        let exact = layer_norm(&up(&x32), &up(&w32), &up(&b32), 1e-5).unwrap();
        let rounded = layer_norm(&x32, &w32, &b32, 1e-5).unwrap();
        check("layer norm", ln, DType::F32, exact, TOL, rounded);
        let sm = softmax_last_dim(&h(&x32)).unwrap();
        check(
            "softmax",
            sm,
            DType::F32,
            softmax_last_dim(&up(&x32)).unwrap(),
            TOL,
            softmax_last_dim(&x32).unwrap(),
        );
        let scores = x32.reshape((2, 2, 9, 77)).unwrap();
        let m = Tensor::from_vec(mask(9, 77, |q, k| k > q + 40), (9, 77), &Device::Cpu).unwrap();
        let msm = masked_softmax(&h(&scores), Some(&h(&m)), 0.5).unwrap();
        check(
            "masked softmax",
            msm,
            DType::F32,
            masked_softmax(&up(&scores), Some(&m), 0.5).unwrap(),
            TOL,
            masked_softmax(&scores, Some(&m), 0.5).unwrap(),
        );
        // GELU keeps the input's dtype: one rounding of the float32 result.
        let g = gelu_erf(&h(&x32)).unwrap();
        let exact = gelu_erf(&up(&x32)).unwrap();
        check("gelu", g, half, exact, 1e-2, gelu_erf(&x32).unwrap());
        let logits = x32.reshape((36, 77)).unwrap();
        let targets =
            Tensor::from_vec((0..36u32).map(|i| i * 2).collect(), 36, &Device::Cpu).unwrap();
        let ce = cross_entropy_rows(&h(&logits), &targets, Some(0)).unwrap();
        check(
            "cross-entropy",
            ce,
            DType::F32,
            cross_entropy_rows(&up(&logits), &targets, Some(0)).unwrap(),
            TOL,
            cross_entropy_rows(&logits, &targets, Some(0)).unwrap(),
        );
        let t = transpose_contiguous(&h(&logits)).unwrap();
        check(
            "transpose",
            t,
            half,
            up(&logits).t().unwrap(),
            0.0,
            logits.t().unwrap(),
        );
        // Gradients reach half-precision inputs in their dtype, close to float32's.
        let (_, grads) = value_and_grads(&[h(&x32), h(&w32), h(&b32)], |t| {
            layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap()
        });
        let (_, reference) = value_and_grads(&[up(&x32), up(&w32), up(&b32)], |t| {
            layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap()
        });
        for (ours, theirs) in grads.iter().zip(&reference) {
            assert_eq!(ours.dtype(), half);
            let d = scaled_diff(ours, theirs);
            assert!(d <= 1e-2, "layer norm gradient in {half:?} differs by {d}");
        }
    }
}

/// Rows of 768 values around 271, exact in bfloat16: a bfloat16 running sum of them loses
/// whole units of the mean, the float32 statistics of the portable path do not.
#[test]
fn layer_norm_of_bf16_with_a_large_mean_uses_float32_statistics() {
    let d = 768;
    let row: Vec<f32> = (0..d).map(|j| 256.0 + 2.0 * (j % 16) as f32).collect();
    let x = Tensor::from_vec(row.repeat(3), (3, d), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let ones = Tensor::ones(d, DType::BF16, &Device::Cpu).unwrap();
    let zeros = Tensor::zeros(d, DType::BF16, &Device::Cpu).unwrap();
    let y = layer_norm(&x, &ones, &zeros, 1e-5).unwrap();
    // Mean 271, biased variance 4 · var(0..16) = 85, in float64.
    let expected: Vec<f32> = row
        .iter()
        .map(|&v| ((v as f64 - 271.0) / (85.0f64 + 1e-5).sqrt()) as f32)
        .collect();
    let expected = Tensor::from_vec(expected.repeat(3), (3, d), &Device::Cpu).unwrap();
    let err = scaled_diff(&y, &expected);
    assert!(
        err < 1e-5,
        "layer norm of a large-mean bf16 row is off by {err}"
    );
    // The control: the same mean from a bfloat16 running sum is far off.
    let bf16_sum = row
        .iter()
        .fold(half::bf16::ZERO, |s, &v| s + half::bf16::from_f32(v));
    let bf16_mean = bf16_sum.to_f32() / d as f32;
    assert!(
        (bf16_mean - 271.0).abs() > 1.0,
        "a bfloat16 sum gives mean {bf16_mean}"
    );
}

#[test]
fn dispatch_takes_the_fused_kernel_for_float32_on_the_cpu_only() {
    let x = rand(&[2, 3], 30);
    let h = x.to_dtype(DType::BF16).unwrap();
    let f = x.to_dtype(DType::F16).unwrap();
    let d = x.to_dtype(DType::F64).unwrap();
    assert_eq!(dispatch::fused(&[&x]), !portable_forced());
    assert!(!dispatch::fused(&[&h]));
    assert!(!dispatch::fused(&[&x, &h]));
    // Half precision on the CPU widens to float32 copies for the fused kernels; float32 alone
    // needs no copy, float64 is not narrowed.
    for (tensors, widened) in [
        (vec![&h], true),
        (vec![&x, &h], true),
        (vec![&f, &x], true),
        (vec![&x], false),
        (vec![&d], false),
        (vec![&h, &d], false),
    ] {
        let dtypes: Vec<DType> = tensors.iter().map(|t| t.dtype()).collect();
        assert_eq!(
            dispatch::widened_on_cpu(&tensors),
            widened && !portable_forced(),
            "{dtypes:?}"
        );
    }
}

/// Runs `op` and the portable composition `portable` on half-precision `inputs` and asserts
/// that `op` ran a fused kernel (on float32 copies), that both return and differentiate in the
/// same dtypes, and that they agree within `TOL` in float32 results and within one unit in the
/// last place of the half dtype (`half_tol`, relative to the larger of 1 and the largest
/// element) in half-precision ones.
fn assert_half_matches_portable(
    what: &str,
    inputs: &[Tensor],
    half_tol: f32,
    op: impl Fn(&[Tensor]) -> Tensor,
    portable: impl Fn(&[Tensor]) -> Tensor,
) {
    assert!(
        !portable_forced(),
        "unset {PORTABLE_OPS_ENV}: these tests compare with the fused kernels"
    );
    let before = fused_dispatches();
    let (out, grads) = value_and_grads(inputs, op);
    assert!(fused_dispatches() > before, "{what}: no fused kernel ran");
    let (p_out, p_grads) = value_and_grads(inputs, portable);
    let pairs = std::iter::once((&out, &p_out)).chain(grads.iter().zip(&p_grads));
    for (i, (ours, theirs)) in pairs.enumerate() {
        let part = if i == 0 {
            "the output".to_string()
        } else {
            format!("the gradient of input {}", i - 1)
        };
        assert_eq!(ours.dtype(), theirs.dtype(), "{what}: {part}'s dtype");
        let tol = if ours.dtype() == DType::F32 {
            TOL
        } else {
            half_tol
        };
        let d = scaled_diff(ours, theirs);
        assert!(d <= tol, "{what}: {part} differs by {d} (tolerance {tol})");
    }
}

#[test]
fn half_precision_inputs_run_the_fused_kernels_on_float32_copies() {
    let t = 9;
    let causal = Tensor::from_vec(mask(t, t, |q, k| k > q), (t, t), &Device::Cpu).unwrap();
    let (n, v) = (13, 101);
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % v as u32).collect();
    let targets = Tensor::from_vec(targets, n, &Device::Cpu).unwrap();
    // One unit in the last place of the half dtype (2⁻⁷ of a value in bfloat16, 2⁻¹⁰ in
    // float16): two nearly equal float32 results can round to neighbouring half values.
    for (half, half_tol) in [(DType::BF16, 1.0 / 128.0), (DType::F16, 1.0 / 1024.0)] {
        let h = |t: Tensor| t.to_dtype(half).unwrap();
        let what = |op: &str| format!("{op} in {half:?}");
        // The model's norms read float32 weights; the input is half.
        let ln_inputs = [
            h((rand(&[3, 7, 37], 40) * 3.0).unwrap()),
            rand(&[37], 41),
            rand(&[37], 42),
        ];
        assert_half_matches_portable(
            &what("layer norm"),
            &ln_inputs,
            half_tol,
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            |t| portable::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        );
        assert_half_matches_portable(
            &what("softmax"),
            &[h(rand(&[3, 5, 49], 43))],
            half_tol,
            |t| softmax_last_dim(&t[0]).unwrap(),
            |t| portable::softmax_last_dim(&t[0]).unwrap(),
        );
        assert_half_matches_portable(
            &what("causal masked softmax"),
            &[h((rand(&[2, 3, t, t], 44) * 4.0).unwrap())],
            half_tol,
            |x| masked_softmax(&x[0], Some(&causal), 0.125).unwrap(),
            |x| portable::masked_softmax(&x[0], Some(&causal), 0.125).unwrap(),
        );
        assert_half_matches_portable(
            &what("gelu"),
            &[h((rand(&[4, 257], 45) * 4.0).unwrap())],
            half_tol,
            |t| gelu_erf(&t[0]).unwrap(),
            |t| portable::gelu_erf(&t[0]).unwrap(),
        );
        assert_half_matches_portable(
            &what("cross-entropy"),
            &[h((rand(&[n, v], 46) * 5.0).unwrap())],
            half_tol,
            |x| cross_entropy_rows(&x[0], &targets, Some(5)).unwrap(),
            |x| portable::cross_entropy_rows(&x[0], &targets, Some(5)).unwrap(),
        );
    }
}

#[test]
fn the_environment_switch_reads_one_and_true() {
    for (value, on) in [
        (Some("1"), true),
        (Some("true"), true),
        (Some(" TRUE\n"), true),
        (Some("0"), false),
        (Some("false"), false),
        (Some(""), false),
        (None, false),
    ] {
        assert_eq!(dispatch::switch_on(value), on, "{value:?}");
    }
}
