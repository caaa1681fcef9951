//! The vendored candle-core's changes (vendor/README.md), checked where this crate uses them:
//! transposed copies, unfilled product outputs, graph handles, and the half-precision
//! conversions and additions (the backward pass's changes: `candle_backprop_tests.rs`).

use candle_core::cpu_backend::amx::widened_on_this_thread;
use candle_core::{DType, Device, Tensor, Var};
use half::{bf16, f16};

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

/// Whether `t`'s storage (on the CPU) is a graph handle's: one element for a larger tensor.
fn is_handle(t: &Tensor) -> bool {
    use candle_core::{CpuStorage, Storage};
    let (storage, _) = t.storage_and_layout();
    let len = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => v.len(),
        Storage::Cpu(CpuStorage::BF16(v)) => v.len(),
        other => panic!("a {:?} storage in this test", other.dtype()),
    };
    len == 1 && t.elem_count() > 1
}

#[test]
fn a_branch_added_to_the_residual_stream_is_not_kept_by_the_graph() {
    // A linear layer's output (a product with its bias, reshaped) added to the float32
    // residual stream by `add_widened`, whose backward reads no values: the graph holds the
    // branch and the product under it as handles (vendored candle's `graph_handle`), so their
    // storage is freed when the caller drops them, and the gradients are the composition's.
    use crate::compare::max_abs_diff;
    use crate::model::layers::matmul_last;
    use crate::model::ops::add_widened;
    let var = |shape: &[usize], seed: u64| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32) / 500.0 - 1.0)
            .collect();
        Var::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    // Widths that tell the branch ([4, 8, 16]) from the input ([4, 8, 24]) by element count.
    let (x, h, w, b) = (
        var(&[4, 8, 16], 1),
        var(&[4, 8, 24], 2),
        var(&[16, 24], 3),
        var(&[16], 4),
    );
    for dtype in [DType::F32, DType::BF16] {
        let forward = |fused: bool| {
            let branch =
                matmul_last(&h.to_dtype(dtype).unwrap(), &w.t().unwrap(), Some(&b)).unwrap();
            let y = match fused {
                true => add_widened(&x, &branch).unwrap(),
                false => (x.as_tensor() + branch.to_dtype(DType::F32).unwrap()).unwrap(),
            };
            (y, branch.id())
        };
        let (y, branch_id) = forward(true);
        let nodes = y.sorted_nodes();
        let branch_sized: Vec<_> = nodes
            .iter()
            .filter(|n| n.id() != y.id() && !n.is_variable())
            .filter(|n| n.elem_count() == 512 && n.dtype() == dtype)
            .collect();
        // The branch, the product it reshapes and, where the bias is added apart (bf16 on the
        // CPU), the product before its bias and the bias broadcast.
        assert!(
            branch_sized.iter().any(|n| n.id() == branch_id),
            "{dtype:?}"
        );
        assert!(branch_sized.len() >= 2, "{dtype:?}");
        assert!(branch_sized.iter().all(|n| is_handle(n)), "{dtype:?}");
        let (plain, _) = forward(false);
        let plain_nodes = plain.sorted_nodes();
        let kept = |n: &&&Tensor| n.id() != plain.id() && n.elem_count() == 512 && !is_handle(n);
        assert!(plain_nodes
            .iter()
            .filter(|n| !n.is_variable())
            .any(|n| kept(&n)));
        // The same numbers and gradients as the composition.
        assert_eq!(max_abs_diff(&y, &plain).unwrap(), 0.0, "{dtype:?}");
        let weights = (Tensor::arange(0f32, 512.0, &Device::Cpu).unwrap() * 0.01)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((4, 8, 16))
            .unwrap();
        let [g, g_plain] = [&y, &plain].map(|t| {
            (t * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        });
        for v in [&x, &h, &w, &b] {
            let (a, c) = (g.get(v).unwrap(), g_plain.get(v).unwrap());
            let diff = max_abs_diff(a, c).unwrap();
            assert_eq!(diff, 0.0, "{dtype:?} {:?}", v.dims());
        }
    }
}

/// `n` float32 values covering what the conversions must round alike: bf16 and f16 rounding
/// ties, subnormals of each type, ±0, ±∞, NaN, values beyond f16's range.
fn conversion_values(n: usize) -> Vec<f32> {
    let specials = [
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE / 3.0,
        1e-39,
        -5e-40,
        6e-8,
        70000.0,
        -1e30,
        f32::from_bits(0x3F80_8000), // 1 + 2⁻⁸: halfway between two bf16 values, rounds down to even
        f32::from_bits(0x3F81_8000), // 1 + 3·2⁻⁸: a bf16 tie that rounds up to even
        f32::from_bits(0x3F80_1000), // 1 + 2⁻¹¹: halfway between two f16 values
    ];
    (0..n as u32)
        .map(|i| match i as usize % 97 {
            k if k < specials.len() => specials[k],
            _ => {
                let h = i.wrapping_mul(2_654_435_761) ^ (i >> 7);
                // Any bit pattern with a finite exponent: halves land on rounding ties.
                let bits = h & 0x807f_ffff | ((h >> 9) % 254 + 1) << 23;
                f32::from_bits(bits)
            }
        })
        .collect()
}

fn bits<T: Copy, const N: usize>(v: &[T], to: fn(T) -> [u8; N]) -> Vec<[u8; N]> {
    v.iter().map(|&x| to(x)).collect()
}

#[test]
fn half_precision_conversions_split_over_threads_give_the_elementwise_values() {
    // vendor/candle-core change 10 converts between float32 and the half types in parallel
    // chunks (at 64 Ki elements and above); every element must still be `half`'s conversion,
    // NaN included (compared as bits). Odd lengths, a view with an offset, a transposed view.
    for n in [5, 65_536 + 3, 3 * 65_536 + 1001] {
        let values = conversion_values(n);
        let t = Tensor::from_vec(values.clone(), n, &Device::Cpu).unwrap();
        let b: Vec<bf16> = t.to_dtype(DType::BF16).unwrap().to_vec1().unwrap();
        let want_b: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(
            bits(&b, bf16::to_le_bytes),
            bits(&want_b, bf16::to_le_bytes)
        );
        let h: Vec<f16> = t.to_dtype(DType::F16).unwrap().to_vec1().unwrap();
        let want_h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
        assert_eq!(bits(&h, f16::to_le_bytes), bits(&want_h, f16::to_le_bytes));
        for (half, want) in [
            (
                Tensor::new(want_b.as_slice(), &Device::Cpu).unwrap(),
                want_b.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
            ),
            (
                Tensor::new(want_h.as_slice(), &Device::Cpu).unwrap(),
                want_h.iter().map(|v| v.to_f32()).collect(),
            ),
        ] {
            let back: Vec<f32> = half.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
            assert_eq!(bits(&back, f32::to_le_bytes), bits(&want, f32::to_le_bytes));
        }
    }
    // A whole matrix seen transposed (a weight `w.t()` that autocast casts) is copied in
    // blocks, then converted (change 11): each element where the view puts it, in every
    // direction, at a size over the parallel threshold and at an odd one.
    for (rows, cols) in [(300, 301), (7, 5)] {
        let values = conversion_values(rows * cols);
        let m = Tensor::from_vec(values.clone(), (rows, cols), &Device::Cpu).unwrap();
        let at = |i: usize, j: usize| values[j * cols + i]; // element (i, j) of `m.t()`
        let seen = |t: Tensor| t.t().unwrap();
        let b = seen(m.clone()).to_dtype(DType::BF16).unwrap();
        let h = seen(m.clone()).to_dtype(DType::F16).unwrap();
        let want_b: Vec<bf16> = (0..cols)
            .flat_map(|i| (0..rows).map(move |j| (i, j)))
            .map(|(i, j)| bf16::from_f32(at(i, j)))
            .collect();
        let want_h: Vec<f16> = (0..cols)
            .flat_map(|i| (0..rows).map(move |j| (i, j)))
            .map(|(i, j)| f16::from_f32(at(i, j)))
            .collect();
        let flat_b: Vec<bf16> = b.flatten_all().unwrap().to_vec1().unwrap();
        let flat_h: Vec<f16> = h.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            bits(&flat_b, bf16::to_le_bytes),
            bits(&want_b, bf16::to_le_bytes)
        );
        assert_eq!(
            bits(&flat_h, f16::to_le_bytes),
            bits(&want_h, f16::to_le_bytes)
        );
        // And back: half-precision matrices seen transposed, widened.
        for half in [
            b.t().unwrap().contiguous().unwrap(),
            h.t().unwrap().contiguous().unwrap(),
        ] {
            let widened: Vec<f32> = seen(half.clone())
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f32> = seen(half.to_dtype(DType::F32).unwrap())
                .contiguous()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(
                bits(&widened, f32::to_le_bytes),
                bits(&want, f32::to_le_bytes)
            );
        }
    }
    // Other strided views take the elementwise path: the same values.
    let values = conversion_values(300 * 301);
    let m = Tensor::from_vec(values.clone(), (300, 301), &Device::Cpu).unwrap();
    let view = m.narrow(1, 1, 299).unwrap().t().unwrap();
    let got: Vec<bf16> = view
        .to_dtype(DType::BF16)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<bf16> = (0..299)
        .flat_map(|j| (0..300).map(move |i| (i, j)))
        .map(|(i, j)| bf16::from_f32(values[i * 301 + 1 + j]))
        .collect();
    assert_eq!(
        bits(&got, bf16::to_le_bytes),
        bits(&want, bf16::to_le_bytes)
    );
}

#[test]
fn bf16_conversions_give_the_same_bits_at_every_vector_width() {
    // vendor/candle-core change 11 compiles bf16's conversion loops for AVX2 and AVX-512 and
    // runs the widest the CPU has (or `COCA_CPU_KERNELS` allows): each width must give
    // `half`'s bits for every element (NaN, ties, subnormals, infinities), and an odd length
    // leaves a remainder after the vector loop.
    use candle_core::cpu_backend::convert::{convert_with, VectorWidth};
    let values = conversion_values(4099);
    let want_b: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    let want_back: Vec<f32> = want_b.iter().map(|v| v.to_f32()).collect();
    let widths = VectorWidth::available();
    assert!(widths.contains(&VectorWidth::Portable));
    for width in widths {
        let mut b = vec![bf16::ZERO; values.len()];
        convert_with(width, &values, &mut b, bf16::from_f32);
        assert_eq!(
            bits(&b, bf16::to_le_bytes),
            bits(&want_b, bf16::to_le_bytes),
            "{width:?}"
        );
        let mut back = vec![0f32; values.len()];
        convert_with(width, &want_b, &mut back, bf16::to_f32);
        assert_eq!(
            bits(&back, f32::to_le_bytes),
            bits(&want_back, f32::to_le_bytes),
            "{width:?}"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if !VectorWidth::Avx512.is_available() {
        eprintln!("skipped: this CPU has no AVX-512, so its conversion loop was not compared");
    }
}

#[test]
fn bf16_products_and_sums_round_as_half_does_on_every_cpu() {
    // A bf16 product is computed in float32 and rounded once (the operands and the result
    // converted in parallel, change 10); a bf16 addition rounds each sum as `bf16 + bf16`
    // does, subnormal results included (0.11.1's AVX-512 BF16 path flushed them to zero on
    // CPUs that have it, so this fails there with its vec_add restored).
    let (m, k, n) = (70, 300, 1000); // the product's output over the parallel threshold
    let a: Vec<bf16> = conversion_values(m * k)
        .iter()
        .map(|&v| bf16::from_f32(v.clamp(-4.0, 4.0)))
        .collect();
    let b: Vec<bf16> = conversion_values(k * n + 7)[7..]
        .iter()
        .map(|&v| bf16::from_f32(v.clamp(-4.0, 4.0)))
        .collect();
    let ta = Tensor::from_vec(a.clone(), (m, k), &Device::Cpu).unwrap();
    let tb = Tensor::from_vec(b.clone(), (k, n), &Device::Cpu).unwrap();
    // The widening path (on CPUs with AMX the products run on tiles: the next test).
    let got: Vec<bf16> = widened_on_this_thread(|| ta.matmul(&tb))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let a32 = ta.to_dtype(DType::F32).unwrap();
    let b32 = tb.to_dtype(DType::F32).unwrap();
    let want: Vec<bf16> = a32
        .matmul(&b32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    assert_eq!(
        bits(&got, bf16::to_le_bytes),
        bits(&want, bf16::to_le_bytes)
    );

    // Additions: rows plus a broadcast bias (the linear layers' path) and two whole tensors,
    // with pairs whose sums are bf16 subnormals.
    let (rows, cols) = (40, 3000);
    let tiny = [3e-39f32, 2e-39, -1e-39, 4e-40];
    let x: Vec<bf16> = (0..rows * cols)
        .map(|i| {
            bf16::from_f32(if i % 5 == 0 {
                tiny[i % 4]
            } else {
                conversion_values(1 + i % 97)[i % 97]
            })
        })
        .collect();
    let bias: Vec<bf16> = (0..cols)
        .map(|j| {
            bf16::from_f32(if j % 2 == 0 {
                tiny[(j / 2) % 4]
            } else {
                j as f32 * 0.37 - 50.0
            })
        })
        .collect();
    let tx = Tensor::from_vec(x.clone(), (rows, cols), &Device::Cpu).unwrap();
    let tbias = Tensor::from_vec(bias.clone(), cols, &Device::Cpu).unwrap();
    let sum = |p: bf16, q: bf16| bf16::from_f32(p.to_f32() + q.to_f32());
    let got: Vec<bf16> = tx
        .broadcast_add(&tbias)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<bf16> = (0..rows * cols)
        .map(|i| sum(x[i], bias[i % cols]))
        .collect();
    assert!(
        want.iter()
            .any(|v| v.to_f32() != 0.0 && v.to_f32().abs() < f32::MIN_POSITIVE),
        "the case must produce subnormal sums"
    );
    assert_eq!(
        bits(&got, bf16::to_le_bytes),
        bits(&want, bf16::to_le_bytes)
    );
    let got: Vec<bf16> = (&tx + &tx)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<bf16> = x.iter().map(|&v| sum(v, v)).collect();
    assert_eq!(
        bits(&got, bf16::to_le_bytes),
        bits(&want, bf16::to_le_bytes)
    );
}
