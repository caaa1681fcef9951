//! The CUDA kernels (`worker/kernels/fused_ops.cu`) run on the CPU under emulation
//! (`kernels/emulate.h`: one OS thread per CUDA thread, warp shuffles through a barrier of the
//! warp's lanes), launched with the geometry of `model::ops::launch` as the GPU launches them,
//! against the CPU ops: layer norm, masked and plain softmax, GELU, the cross-entropy's terms
//! (over the whole vocabulary and over a tensor-parallel slice), the bias add and the token
//! embedding, forward and backward, and AdamW's in-place update. This is how the GPU kernels
//! are proven without a GPU. Every kernel with bfloat16 and float16 entry points runs in all
//! three dtypes (inputs rounded to the dtype on both sides).
//!
//! Needs a C++17 compiler (`c++`, or `CXX`); without one the tests skip with a message.

use candle_core::{DType, Device, Tensor, Var};
use coca_worker::model::ops::{self, launch, launch::Geometry};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Each difference of a float32 output at most this much of the larger of 1 and the reference's
/// largest element.
const TOL: f32 = 2e-5;

/// The kernels' dtypes: entry-point suffix, candle dtype, and the tolerance of an output in
/// that dtype (one rounding: half a unit in the last place, with room).
const DTYPES: [(&str, DType, f32); 3] = [
    ("f32", DType::F32, TOL),
    ("bf16", DType::BF16, 8e-3),
    ("f16", DType::F16, 2e-3),
];

/// `v` rounded to `dtype` (as the emulator rounds the inputs it reads in that dtype).
fn rounded(v: Vec<f32>, dtype: DType) -> Vec<f32> {
    let n = v.len();
    f32s(&tensor(v, &[n]).to_dtype(dtype).unwrap())
}
/// The longest one emulated launch may take (a shuffle that not all lanes reach would hang).
const LAUNCH_LIMIT: Duration = Duration::from_secs(120);

/// The emulator binary, compiled once per test process; `None` (with a message) when there is
/// no C++ compiler.
fn emulator() -> Option<&'static Path> {
    static BINARY: OnceLock<Option<PathBuf>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
            let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("cuda-emulate-{}", std::process::id()));
            let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
            let compiled = Command::new(&cxx)
                .args(["-std=c++17", "-O1", "-pthread", "-Wall", "-Werror", "-I"])
                .arg(&kernels)
                .arg(kernels.join("emulate_main.cpp"))
                .arg("-o")
                .arg(&out)
                .output();
            match compiled {
                Ok(o) if o.status.success() => Some(out),
                Ok(o) => panic!(
                    "{cxx} failed on kernels/emulate_main.cpp:\n{}",
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => {
                    eprintln!("skipped: no C++ compiler to emulate the CUDA kernels ({cxx}: {e})");
                    None
                }
            }
        })
        .as_deref()
}

/// A kernel input: float32 or u32 values.
enum Input {
    F32(Vec<f32>),
    U32(Vec<u32>),
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Runs one entry point emulated on `geometry` with `scalars`, and returns `outputs`.
fn run(
    emulator: &Path,
    kernel: &str,
    geometry: Geometry,
    scalars: &[f64],
    inputs: &[(&str, Input)],
    outputs: &[&str],
) -> Vec<Vec<f32>> {
    let dir = tempfile::tempdir().unwrap();
    for (name, input) in inputs {
        let bytes: Vec<u8> = match input {
            Input::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Input::U32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        std::fs::write(dir.path().join(format!("{name}.bin")), bytes).unwrap();
    }
    let mut child = Command::new(emulator)
        .arg(kernel)
        .arg(dir.path())
        .args([geometry.grid.0, geometry.grid.1, geometry.block].map(|v| v.to_string()))
        .args(scalars.iter().map(|s| format!("{s:e}")))
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > LAUNCH_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{kernel} did not finish in {LAUNCH_LIMIT:?} (a shuffle some lanes never reach?)"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "{kernel}: {status}");
    outputs
        .iter()
        .map(|name| {
            let bytes = std::fs::read(dir.path().join(format!("{name}.out"))).unwrap();
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
        .collect()
}

/// Deterministic values in [-2, 2) (xorshift), independent of candle's RNG.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

fn tensor(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Asserts `got` equals `want` within `tol` of the larger of 1 and `want`'s largest element,
/// NaN only where `want` has NaN.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || (g - w).abs() <= tol * scale;
        assert!(
            ok,
            "{what}[{i}]: emulated kernel {g}, CPU {w} (scale {scale})"
        );
    }
}

/// `Σ out ⊙ g` backward from fresh variables: the gradient of every input for upstream `g`.
fn grads(inputs: &[Tensor], op: impl Fn(&[Tensor]) -> Tensor, g: &Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(&tensors);
    let store = (&out * g).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = tensors
        .iter()
        .map(|t| store.get(t).unwrap().clone())
        .collect();
    (out, grads)
}

#[test]
fn layer_norm_forward_and_backward_match_the_cpu_ops() {
    let Some(emu) = emulator() else { return };
    // 300 rows: two chunks of the weight and bias gradients; width 70: lanes with 2 and 3 values.
    let (rows, d, eps) = (300usize, 70usize, 1e-5f64);
    let (w, b, g) = (values(d, 2), values(d, 3), values(rows * d, 4));
    for (suffix, dtype, _) in DTYPES {
        let what = |part: &str| format!("layer norm {part} ({suffix})");
        let x: Vec<f32> = values(rows * d, 1).iter().map(|v| v * 3.0 + 1.5).collect();
        let x = rounded(x, dtype);
        let (out, want) = grads(
            &[
                tensor(x.clone(), &[rows, d]),
                tensor(w.clone(), &[d]),
                tensor(b.clone(), &[d]),
            ],
            |t| ops::layer_norm(&t[0], &t[1], &t[2], eps).unwrap(),
            &tensor(g.clone(), &[rows, d]),
        );
        let scalars = [rows as f64, d as f64, eps];
        let y = run(
            emu,
            &format!("layer_norm_fwd_{suffix}"),
            launch::rows(rows),
            &scalars,
            &[
                ("x", Input::F32(x.clone())),
                ("w", Input::F32(w.clone())),
                ("b", Input::F32(b.clone())),
            ],
            &["y"],
        );
        assert_close(&what("output"), &y[0], &f32s(&out), TOL);
        let dx_stats = run(
            emu,
            &format!("layer_norm_bwd_dx_{suffix}"),
            launch::rows(rows),
            &scalars,
            &[
                ("x", Input::F32(x.clone())),
                ("w", Input::F32(w.clone())),
                ("g", Input::F32(g.clone())),
            ],
            &["dx", "stats"],
        );
        assert_close(&what("dx"), &dx_stats[0], &f32s(&want[0]), TOL);
        let partial = run(
            emu,
            &format!("layer_norm_bwd_partials_{suffix}"),
            launch::column_partials(rows, d),
            &[rows as f64, d as f64, launch::COLUMN_CHUNK as f64],
            &[
                ("x", Input::F32(x)),
                ("g", Input::F32(g.clone())),
                ("stats", Input::F32(dx_stats[1].clone())),
            ],
            &["partial"],
        );
        let chunks = launch::column_chunks(rows);
        assert_eq!(chunks, 2);
        let sums = run(
            emu,
            "column_sum_f32",
            launch::columns(2 * d),
            &[chunks as f64, (2 * d) as f64],
            &[("partial", Input::F32(partial[0].clone()))],
            &["sums"],
        );
        assert_close(&what("dweight"), &sums[0][..d], &f32s(&want[1]), TOL);
        assert_close(&what("dbias"), &sums[0][d..], &f32s(&want[2]), TOL);
    }
}

#[test]
fn bias_add_and_its_gradient_match_the_cpu_ops() {
    let Some(emu) = emulator() else { return };
    // 520 rows: three chunks of the column sums; width 260: two blocks of columns.
    let (rows, d) = (520usize, 260usize);
    for (suffix, dtype, tol) in DTYPES {
        let what = |part: &str| format!("bias {part} ({suffix})");
        let y = rounded(values(rows * d, 15), dtype);
        let b = rounded(values(d, 16), dtype);
        let g = rounded(values(rows * d, 17), dtype);
        let (out, want) = grads(
            &[tensor(y.clone(), &[rows, d]), tensor(b.clone(), &[d])],
            |t| ops::add_bias(&t[0], &t[1]).unwrap(),
            &tensor(g.clone(), &[rows, d]),
        );
        let sum = run(
            emu,
            &format!("add_bias_{suffix}"),
            launch::elementwise(rows * d),
            &[(rows * d) as f64, d as f64],
            &[("y", Input::F32(y)), ("b", Input::F32(b))],
            &["out"],
        );
        assert_close(&what("add"), &sum[0], &f32s(&out), tol);
        let partial = run(
            emu,
            &format!("column_partials_{suffix}"),
            launch::column_partials(rows, d),
            &[rows as f64, d as f64, launch::COLUMN_CHUNK as f64],
            &[("g", Input::F32(g))],
            &["partial"],
        );
        let chunks = launch::column_chunks(rows);
        assert_eq!(chunks, 3);
        let db = run(
            emu,
            &format!("column_sum_{suffix}"),
            launch::columns(d),
            &[chunks as f64, d as f64],
            &[("partial", Input::F32(partial[0].clone()))],
            &["sums"],
        );
        // Summed in float32 from the rounded gradient, rounded once.
        assert_close(&what("gradient"), &db[0], &f32s(&want[1]), tol);
    }
}

/// The emulated softmax forward (every dtype) and backward (float32 probabilities) of
/// `[b, h, t, s]` scores against the CPU op.
fn check_softmax(what: &str, dims: [usize; 4], mask: Option<Tensor>, scale: f64) {
    let Some(emu) = emulator() else { return };
    let [b, h, t, s] = dims;
    let n = b * h * t * s;
    let g = values(n, 6);
    let rows = b * h * t;
    let mask_batch = match &mask {
        Some(m) if m.rank() == 3 => b,
        _ => 1,
    };
    for (suffix, dtype, _) in DTYPES {
        let what = format!("{what} ({suffix})");
        let x = rounded(values(n, 5), dtype);
        let (out, want) = grads(
            &[tensor(x.clone(), &dims)],
            |v| ops::masked_softmax(&v[0], mask.as_ref(), scale).unwrap(),
            &tensor(g.clone(), &dims),
        );
        let mut inputs = vec![("x", Input::F32(x))];
        if let Some(m) = &mask {
            inputs.push(("mask", Input::F32(f32s(m))));
        }
        let y = run(
            emu,
            &format!("softmax_fwd_{suffix}"),
            launch::rows(rows),
            &[
                rows as f64,
                s as f64,
                scale,
                t as f64,
                (h * t) as f64,
                mask_batch as f64,
            ],
            &inputs,
            &["y"],
        );
        assert_close(&what, &y[0], &f32s(&out), TOL);
        let dx = run(
            emu,
            "softmax_bwd_f32",
            launch::rows(rows),
            &[rows as f64, s as f64, scale],
            &[
                ("y", Input::F32(y[0].clone())),
                ("g", Input::F32(g.clone())),
            ],
            &["dx"],
        );
        assert_close(&format!("{what} backward"), &dx[0], &f32s(&want[0]), TOL);
    }
}

#[test]
fn softmaxes_match_the_cpu_ops() {
    let (t, s) = (5, 37);
    let causal: Vec<f32> = (0..t * s)
        .map(|i| {
            if i % s > i / s {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    check_softmax(
        "causal softmax",
        [2, 3, t, s],
        Some(tensor(causal, &[t, s])),
        0.3,
    );
    // Per-sample padding, with one row masked everywhere (zeros, as the CPU kernel).
    let mut padding = vec![0f32; 2 * t * s];
    for (i, m) in padding.iter_mut().enumerate() {
        let (sample, row, col) = (i / (t * s), i / s % t, i % s);
        if (sample == 1 && col >= 20) || (sample == 0 && row == 2) {
            *m = f32::NEG_INFINITY;
        }
    }
    check_softmax(
        "padding softmax",
        [2, 3, t, s],
        Some(tensor(padding, &[2, t, s])),
        0.125,
    );
    check_softmax("plain softmax", [1, 1, 9, 45], None, 1.0);
}

#[test]
fn gelu_forward_and_backward_match_the_cpu_ops() {
    let Some(emu) = emulator() else { return };
    let n = 1000;
    for (suffix, dtype, tol) in DTYPES {
        let what = |part: &str| format!("gelu {part} ({suffix})");
        let x = rounded(values(n, 7).iter().map(|v| v * 3.0).collect(), dtype);
        let g = rounded(values(n, 8), dtype);
        let (out, want) = grads(
            &[tensor(x.clone(), &[n])],
            |t| ops::gelu_erf(&t[0]).unwrap(),
            &tensor(g.clone(), &[n]),
        );
        let y = run(
            emu,
            &format!("gelu_fwd_{suffix}"),
            launch::elementwise(n),
            &[n as f64],
            &[("x", Input::F32(x.clone()))],
            &["y"],
        );
        assert_close(&what("output"), &y[0], &f32s(&out), tol);
        let dx = run(
            emu,
            &format!("gelu_bwd_{suffix}"),
            launch::elementwise(n),
            &[n as f64],
            &[("x", Input::F32(x)), ("g", Input::F32(g))],
            &["dx"],
        );
        assert_close(&what("backward"), &dx[0], &f32s(&want[0]), tol);
    }
}

#[test]
fn cross_entropy_terms_and_their_gradient_match_the_cpu_ops() {
    let Some(emu) = emulator() else { return };
    let (rows, v, ignore) = (9usize, 77usize, 50u32);
    // The whole vocabulary, and the middle slice of three (tensor parallelism's member 1):
    // targets in the slice (its first and last column too), before it and after it (the first
    // column past it too).
    for slice in [
        ops::VocabSlice::whole(v),
        ops::VocabSlice {
            start: v,
            vocab: 3 * v,
        },
    ] {
        let mut targets: Vec<u32> = (0..rows as u32)
            .map(|r| (r * 31 + 5) % slice.vocab as u32)
            .collect();
        targets[1] = slice.start as u32;
        targets[2] = (slice.start + v - 1) as u32;
        targets[3] = ignore;
        if slice.start + v < slice.vocab {
            targets[4] = (slice.start + v) as u32; // the next member's first column
        }
        let t = Tensor::from_vec(targets.clone(), rows, &Device::Cpu).unwrap();
        let g = values(2 * rows, 10);
        for (suffix, dtype, tol) in DTYPES {
            let what = |part: &str| format!("cross-entropy {part} ({suffix}, {slice:?})");
            let x = rounded(values(rows * v, 9).iter().map(|x| x * 4.0).collect(), dtype);
            let (stats, want) = grads(
                &[tensor(x.clone(), &[rows, v])],
                |l| ops::cross_entropy_stats(&l[0], &t, Some(ignore), slice).unwrap(),
                &tensor(g.clone(), &[2, rows]),
            );
            let scalars = [
                rows as f64,
                v as f64,
                ignore as f64,
                slice.start as f64,
                slice.vocab as f64,
            ];
            let got = run(
                emu,
                &format!("cross_entropy_stats_fwd_{suffix}"),
                launch::rows(rows),
                &scalars,
                &[
                    ("x", Input::F32(x.clone())),
                    ("targets", Input::U32(targets.clone())),
                ],
                &["stats"],
            );
            assert_close(&what("terms"), &got[0], &f32s(&stats), TOL);
            assert_eq!(
                [got[0][3], got[0][rows + 3]],
                [0.0, 0.0],
                "an ignored row's terms"
            );
            let mut aux = f32s(&stats)[..rows].to_vec();
            aux.extend(&g);
            let dx = run(
                emu,
                &format!("cross_entropy_stats_bwd_{suffix}"),
                launch::rows(rows),
                &scalars[..4],
                &[
                    ("x", Input::F32(x.clone())),
                    ("targets", Input::U32(targets.clone())),
                    ("aux", Input::F32(aux)),
                ],
                &["dx"],
            );
            assert_close(&what("backward"), &dx[0], &f32s(&want[0]), tol);
            // No ignored class (-1), and a target outside the vocabulary: a NaN target logit,
            // which makes the loss NaN and stops training (the CPU op reports an error
            // instead; the GPU never reads the targets back).
            let mut outside = targets.clone();
            outside[0] = slice.vocab as u32;
            let mut scalars = scalars;
            scalars[2] = -1.0;
            let got = run(
                emu,
                &format!("cross_entropy_stats_fwd_{suffix}"),
                launch::rows(rows),
                &scalars,
                &[("x", Input::F32(x)), ("targets", Input::U32(outside))],
                &["stats"],
            );
            assert!(
                got[0][rows].is_nan(),
                "an out-of-range target gives {}",
                got[0][rows]
            );
            assert!(got[0][3] > 0.0, "row 3 counts when nothing is ignored");
        }
    }
}

#[test]
fn embedding_lookup_and_its_gradient_match_candles_index_select() {
    let Some(emu) = emulator() else { return };
    // Padding (id 0) at every third position, other ids repeated far apart; width 40: lanes
    // with one and two values; one id outside the vocabulary. The whole table, and the middle
    // third of a vocabulary split over three tensor-parallel members (ids before, in and after
    // it), against candle's index_select (masked for the slice).
    let (v, d, n) = (50usize, 40usize, 70usize);
    for slice in [
        ops::VocabSlice::whole(v),
        ops::VocabSlice {
            start: v,
            vocab: 3 * v,
        },
    ] {
        let what = |part: &str| format!("embedding {part} ({slice:?})");
        let mut ids: Vec<u32> = (0..n as u32)
            .map(|i| (i * 17 + 3) % slice.vocab as u32)
            .collect();
        for i in (0..n).step_by(3) {
            ids[i] = 0;
        }
        // The slice's first and last ids, and the first id past it.
        ids[1] = slice.start as u32;
        ids[2] = (slice.start + v - 1) as u32;
        ids[4] = ((slice.start + v) % slice.vocab) as u32;
        let (table, g) = (values(v * d, 18), values(n * d, 19));
        let inside = Tensor::from_vec(ids.clone(), n, &Device::Cpu).unwrap();
        let (out, want) = grads(
            &[tensor(table.clone(), &[v, d])],
            |t| ops::portable::embedding_slice(&t[0], &inside, slice).unwrap(),
            &tensor(g.clone(), &[n, d]),
        );
        let original = ids[5] as usize;
        ids[5] = slice.vocab as u32;
        let scalars = [
            n as f64,
            d as f64,
            v as f64,
            slice.start as f64,
            slice.vocab as f64,
        ];
        let rows = run(
            emu,
            "embedding_fwd_f32",
            launch::rows(n),
            &scalars,
            &[
                ("table", Input::F32(table)),
                ("ids", Input::U32(ids.clone())),
            ],
            &["out"],
        );
        let mut want_rows = f32s(&out);
        want_rows[5 * d..6 * d].fill(f32::NAN);
        assert_close(&what("rows"), &rows[0], &want_rows, TOL);
        let dtable = run(
            emu,
            "embedding_bwd_f32",
            launch::rows(n),
            &scalars[..4],
            &[
                ("ids", Input::U32(ids.clone())),
                ("g", Input::F32(g.clone())),
            ],
            &["dtable"],
        );
        // The position outside the vocabulary adds nothing (the reference had its original id
        // there).
        let mut want_table = f32s(&want[0]);
        if let Some(local) = original.checked_sub(slice.start).filter(|&l| l < v) {
            for (w, gv) in want_table[local * d..(local + 1) * d]
                .iter_mut()
                .zip(&g[5 * d..6 * d])
            {
                *w -= gv;
            }
        }
        assert_close(&what("table gradient"), &dtable[0], &want_table, TOL);
    }
}

#[test]
fn adamw_update_matches_pytorch_formula() {
    let Some(emu) = emulator() else { return };
    let n = 1000;
    let (p, g, m) = (values(n, 11), values(n, 12), values(n, 13));
    let v: Vec<f32> = values(n, 14).iter().map(|x| x.abs()).collect();
    let (b1, b2, eps, lr, wd, step) = (0.9f64, 0.999f64, 1e-8f64, 1e-3f64, 0.1f64, 3i32);
    let (bias1, bias2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
    let geometry = launch::elementwise(n);
    let m1 = run(
        emu,
        "adam_moment_f32",
        geometry,
        &[n as f64, b1, 0.0],
        &[("m", Input::F32(m.clone())), ("g", Input::F32(g.clone()))],
        &["m"],
    );
    let v1 = run(
        emu,
        "adam_moment_f32",
        geometry,
        &[n as f64, b2, 1.0],
        &[("m", Input::F32(v.clone())), ("g", Input::F32(g.clone()))],
        &["m"],
    );
    let k = [1.0 - lr * wd, lr / bias1, 1.0 / bias2.sqrt(), eps];
    let p1 = run(
        emu,
        "adamw_param_f32",
        geometry,
        &[n as f64, k[0], k[1], k[2], k[3]],
        &[
            ("p", Input::F32(p.clone())),
            ("m", Input::F32(m1[0].clone())),
            ("v", Input::F32(v1[0].clone())),
        ],
        &["p"],
    );
    // torch.optim.AdamW in double precision.
    let (mut want_m, mut want_v, mut want_p) = (vec![], vec![], vec![]);
    for i in 0..n {
        let gi = g[i] as f64;
        let mi = b1 * m[i] as f64 + (1.0 - b1) * gi;
        let vi = b2 * v[i] as f64 + (1.0 - b2) * gi * gi;
        let pi = p[i] as f64 * (1.0 - lr * wd) - lr / bias1 * mi / (vi.sqrt() / bias2.sqrt() + eps);
        want_m.push(mi as f32);
        want_v.push(vi as f32);
        want_p.push(pi as f32);
    }
    assert_close("exp_avg", &m1[0], &want_m, TOL);
    assert_close("exp_avg_sq", &v1[0], &want_v, TOL);
    assert_close("parameters", &p1[0], &want_p, TOL);
}
