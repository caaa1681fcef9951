//! Vendored candle-core change 12 (vendor/README.md): bf16 products on AMX tiles and on
//! AVX-512 BF16 against the widening path and the exact sums.

use candle_core::cpu_backend::amx::{widened_on_this_thread, with_kernel_on_this_thread, Kernel};
use candle_core::{DType, Device, Tensor, D};
use half::bf16;

/// Deterministic bf16 values in [-4, 4) (no specials: the products are compared as numbers).
fn bf16_operand(n: usize, seed: u32) -> Vec<bf16> {
    (0..n as u32)
        .map(|i| {
            let h = (i ^ seed).wrapping_mul(2_654_435_761).rotate_left(13) ^ seed;
            bf16::from_f32((h % 8192) as f32 / 1024.0 - 4.0)
        })
        .collect()
}

#[test]
fn bf16_products_on_native_kernels_equal_the_widened_products_within_their_rounding() {
    // vendor/candle-core change 12: on CPUs with AMX or AVX-512 BF16, bf16 products multiply
    // bf16 pairs into float32 sums. Each kernel the CPU has is checked, whichever the process
    // chose: each output must be the exact sum of products (f64 here) up to float32
    // accumulation and one bf16 rounding, as the widening path's is, for shapes that fill no
    // tile or register block exactly, transposed operands, batches (with a shared right-hand
    // side) and the attention layout; and most outputs the widening path's bits.
    let kernels = Kernel::available();
    if kernels.is_empty() {
        eprintln!("skipped: this CPU has neither AMX-BF16 (granted) nor AVX-512 BF16");
        return;
    }
    for kernel in kernels {
        check_kernel(kernel);
    }
}

fn check_kernel(kernel: Kernel) {
    let name_of = kernel.name();
    let dev = &Device::Cpu;
    let tensor = |dims: &[usize], seed: u32| {
        let n = dims.iter().product();
        Tensor::from_vec(bf16_operand(n, seed), dims, dev).unwrap()
    };
    let cases: Vec<(&str, Tensor, Tensor)> = vec![
        ("1x1x1", tensor(&[1, 1], 1), tensor(&[1, 1], 2)),
        ("nine rows", tensor(&[9, 70], 23), tensor(&[70, 33], 24)),
        ("odd", tensor(&[33, 31], 3), tensor(&[31, 17], 4)),
        ("wide", tensor(&[70, 300], 5), tensor(&[300, 1000], 6)),
        ("linear", tensor(&[400, 768], 7), tensor(&[768, 300], 8)),
        (
            "rows split",
            tensor(&[300, 200], 21),
            tensor(&[200, 40], 22),
        ),
        (
            "lhs transposed",
            tensor(&[300, 70], 9).t().unwrap(),
            tensor(&[300, 129], 10),
        ),
        (
            "rhs transposed",
            tensor(&[65, 96], 11),
            tensor(&[200, 96], 12).t().unwrap(),
        ),
        (
            "batched",
            tensor(&[5, 20, 40], 13),
            tensor(&[5, 40, 50], 14),
        ),
        (
            "shared rhs",
            tensor(&[3, 20, 40], 15),
            tensor(&[40, 50], 16).broadcast_left(3).unwrap(),
        ),
        (
            "attention",
            tensor(&[2, 3, 50, 64], 17),
            tensor(&[2, 3, 50, 64], 18).transpose(2, 3).unwrap(),
        ),
    ];
    for (name, a, b) in cases {
        let got = with_kernel_on_this_thread(Some(kernel), || a.matmul(&b)).unwrap();
        let widened = widened_on_this_thread(|| a.matmul(&b)).unwrap();
        assert_eq!(got.dims(), widened.dims(), "{name_of}: {name}");
        let (a64, b64) = (
            a.to_dtype(DType::F64).unwrap(),
            b.to_dtype(DType::F64).unwrap(),
        );
        let exact = a64.matmul(&b64.contiguous().unwrap()).unwrap();
        // Σ|a·b| bounds float32's accumulation error (k terms, 2⁻²⁴ each, a margin of 4).
        let magnitude = a64
            .abs()
            .unwrap()
            .matmul(&b64.abs().unwrap().contiguous().unwrap())
            .unwrap();
        let k = a.dim(D::Minus1).unwrap() as f64;
        let flat = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let (got, widened, exact, magnitude) =
            (flat(&got), flat(&widened), flat(&exact), flat(&magnitude));
        let mut same = 0;
        for i in 0..got.len() {
            let bound = exact[i].abs() * 2f64.powi(-8) + 4.0 * k * magnitude[i] * 2f64.powi(-24);
            for (path, v) in [(name_of, got[i]), ("widened", widened[i])] {
                assert!(
                    (v - exact[i]).abs() <= bound,
                    "{name_of}: {name}, element {i}: {path} gives {v}, the exact sum is {}",
                    exact[i]
                );
            }
            same += usize::from(got[i] == widened[i]);
        }
        assert!(
            same * 10 >= got.len() * 9,
            "{name_of}: {name}: only {same} of {} outputs equal the widened path's",
            got.len()
        );
    }
    // A NaN or an infinity reaches exactly the outputs it feeds, as in the widened product.
    let mut a = bf16_operand(40 * 70, 19);
    a[3 * 70 + 5] = bf16::NAN;
    a[7 * 70 + 69] = bf16::INFINITY;
    let a = Tensor::from_vec(a, (40, 70), dev).unwrap();
    let b = tensor(&[70, 45], 20);
    let got = flat_f32(&with_kernel_on_this_thread(Some(kernel), || a.matmul(&b)).unwrap());
    let want = flat_f32(&widened_on_this_thread(|| a.matmul(&b)).unwrap());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.is_nan(), w.is_nan(), "element {i}: {g} vs {w}");
        assert_eq!(g.is_infinite(), w.is_infinite(), "element {i}: {g} vs {w}");
    }
    assert!(got[3 * 45..4 * 45].iter().all(|v| v.is_nan()));
}

fn flat_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}
