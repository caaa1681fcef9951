//! Row kernels for decoding: one new position per sequence, times every weight matrix.
//!
//! A decoding step is a matrix-vector product per weight matrix for each of a few rows. It is
//! bound by the bandwidth of reading the weights, and candle's GEMM (which packs its operands) and
//! per-op tensors cost more than the arithmetic there. These kernels read each weight row once,
//! in place, for all rows at a time, and split the outputs over the rayon pool. Above
//! [`MAX_STREAMED_ROWS`] rows (batched captioning) a float32 product is compute-bound, and it
//! goes to candle's GEMM. Weights may also be read as a bfloat16 copy ([`Matrix::Bf16`]): half
//! the bytes per step, with float32 arithmetic.
//!
//! Products sum in a fixed order whatever the thread count, so results do not depend on the
//! machine's cores.

use crate::model::ops::softmax_row;
// Partial sums per dot product: `Σ w[i]·x[i]` sums lane `i mod LANES` in order, then the lanes
// as `sum_lanes` does (the same lanes as every fused op's sums, see `crate::simd`); two AVX2
// registers (two independent chains of adds), so it vectorises without reassociating anything.
// Every product of a row with a weight row sums this way, whatever the rows or tiles around it.
use crate::simd::{sum_lanes, LANES};
use candle_core::Tensor;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(test)]
mod tests;
mod view;

pub use view::{F32View, Matrix, WeightElement};

/// Rows up to which products stream the weights here; above it candle's GEMM is faster.
pub const MAX_STREAMED_ROWS: usize = 8;

/// Outputs per rayon task in [`linear`]: enough weight bytes (64 KiB at width 512) to amortise
/// scheduling, and small enough to balance two to a few dozen threads.
const OUTPUTS_PER_TASK: usize = 32;

/// Rayon tasks per thread in [`project`]: few, long runs of each weight row stream fastest,
/// and a few per thread still balance.
const PROJECT_TASKS_PER_THREAD: usize = 4;

/// Key elements (`positions × head_dim`) a task of [`attend`] reads at least: a head over a
/// short self-attention cache is less work than forking it to another thread.
const MIN_ATTENTION_TASK: usize = 16 * 1024;

/// Input rows per tile in [`linear_block`] (2 × 4 accumulators fit AVX2's registers).
const TILE_ROWS: usize = 4;

/// The dot products `w·x[r]` of one weight row with `R` input rows, portable: each as
/// described at [`LANES`]. Multiplies and adds separately, so the result is the same with or
/// without FMA hardware, and the same as [`avx2::tile`]. The weight row is read once, in order
/// (one stream for the prefetcher).
#[inline(always)]
fn tile_portable<T: WeightElement, const R: usize>(w: &[T], x: [&[f32]; R]) -> [f32; R] {
    let len = common_len(w, &x);
    let n = len / LANES * LANES;
    let mut lanes = [[0f32; LANES]; R];
    for k in (0..n).step_by(LANES) {
        for (lanes, x) in lanes.iter_mut().zip(&x) {
            for (l, lane) in lanes.iter_mut().enumerate() {
                *lane += w[k + l].widen() * x[k + l];
            }
        }
    }
    for (lanes, x) in lanes.iter_mut().zip(&x) {
        add_tail(lanes, &w[n..len], &x[n..len]);
    }
    lanes.map(sum_lanes)
}

/// The length every row of a tile has (the shortest).
#[inline(always)]
fn common_len<T, const R: usize>(w: &[T], x: &[&[f32]; R]) -> usize {
    x.iter().map(|x| x.len()).fold(w.len(), usize::min)
}

/// Adds the tail (fewer than [`LANES`] elements) to the first lanes.
#[inline(always)]
fn add_tail<T: WeightElement>(lanes: &mut [f32; LANES], w: &[T], x: &[f32]) {
    for (lane, (w, x)) in lanes.iter_mut().zip(w.iter().zip(x)) {
        *lane += w.widen() * x;
    }
}

/// `y[c] = (((y[c] + x0·p0[c]) + x1·p1[c]) + x2·p2[c]) + x3·p3[c]`, portable (the order of
/// four steps of `y += x_i·p_i`, and of [`avx2::axpy4`]).
#[inline(always)]
fn axpy4_portable<T: WeightElement>(y: &mut [f32], x: [f32; 4], p: [&[T]; 4]) {
    let terms = p[0].iter().zip(p[1]).zip(p[2]).zip(p[3]);
    for (y, (((w0, w1), w2), w3)) in y.iter_mut().zip(terms) {
        *y = *y + x[0] * w0.widen() + x[1] * w1.widen() + x[2] * w2.widen() + x[3] * w3.widen();
    }
}

/// Whether the AVX2 loops may run (checked once by the standard library, then cached).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// The dot products of a tile (see [`tile_portable`]).
#[inline(always)]
fn tile<T: WeightElement, const R: usize>(w: &[T], x: [&[f32]; R]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2.
        return unsafe { avx2::tile(w, x) };
    }
    tile_portable(w, x)
}

/// `Σ a[i]·b[i]` summed as every product here is (see [`LANES`]).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    tile(a, [b])[0]
}

/// Four steps of `y += x_i · p_i` (see [`axpy4_portable`]).
#[inline(always)]
fn axpy4<T: WeightElement>(y: &mut [f32], x: [f32; 4], p: [&[T]; 4]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2.
        return unsafe { avx2::axpy4(y, x, p) };
    }
    axpy4_portable(y, x, p)
}

/// `y[r][o] = bias[o] + W[o]·x[r]` for the rows of `x` (`rows × in`) and a `[out, in]`
/// weight, into `yt` laid out output-major (`out × rows`), for outputs from `first`. Each
/// weight row meets up to [`TILE_ROWS`] input rows per pass (more rows take further passes
/// over it, from L1).
#[inline(always)]
fn linear_block<T: WeightElement>(x: &[f32], w: &[T], bias: &[f32], first: usize, yt: &mut [f32]) {
    let inputs = w.len() / bias.len();
    let rows = x.len() / inputs;
    let x_row = |r: usize| &x[r * inputs..(r + 1) * inputs];
    for (k, y) in yt.chunks_mut(rows).enumerate() {
        let o = first + k;
        let w_row = &w[o * inputs..(o + 1) * inputs];
        let mut emit = |r0: usize, sums: &[f32]| {
            for (y, sum) in y[r0..].iter_mut().zip(sums) {
                *y = bias[o] + sum;
            }
        };
        let mut r0 = 0;
        while r0 < rows {
            let x = |i: usize| x_row(r0 + i);
            match rows - r0 {
                1 => emit(r0, &tile(w_row, [x(0)])),
                2 => emit(r0, &tile(w_row, [x(0), x(1)])),
                3 => emit(r0, &tile(w_row, [x(0), x(1), x(2)])),
                _ => emit(r0, &tile(w_row, [x(0), x(1), x(2), x(3)])),
            }
            r0 += TILE_ROWS;
        }
    }
}

/// `y[r][c0..] = Σ_i x[r][i] · P[i][c0..]` over the columns `first..` of one task, summed in
/// order of `i`; four inputs per pass over `y`, so `y` is loaded and stored a quarter as often.
fn project_block<T: WeightElement>(x: &[f32], p: &[T], first: usize, ys: &mut [&mut [f32]]) {
    let inputs = x.len() / ys.len();
    let columns = p.len() / inputs;
    let width = ys[0].len();
    let row = |i: usize| &p[i * columns + first..][..width];
    let grouped = inputs / 4 * 4;
    for i in (0..grouped).step_by(4) {
        let rows = [row(i), row(i + 1), row(i + 2), row(i + 3)];
        for (r, y) in ys.iter_mut().enumerate() {
            let x = &x[r * inputs + i..][..4];
            axpy4(y, [x[0], x[1], x[2], x[3]], rows);
        }
    }
    for i in grouped..inputs {
        let p_row = row(i);
        for (r, y) in ys.iter_mut().enumerate() {
            let xi = x[r * inputs + i];
            for (y, w) in y.iter_mut().zip(p_row) {
                *y += xi * w.widen();
            }
        }
    }
}

/// [`linear_block`] in parallel tasks of [`OUTPUTS_PER_TASK`] outputs.
fn stream_linear<T: WeightElement>(x: &[f32], w: &[T], b: &[f32]) -> Vec<f32> {
    let rows = x.len() / (w.len() / b.len());
    let mut yt = vec![0f32; b.len() * rows];
    yt.par_chunks_mut(OUTPUTS_PER_TASK * rows)
        .enumerate()
        .for_each(|(task, yt)| linear_block(x, w, b, task * OUTPUTS_PER_TASK, yt));
    transpose(yt, b.len(), rows)
}

/// [`project_block`] in [`PROJECT_TASKS_PER_THREAD`] parallel tasks per thread.
fn stream_project<T: WeightElement>(x: &[f32], p: &[T], rows: usize) -> Vec<Vec<f32>> {
    let columns = p.len() / (x.len() / rows);
    let per_task = columns
        .div_ceil(PROJECT_TASKS_PER_THREAD * rayon::current_num_threads())
        .next_multiple_of(LANES);
    let mut out = vec![vec![0f32; columns]; rows];
    // Task t gets columns [t·C, (t+1)·C) of every row.
    let mut tasks: Vec<Vec<&mut [f32]>> = Vec::new();
    for row in out.iter_mut() {
        for (t, chunk) in row.chunks_mut(per_task).enumerate() {
            if tasks.len() <= t {
                tasks.push(Vec::with_capacity(rows));
            }
            tasks[t].push(chunk);
        }
    }
    tasks
        .into_par_iter()
        .enumerate()
        .for_each(|(t, mut ys)| project_block(x, p, t * per_task, &mut ys));
    out
}

/// `x · Wᵀ + b` for `x` `[rows, in]` and a PyTorch-layout weight `[out, in]`: `[rows, out]`.
pub fn linear(x: &[f32], w: &Matrix, b: &[f32]) -> anyhow::Result<Vec<f32>> {
    let outputs = b.len();
    let inputs = w.elements() / outputs.max(1);
    let rows = x.len() / inputs.max(1);
    anyhow::ensure!(
        outputs > 0 && inputs * outputs == w.elements() && rows * inputs == x.len(),
        "decoding: a [{outputs}, {inputs}] weight does not fit {} inputs",
        x.len()
    );
    Ok(match w {
        Matrix::F32(view) if rows > MAX_STREAMED_ROWS => {
            let device = view.tensor().device();
            let x = Tensor::from_slice(x, (rows, inputs), device)?;
            let y = x.matmul(&view.tensor().t()?)?;
            let y = y.broadcast_add(&Tensor::new(b, device)?)?;
            y.flatten_all()?.to_vec1()?
        }
        Matrix::F32(view) => stream_linear(x, view.as_slice(), b),
        Matrix::Bf16(data) => stream_linear(x, data, b),
    })
}

/// `[a, b]` → `[b, a]` (the same buffer when either is 1: one decoding row needs no copy).
fn transpose(m: Vec<f32>, a: usize, b: usize) -> Vec<f32> {
    if a == 1 || b == 1 {
        return m;
    }
    let m = &m;
    (0..b)
        .flat_map(|j| (0..a).map(move |i| m[i * b + j]))
        .collect()
}

/// `x · P` for `x` `[rows, in]` and a `[in, out]` matrix (the vocabulary projection): one
/// vector of `out` per row.
pub fn project(x: &[f32], p: &Matrix, inputs: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    let columns = p.elements() / inputs.max(1);
    let rows = x.len() / inputs.max(1);
    anyhow::ensure!(
        rows > 0 && columns * inputs == p.elements() && rows * inputs == x.len(),
        "decoding: a [{inputs}, {columns}] projection does not fit {} inputs",
        x.len()
    );
    Ok(match p {
        Matrix::F32(view) if rows > MAX_STREAMED_ROWS => {
            let x = Tensor::from_slice(x, (rows, inputs), view.tensor().device())?;
            x.matmul(view.tensor())?.to_vec2()?
        }
        Matrix::F32(view) => stream_project(x, view.as_slice(), rows),
        Matrix::Bf16(data) => stream_project(x, data, rows),
    })
}

/// How a cache lays out its keys and values per slot.
#[derive(Clone, Copy)]
pub enum KvLayout {
    /// `[capacity, width]` with the heads interleaved as `nn.MultiheadAttention` packs them
    /// (a new position appends one row).
    Interleaved,
    /// `[heads, capacity, head_dim]`: each head's keys contiguous (read in one stream).
    HeadMajor,
}

/// Keys and values of `slots` cache slots of `capacity` positions each, the first `len`
/// filled.
pub struct KvRows<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub capacity: usize,
    pub len: usize,
    pub layout: KvLayout,
}

/// Attention of one query per row: `q` `[rows, width]` over the filled positions of cache slot
/// `slots[r]`, `softmax(q·kᵀ/√head_dim)·v` per head, heads merged: `[rows, width]`.
pub fn attend(q: &[f32], kv: &KvRows, heads: usize, slots: &[usize]) -> Vec<f32> {
    let width = q.len() / slots.len().max(1);
    let head_dim = width / heads.max(1);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    let heads_per_task = MIN_ATTENTION_TASK.div_ceil((kv.len * head_dim).max(1));
    out.par_chunks_mut(head_dim)
        .with_min_len(heads_per_task)
        .enumerate()
        .for_each(|(rh, out)| {
            let (r, h) = (rh / heads, rh % heads);
            let q = &q[r * width + h * head_dim..][..head_dim];
            let (head_stride, position_stride) = match kv.layout {
                KvLayout::Interleaved => (head_dim, width),
                KvLayout::HeadMajor => (kv.capacity * head_dim, head_dim),
            };
            let base = slots[r] * kv.capacity * width + h * head_stride;
            let at = |j: usize| {
                let start = base + j * position_stride;
                start..start + head_dim
            };
            let scores: Vec<f32> = (0..kv.len).map(|j| dot(&kv.k[at(j)], q)).collect();
            let mut probs = vec![0f32; kv.len];
            softmax_row(&mut probs, &scores, None, scale);
            for (j, &p) in probs.iter().enumerate() {
                for (o, &v) in out.iter_mut().zip(&kv.v[at(j)]) {
                    *o += p * v;
                }
            }
        });
    out
}
