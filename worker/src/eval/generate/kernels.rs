//! Row kernels for decoding: one new position per sequence, times every weight matrix.
//!
//! A decoding step is a matrix-vector product per weight matrix for each of a few rows. It is
//! bound by the bandwidth of reading the weights, and candle's GEMM (which packs its operands) and
//! per-op tensors cost more than the arithmetic there. These kernels read each weight row once,
//! in place, for all rows at a time, and split the outputs over the rayon pool. Above
//! [`MAX_STREAMED_ROWS`] rows (batched captioning) a product is compute-bound, and it goes to
//! candle's GEMM.
//!
//! Products sum in a fixed order whatever the thread count, so results do not depend on the
//! machine's cores.

use crate::model::ops::softmax_row;
use candle_core::{CpuStorage, Storage, StorageRef, Tensor};
use rayon::prelude::*;

/// Rows up to which products stream the weights here; above it candle's GEMM is faster.
pub const MAX_STREAMED_ROWS: usize = 8;

/// Outputs per rayon task in [`linear`]: enough weight bytes (64 KiB at width 512) to amortise
/// scheduling, and small enough to balance two to a few dozen threads.
const OUTPUTS_PER_TASK: usize = 32;

/// Columns per rayon task in [`project`] (16 KiB of each weight row).
const COLUMNS_PER_TASK: usize = 4096;

/// A contiguous float32 CPU tensor, read in place while the view lives.
pub struct F32View<'t> {
    tensor: &'t Tensor,
    storage: StorageRef<'t>,
    start: usize,
    end: usize,
}

impl<'t> F32View<'t> {
    /// Views `tensor`, which must be a contiguous float32 tensor on the CPU; `name` goes into
    /// the error otherwise.
    pub fn new(tensor: &'t Tensor, name: &str) -> anyhow::Result<Self> {
        let (storage, layout) = tensor.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            anyhow::bail!("decoding: weight {name} is not contiguous");
        };
        match &*storage {
            Storage::Cpu(CpuStorage::F32(_)) => {}
            _ => anyhow::bail!(
                "decoding: weight {name} must be float32 on the CPU, got {:?} on {:?}",
                tensor.dtype(),
                tensor.device()
            ),
        }
        Ok(Self {
            tensor,
            storage,
            start,
            end,
        })
    }

    /// The elements, in row-major order.
    pub fn as_slice(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(data)) => &data[self.start..self.end],
            // `new` accepted only float32 CPU storage, and the guard keeps it so.
            _ => &[],
        }
    }

    /// The tensor viewed (for candle's GEMM on many rows).
    pub fn tensor(&self) -> &'t Tensor {
        self.tensor
    }
}

/// `Σ a[i]·b[i]` in 16 interleaved partial sums (vectorisable without reassociation), then
/// those in order. Multiplies and adds separately, so the result is the same with or without
/// FMA hardware.
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_blocks, a_rest) = a.as_chunks::<LANES>();
    let (b_blocks, b_rest) = b.as_chunks::<LANES>();
    for (x, y) in a_blocks.iter().zip(b_blocks) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    for (i, (x, y)) in a_rest.iter().zip(b_rest).enumerate() {
        acc[i] += x * y;
    }
    acc.iter().sum()
}

/// `y[r][o] = bias[o] + W[o]·x[r]` for the rows of `x` (`rows × in`) and a `[out, in]` weight,
/// into `yt` laid out output-major (`out × rows`).
#[inline(always)]
fn linear_block(x: &[f32], w: &[f32], bias: &[f32], inputs: usize, first: usize, yt: &mut [f32]) {
    let rows = x.len() / inputs;
    for (k, y) in yt.chunks_mut(rows).enumerate() {
        let o = first + k;
        let w_row = &w[o * inputs..(o + 1) * inputs];
        for (r, y) in y.iter_mut().enumerate() {
            *y = bias[o] + dot_body(w_row, &x[r * inputs..(r + 1) * inputs]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn linear_block_avx2(x: &[f32], w: &[f32], b: &[f32], inputs: usize, first: usize, yt: &mut [f32]) {
    linear_block(x, w, b, inputs, first, yt)
}

fn linear_block_dispatch(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    inputs: usize,
    first: usize,
    yt: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { linear_block_avx2(x, w, b, inputs, first, yt) };
        return;
    }
    linear_block(x, w, b, inputs, first, yt)
}

/// `x · Wᵀ + b` for `x` `[rows, in]` and a PyTorch-layout weight `[out, in]`: `[rows, out]`.
pub fn linear(x: &[f32], w: &F32View, b: &[f32]) -> anyhow::Result<Vec<f32>> {
    let outputs = b.len();
    let w_data = w.as_slice();
    let inputs = w_data.len() / outputs.max(1);
    let rows = x.len() / inputs.max(1);
    anyhow::ensure!(
        inputs * outputs == w_data.len() && rows * inputs == x.len(),
        "decoding: a [{outputs}, {inputs}] weight does not fit {} inputs",
        x.len()
    );
    if rows > MAX_STREAMED_ROWS {
        let x = Tensor::from_slice(x, (rows, inputs), w.tensor().device())?;
        let y = x
            .matmul(&w.tensor().t()?)?
            .broadcast_add(&Tensor::new(b, x.device())?)?;
        return Ok(y.flatten_all()?.to_vec1()?);
    }
    let mut yt = vec![0f32; outputs * rows];
    yt.par_chunks_mut(OUTPUTS_PER_TASK * rows)
        .enumerate()
        .for_each(|(task, yt)| {
            linear_block_dispatch(x, w_data, b, inputs, task * OUTPUTS_PER_TASK, yt)
        });
    Ok(transpose(&yt, outputs, rows))
}

/// `[a, b]` → `[b, a]` (a copy when either is 1).
fn transpose(m: &[f32], a: usize, b: usize) -> Vec<f32> {
    if a == 1 || b == 1 {
        return m.to_vec();
    }
    (0..b)
        .flat_map(|j| (0..a).map(move |i| m[i * b + j]))
        .collect()
}

/// `y[r][c0..] += Σ_i x[r][i] · P[i][c0..]` over the columns of one task.
#[inline(always)]
fn project_block(
    x: &[f32],
    p: &[f32],
    inputs: usize,
    columns: usize,
    first: usize,
    ys: &mut [&mut [f32]],
) {
    for i in 0..inputs {
        let p_row = &p[i * columns + first..i * columns + first + ys[0].len()];
        for (r, y) in ys.iter_mut().enumerate() {
            let xi = x[r * inputs + i];
            for (y, &w) in y.iter_mut().zip(p_row) {
                *y += xi * w;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn project_block_avx2(
    x: &[f32],
    p: &[f32],
    inputs: usize,
    columns: usize,
    first: usize,
    ys: &mut [&mut [f32]],
) {
    project_block(x, p, inputs, columns, first, ys)
}

fn project_block_dispatch(
    x: &[f32],
    p: &[f32],
    inputs: usize,
    columns: usize,
    first: usize,
    ys: &mut [&mut [f32]],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { project_block_avx2(x, p, inputs, columns, first, ys) };
        return;
    }
    project_block(x, p, inputs, columns, first, ys)
}

/// `x · P` for `x` `[rows, in]` and a `[in, out]` matrix (the vocabulary projection): one
/// vector of `out` per row.
pub fn project(x: &[f32], p: &F32View, inputs: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    let p_data = p.as_slice();
    let columns = p_data.len() / inputs.max(1);
    let rows = x.len() / inputs.max(1);
    anyhow::ensure!(
        columns * inputs == p_data.len() && rows * inputs == x.len(),
        "decoding: a [{inputs}, {columns}] projection does not fit {} inputs",
        x.len()
    );
    if rows > MAX_STREAMED_ROWS {
        let x = Tensor::from_slice(x, (rows, inputs), p.tensor().device())?;
        return Ok(x.matmul(p.tensor())?.to_vec2()?);
    }
    let mut out = vec![vec![0f32; columns]; rows];
    // Task t gets columns [t·C, (t+1)·C) of every row.
    let mut tasks: Vec<Vec<&mut [f32]>> = Vec::new();
    for row in out.iter_mut() {
        for (t, chunk) in row.chunks_mut(COLUMNS_PER_TASK).enumerate() {
            if tasks.len() <= t {
                tasks.push(Vec::with_capacity(rows));
            }
            tasks[t].push(chunk);
        }
    }
    tasks.into_par_iter().enumerate().for_each(|(t, mut ys)| {
        project_block_dispatch(x, p_data, inputs, columns, t * COLUMNS_PER_TASK, &mut ys)
    });
    Ok(out)
}

/// Keys and values `[slots, capacity, width]` of attention heads interleaved as
/// `nn.MultiheadAttention` packs them; the first `len` positions of each slot are filled.
pub struct KvRows<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub capacity: usize,
    pub len: usize,
}

/// Attention of one query per row: `q` `[rows, width]` over the filled positions of cache slot
/// `slots[r]`, `softmax(q·kᵀ/√head_dim)·v` per head, heads merged: `[rows, width]`.
pub fn attend(q: &[f32], kv: &KvRows, heads: usize, slots: &[usize]) -> Vec<f32> {
    let width = q.len() / slots.len().max(1);
    let head_dim = width / heads.max(1);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(rh, out)| {
            let (r, h) = (rh / heads, rh % heads);
            let q = &q[r * width + h * head_dim..][..head_dim];
            let base = slots[r] * kv.capacity * width + h * head_dim;
            let at = |j: usize| base + j * width..base + j * width + head_dim;
            let scores: Vec<f32> = (0..kv.len).map(|j| dot_body(q, &kv.k[at(j)])).collect();
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

#[cfg(test)]
mod tests {
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

    /// Odd sizes (not multiples of the lanes or task sizes), streamed and through candle.
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
        for rows in [1, 3, MAX_STREAMED_ROWS, MAX_STREAMED_ROWS + 1] {
            let x = pseudo_random(rows * inputs, rows as f32);
            let xt = Tensor::from_slice(&x, (rows, inputs), &Device::Cpu).unwrap();
            let expected = xt.matmul(&p).unwrap();
            let with_bias = expected
                .broadcast_add(&Tensor::new(bias.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let ours = linear(&x, &w_view, &bias).unwrap();
            let theirs: Vec<f32> = with_bias.flatten_all().unwrap().to_vec1().unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-5, "linear, {rows} rows");
            let ours: Vec<f32> = project(&x, &p_view, inputs).unwrap().concat();
            let theirs: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-5, "project, {rows} rows");
        }
        assert!(linear(&[0.0; 36], &w_view, &bias).is_err());
    }

    /// One query against a cache with unused capacity, per head, against the formula.
    #[test]
    fn attend_is_softmax_attention_per_head() {
        let (heads, head_dim, capacity, len) = (2, 3, 5, 4);
        let width = heads * head_dim;
        let slots = [1, 0];
        let q = pseudo_random(2 * width, 3.0);
        let k = pseudo_random(2 * capacity * width, 4.0);
        let v = pseudo_random(2 * capacity * width, 5.0);
        let kv = KvRows {
            k: &k,
            v: &v,
            capacity,
            len,
        };
        let out = attend(&q, &kv, heads, &slots);
        for (r, &slot) in slots.iter().enumerate() {
            for h in 0..heads {
                let at = |m: &[f32], j: usize, d: usize| {
                    m[(slot * capacity + j) * width + h * head_dim + d]
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
                        (got - expected).abs() < 1e-5,
                        "row {r} head {h}: {got} vs {expected}"
                    );
                }
            }
        }
    }
}
