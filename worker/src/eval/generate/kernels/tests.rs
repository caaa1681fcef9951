//! The products against candle and attention against its formula.

use super::*;
use candle_core::Device;

fn pseudo_random(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + seed) * 0.754_877_7).sin())
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Odd sizes (not multiples of the lanes or task sizes), streamed and through candle, in
/// float32 and from a bfloat16 copy.
#[test]
fn linear_and_project_match_candle() {
    let (inputs, outputs) = (37, 4099);
    let w = Tensor::from_vec(
        pseudo_random(outputs * inputs, 1.0),
        (outputs, inputs),
        &Device::Cpu,
    )
    .unwrap();
    let bias = pseudo_random(outputs, 2.0);
    let p = w.t().unwrap().contiguous().unwrap();
    let (w_view, p_view) = (
        F32View::new(&w, "w").unwrap(),
        F32View::new(&p, "p").unwrap(),
    );
    let (w_bf16, p_bf16) = (Matrix::bf16_of(&w_view), Matrix::bf16_of(&p_view));
    let (w_f32, p_f32) = (Matrix::F32(w_view), Matrix::F32(p_view));
    for rows in [1, 3, MAX_STREAMED_ROWS, MAX_STREAMED_ROWS + 1] {
        let x = pseudo_random(rows * inputs, rows as f32);
        let xt = Tensor::from_slice(&x, (rows, inputs), &Device::Cpu).unwrap();
        let expected = xt.matmul(&p).unwrap();
        let with_bias = expected
            .broadcast_add(&Tensor::new(bias.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        let theirs: Vec<f32> = with_bias.flatten_all().unwrap().to_vec1().unwrap();
        let ours = linear(&x, &w_f32, &bias).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5, "linear, {rows} rows");
        // bfloat16 keeps 8 significant bits: |Σ w·x| errs by at most 2⁻⁸·Σ|w·x| ≤ 37/256.
        let ours = linear(&x, &w_bf16, &bias).unwrap();
        let err = max_diff(&ours, &theirs);
        assert!(
            err > 0.0 && err < 37.0 / 256.0,
            "bf16 linear, {rows} rows: {err}"
        );
        let theirs: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
        let ours: Vec<f32> = project(&x, &p_f32, inputs).unwrap().concat();
        assert!(max_diff(&ours, &theirs) < 1e-5, "project, {rows} rows");
        let ours: Vec<f32> = project(&x, &p_bf16, inputs).unwrap().concat();
        let err = max_diff(&ours, &theirs);
        assert!(
            err > 0.0 && err < 37.0 / 256.0,
            "bf16 project, {rows} rows: {err}"
        );
    }
    assert!(linear(&[0.0; 36], &w_f32, &bias).is_err());
}

/// One query against a cache with unused capacity, per head, against the formula, in both
/// layouts; a short cache (one task for every head) and a long one (a task per head).
#[test]
fn attend_is_softmax_attention_per_head() {
    for (heads, head_dim, capacity, len) in [(2, 3, 5, 4), (4, 64, 300, 290)] {
        attend_matches_the_formula(heads, head_dim, capacity, len);
    }
}

fn attend_matches_the_formula(heads: usize, head_dim: usize, capacity: usize, len: usize) {
    let width = heads * head_dim;
    let slots = [1, 0];
    let q = pseudo_random(2 * width, 3.0);
    let k = pseudo_random(2 * capacity * width, 4.0);
    let v = pseudo_random(2 * capacity * width, 5.0);
    for layout in [KvLayout::Interleaved, KvLayout::HeadMajor] {
        let kv = KvRows {
            k: &k,
            v: &v,
            capacity,
            len,
            layout,
        };
        let out = attend(&q, &kv, heads, &slots);
        for (r, &slot) in slots.iter().enumerate() {
            for h in 0..heads {
                let at = |m: &[f32], j: usize, d: usize| match layout {
                    KvLayout::Interleaved => m[(slot * capacity + j) * width + h * head_dim + d],
                    KvLayout::HeadMajor => m[((slot * heads + h) * capacity + j) * head_dim + d],
                };
                let scores: Vec<f32> = (0..len)
                    .map(|j| {
                        (0..head_dim)
                            .map(|d| q[r * width + h * head_dim + d] * at(&k, j, d))
                            .sum::<f32>()
                            / (head_dim as f32).sqrt()
                    })
                    .collect();
                let total: f32 = scores.iter().map(|s| s.exp()).sum();
                for d in 0..head_dim {
                    let expected: f32 = (0..len)
                        .map(|j| scores[j].exp() / total * at(&v, j, d))
                        .sum();
                    let got = out[r * width + h * head_dim + d];
                    assert!(
                        (got - expected).abs() < 1e-5 * expected.abs().max(1.0),
                        "row {r} head {h}: {got} vs {expected}"
                    );
                }
            }
        }
    }
}

/// The AVX2 loops sum exactly as the portable ones (bit for bit), so results do not depend on
/// the CPU; odd lengths exercise the tails.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_loops_equal_the_portable_ones_bit_for_bit() {
    if !has_avx2() {
        eprintln!("skipped: this CPU has no AVX2");
        return;
    }
    fn check<T: WeightElement>(convert: impl Fn(f32) -> T) {
        for n in [1, 7, 8, 15, 16, 37, 64, 515] {
            let w: Vec<T> = pseudo_random(n, 7.0).into_iter().map(&convert).collect();
            let x: Vec<Vec<f32>> = (0..4).map(|r| pseudo_random(n, 20.0 + r as f32)).collect();
            let bits = |t: &[f32]| t.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            // SAFETY (all AVX2 calls): the CPU supports AVX2 (checked above).
            let fast = unsafe { avx2::tile(&w, [&x[0][..], &x[1], &x[2], &x[3]]) };
            let portable = tile_portable(&w, [&x[0][..], &x[1], &x[2], &x[3]]);
            assert_eq!(bits(&fast), bits(&portable), "tile of 4 × {n}");
            let fast = unsafe { avx2::tile(&w, [&x[0][..]]) };
            let portable = tile_portable(&w, [&x[0][..]]);
            assert_eq!(bits(&fast), bits(&portable), "tile of 1 × {n}");
            let rows: Vec<Vec<T>> = (0..4)
                .map(|k| {
                    pseudo_random(n, k as f32)
                        .into_iter()
                        .map(&convert)
                        .collect()
                })
                .collect();
            let p = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
            let (mut fast, mut portable) = (pseudo_random(n, 9.0), pseudo_random(n, 9.0));
            unsafe { avx2::axpy4(&mut fast, [0.5, -1.25, 2.0, 0.75], p) };
            axpy4_portable(&mut portable, [0.5, -1.25, 2.0, 0.75], p);
            assert_eq!(bits(&fast), bits(&portable), "axpy4 of {n}");
        }
    }
    check(|v| v);
    check(half::bf16::from_f32);
}

/// A row's outputs do not depend on the rows streamed beside it (tiles of 1 to 4 rows, an odd
/// output count): the same bits alone as among 7 others.
#[test]
fn a_row_sums_the_same_alone_or_among_others() {
    let (inputs, outputs, rows) = (37, 71, MAX_STREAMED_ROWS);
    let w = Tensor::from_vec(
        pseudo_random(outputs * inputs, 3.0),
        (outputs, inputs),
        &Device::Cpu,
    )
    .unwrap();
    let w = Matrix::F32(F32View::new(&w, "w").unwrap());
    let bias = pseudo_random(outputs, 4.0);
    let x = pseudo_random(rows * inputs, 5.0);
    let together = linear(&x, &w, &bias).unwrap();
    for (r, expected) in together.chunks(outputs).enumerate() {
        let alone = linear(&x[r * inputs..(r + 1) * inputs], &w, &bias).unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&alone), bits(expected), "row {r}");
    }
}
