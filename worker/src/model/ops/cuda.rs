//! The fused ops on a GPU: the `cuda_fwd` of each op, launching our kernels
//! (`worker/kernels/fused_ops.cu`, compiled to PTX by `worker/build.rs`) on the device's stream,
//! with the geometry of [`super::launch`]. Only in the `cuda` build.
//!
//! Inputs are float32, bfloat16 or float16 (the kernels' name suffix); the auxiliary tensors
//! (layer-norm weight and bias, attention masks, upstream gradients of float32 outputs) are
//! float32, cast by the callers. Outputs follow the dtype table of the [module docs](super).
//! Every input must be contiguous (the callers make it so); offsets into a storage are honoured.

use super::launch::{self, Geometry};
use super::VocabSlice;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, DType, Layout, Result, Shape};
use half::{bf16, f16};

/// The kernels' PTX (virtual architecture `compute_$CUDA_COMPUTE_CAP`).
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_ops.ptx"));
/// The module name the device caches the loaded PTX under.
const MODULE: &str = "coca_fused_ops";

/// An element type the kernels read: the suffix of their entry points.
trait Element: CudaDType + DeviceRepr {
    const SUFFIX: &'static str;
}
impl Element for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Element for bf16 {
    const SUFFIX: &'static str = "bf16";
}
impl Element for f16 {
    const SUFFIX: &'static str = "f16";
}

/// Runs `$body` with `$t` the Rust type of `$dtype` (float32, bfloat16, float16), or fails
/// naming `$op`.
macro_rules! by_dtype {
    ($op:expr, $dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            other => bail!("{}: no CUDA kernel for {other:?}", $op),
        }
    };
}

/// The elements of a contiguous input.
fn input<'a, T: CudaDType>(op: &str, s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// Uninitialised device memory for `n` values every launch writes in full (at least one value:
/// the driver refuses empty allocations, and an empty tensor's storage may be longer).
fn output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches kernels that write all `n` values before the slice is read.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

fn config(g: Geometry) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (g.grid.0, g.grid.1, 1),
        block_dim: (g.block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches the kernel `$name` (the dtype suffix included) of our module, which the device loads
/// once. SAFETY (of the callers): the arguments pushed match the entry point's parameters in
/// order and type (kernels/fused_ops.cu), and every pointer covers what the geometry makes the
/// kernel touch.
macro_rules! launch {
    ($dev:expr, $name:expr, $geometry:expr, $($arg:expr),+ $(,)?) => {{
        let func = $dev.get_or_load_custom_func(AsRef::<str>::as_ref(&$name), MODULE, PTX)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        unsafe { builder.launch(config($geometry)) }.w()?;
    }};
}

/// Rows of width `d` in a tensor of `elements` values, or an error for an empty width.
fn row_count(op: &str, elements: usize, d: usize) -> Result<(i64, i32)> {
    if d == 0 || !elements.is_multiple_of(d) {
        bail!("{op}: {elements} values are not rows of width {d}");
    }
    Ok(((elements / d) as i64, d as i32))
}

/// Layer norm forward: `x` (any kernel dtype), float32 `w` and `b` → float32.
pub(super) fn layer_norm(
    op: &str,
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let d = wl.shape().elem_count();
    let (rows, d32) = row_count(op, xl.shape().elem_count(), d)?;
    let (w, b) = (input::<f32>(op, ws, wl)?, input::<f32>(op, bs, bl)?);
    let mut y = output::<f32>(dev, xl.shape().elem_count())?;
    by_dtype!(op, xs.dtype(), T => {
        let x = input::<T>(op, xs, xl)?;
        launch!(dev, format!("layer_norm_fwd_{}", T::SUFFIX), launch::rows(rows as usize),
            &x, &w, &b, &mut y, &rows, &d32, &eps);
    });
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        xl.shape().clone(),
    ))
}

/// Layer norm backward: float32 `[rows + 2, d]` = `[dx..., dweight, dbias]` from `x`, float32
/// `w` and the float32 upstream gradient `g`.
pub(super) fn layer_norm_backward(
    op: &str,
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let d = wl.shape().elem_count();
    let (rows, d32) = row_count(op, xl.shape().elem_count(), d)?;
    let (w, g) = (input::<f32>(op, ws, wl)?, input::<f32>(op, gs, gl)?);
    let n = rows as usize;
    let mut packed = output::<f32>(dev, (n + 2) * d)?;
    let mut stats = output::<f32>(dev, 2 * n)?;
    let chunks = launch::column_chunks(n);
    let mut partial = output::<f32>(dev, chunks * 2 * d)?;
    let chunk = launch::COLUMN_CHUNK as i32;
    by_dtype!(op, xs.dtype(), T => {
        let x = input::<T>(op, xs, xl)?;
        let mut dx = packed.slice_mut(..n * d);
        launch!(dev, format!("layer_norm_bwd_dx_{}", T::SUFFIX), launch::rows(n),
            &x, &w, &g, &mut dx, &mut stats, &rows, &d32, &eps);
        launch!(dev, format!("layer_norm_bwd_partials_{}", T::SUFFIX),
            launch::column_partials(n, d), &x, &g, &stats, &mut partial, &rows, &d32, &chunk);
    });
    let (chunks32, width) = (chunks as i32, 2 * d32);
    let mut sums = packed.slice_mut(n * d..);
    launch!(
        dev,
        "column_sum_f32",
        launch::columns(2 * d),
        &partial,
        &mut sums,
        &chunks32,
        &width
    );
    Ok((
        CudaStorage::wrap_cuda_slice(packed, dev.clone()),
        Shape::from((n + 2, d)),
    ))
}

/// Where a softmax's mask comes from: the float32 mask and its batch (1: shared `[T, S]`).
pub(super) struct SoftmaxMask<'a> {
    pub(super) mask: (&'a CudaStorage, &'a Layout),
    pub(super) batch: usize,
}

/// `softmax(scale · x + mask)` over the last dimension → float32. With a mask, `x` is
/// `[B, H, T, S]`.
pub(super) fn softmax(
    op: &str,
    (xs, xl): (&CudaStorage, &Layout),
    mask: Option<SoftmaxMask<'_>>,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let dims = xl.shape().dims();
    let n = dims.last().copied().unwrap_or(1);
    let (rows, n32) = row_count(op, xl.shape().elem_count(), n)?;
    let mut y = output::<f32>(dev, xl.shape().elem_count())?;
    let (t, heads_t, batch) = match (&mask, dims) {
        (Some(m), [_, h, t, _]) => (*t as i32, (h * t) as i64, m.batch as i32),
        (Some(_), _) => bail!("{op}: a masked softmax takes [B, H, T, S] scores, got {dims:?}"),
        (None, _) => (1, 1, 1),
    };
    let mask = match &mask {
        Some(m) => Some(input::<f32>(op, m.mask.0, m.mask.1)?),
        None => None,
    };
    by_dtype!(op, xs.dtype(), T => {
        let x = input::<T>(op, xs, xl)?;
        let name = format!("softmax_fwd_{}", T::SUFFIX);
        let geometry = launch::rows(rows as usize);
        match &mask {
            Some(m) => launch!(dev, name, geometry,
                &x, m, &mut y, &rows, &n32, &scale, &t, &heads_t, &batch),
            // A null mask pointer: the kernel adds nothing.
            None => launch!(dev, name, geometry,
                &x, &0u64, &mut y, &rows, &n32, &scale, &t, &heads_t, &batch),
        }
    });
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        xl.shape().clone(),
    ))
}

/// `scale · y ⊙ (g − Σ g ⊙ y)` row by row, all float32.
pub(super) fn softmax_backward(
    op: &str,
    (ys, yl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = ys.device();
    let n = yl.shape().dims().last().copied().unwrap_or(1);
    let (rows, n32) = row_count(op, yl.shape().elem_count(), n)?;
    let (y, g) = (input::<f32>(op, ys, yl)?, input::<f32>(op, gs, gl)?);
    let mut dx = output::<f32>(dev, yl.shape().elem_count())?;
    launch!(
        dev,
        "softmax_bwd_f32",
        launch::rows(rows as usize),
        &y,
        &g,
        &mut dx,
        &rows,
        &n32,
        &scale
    );
    Ok((
        CudaStorage::wrap_cuda_slice(dx, dev.clone()),
        yl.shape().clone(),
    ))
}

/// GELU (erf) forward, in `x`'s dtype.
pub(super) fn gelu(op: &str, (xs, xl): (&CudaStorage, &Layout)) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let n = xl.shape().elem_count();
    let count = n as i64;
    by_dtype!(op, xs.dtype(), T => {
        let x = input::<T>(op, xs, xl)?;
        let mut y = output::<T>(dev, n)?;
        launch!(dev, format!("gelu_fwd_{}", T::SUFFIX), launch::elementwise(n), &x, &mut y, &count);
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
    })
}

/// GELU (erf) backward: `dx` from `x` and `g`, both in `x`'s dtype.
pub(super) fn gelu_backward(
    op: &str,
    (xs, xl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let n = xl.shape().elem_count();
    let count = n as i64;
    by_dtype!(op, xs.dtype(), T => {
        let (x, g) = (input::<T>(op, xs, xl)?, input::<T>(op, gs, gl)?);
        let mut dx = output::<T>(dev, n)?;
        launch!(dev, format!("gelu_bwd_{}", T::SUFFIX), launch::elementwise(n),
            &x, &g, &mut dx, &count);
        Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), xl.shape().clone()))
    })
}

/// `y + b` over the rows of `y` (both in `y`'s dtype).
pub(super) fn add_bias(
    op: &str,
    (ys, yl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = ys.device();
    let n = yl.shape().elem_count();
    let d = bl.shape().elem_count();
    row_count(op, n, d)?;
    let (count, d32) = (n as i64, d as i32);
    by_dtype!(op, ys.dtype(), T => {
        let (y, b) = (input::<T>(op, ys, yl)?, input::<T>(op, bs, bl)?);
        let mut out = output::<T>(dev, n)?;
        launch!(dev, format!("add_bias_{}", T::SUFFIX), launch::elementwise(n),
            &y, &b, &mut out, &count, &d32);
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), yl.shape().clone()))
    })
}

/// The bias gradient: the column sums of `g` (rows of its last dimension's width), summed in
/// float32 per chunk of rows and over the chunks in order, returned in `g`'s dtype.
pub(super) fn column_sums(
    op: &str,
    (gs, gl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = gs.device();
    let d = gl.shape().dims().last().copied().unwrap_or(1);
    let (rows, d32) = row_count(op, gl.shape().elem_count(), d)?;
    let n = rows as usize;
    let chunks = launch::column_chunks(n);
    let mut partial = output::<f32>(dev, chunks * d)?;
    let (chunk, chunks32) = (launch::COLUMN_CHUNK as i32, chunks as i32);
    by_dtype!(op, gs.dtype(), T => {
        let g = input::<T>(op, gs, gl)?;
        launch!(dev, format!("column_partials_{}", T::SUFFIX), launch::column_partials(n, d),
            &g, &mut partial, &rows, &d32, &chunk);
        let mut sums = output::<T>(dev, d)?;
        launch!(dev, format!("column_sum_{}", T::SUFFIX), launch::columns(d),
            &partial, &mut sums, &chunks32, &d32);
        Ok((CudaStorage::wrap_cuda_slice(sums, dev.clone()), Shape::from(d)))
    })
}

/// The kernels' `ignore` argument: the ignored class, or −1 for none.
fn ignored(ignore: Option<u32>) -> i64 {
    ignore.map_or(-1, i64::from)
}

/// The cross-entropy's two terms `[2, N]` (float32) of `[N, V]` logits, columns
/// `slice.start ..` of a vocabulary of `slice.vocab` ids, and u32 targets.
pub(super) fn cross_entropy_stats(
    op: &str,
    (xs, xl): (&CudaStorage, &Layout),
    (ts, tl): (&CudaStorage, &Layout),
    ignore: Option<u32>,
    slice: VocabSlice,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let v = xl.shape().dims().last().copied().unwrap_or(1);
    let (rows, v32) = row_count(op, xl.shape().elem_count(), v)?;
    let targets = input::<u32>(op, ts, tl)?;
    let mut stats = output::<f32>(dev, 2 * rows as usize)?;
    let (ignore, start, vocab) = (ignored(ignore), slice.start as i64, slice.vocab as i64);
    by_dtype!(op, xs.dtype(), T => {
        let x = input::<T>(op, xs, xl)?;
        launch!(dev, format!("cross_entropy_stats_fwd_{}", T::SUFFIX), launch::rows(rows as usize),
            &x, &targets, &mut stats, &rows, &v32, &ignore, &start, &vocab);
    });
    Ok((
        CudaStorage::wrap_cuda_slice(stats, dev.clone()),
        Shape::from((2, rows as usize)),
    ))
}

/// Their gradient for the logits (the logits' dtype) from `aux` `[3, N]` float32: the
/// forward's log-sum-exps and the upstream gradients of both terms.
pub(super) fn cross_entropy_stats_backward(
    op: &str,
    (xs, xl): (&CudaStorage, &Layout),
    (ts, tl): (&CudaStorage, &Layout),
    (aux_s, aux_l): (&CudaStorage, &Layout),
    ignore: Option<u32>,
    slice: VocabSlice,
) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let v = xl.shape().dims().last().copied().unwrap_or(1);
    let (rows, v32) = row_count(op, xl.shape().elem_count(), v)?;
    let (targets, aux) = (input::<u32>(op, ts, tl)?, input::<f32>(op, aux_s, aux_l)?);
    let (ignore, start) = (ignored(ignore), slice.start as i64);
    by_dtype!(op, xs.dtype(), T => {
        let x = input::<T>(op, xs, xl)?;
        let mut dx = output::<T>(dev, xl.shape().elem_count())?;
        launch!(dev, format!("cross_entropy_stats_bwd_{}", T::SUFFIX), launch::rows(rows as usize),
            &x, &targets, &aux, &mut dx, &rows, &v32, &ignore, &start);
        Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), xl.shape().clone()))
    })
}

/// A float32 copy of a contiguous tensor's elements (the group ops' forward value).
pub(super) fn copy_f32(op: &str, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let view = input::<f32>(op, s, l)?;
    let copy = if view.is_empty() {
        output::<f32>(dev, 0)?
    } else {
        dev.cuda_stream().clone_dtod(&view).w()?
    };
    Ok((
        CudaStorage::wrap_cuda_slice(copy, dev.clone()),
        l.shape().clone(),
    ))
}

/// The elements of a contiguous in-place destination.
fn destination<'a>(
    op: &str,
    s: &'a mut CudaStorage,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, f32>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(start..end)),
        None => bail!("{op}: the destination must be contiguous"),
    }
}

/// Adam's moment update in place: `m ← β·m + (1 − β)·g` (of `g²` when `squared`), float32.
pub(crate) fn adam_moment(
    op: &str,
    (ms, ml): (&mut CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    beta: f32,
    squared: bool,
) -> Result<()> {
    let dev = gs.device().clone();
    let n = ml.shape().elem_count();
    if gl.shape().elem_count() != n {
        bail!(
            "{op}: {n} moments but {} gradients",
            gl.shape().elem_count()
        );
    }
    let g = input::<f32>(op, gs, gl)?;
    let mut m = destination(op, ms, ml)?;
    let (count, squared) = (n as i64, squared as i32);
    launch!(
        &dev,
        "adam_moment_f32",
        launch::elementwise(n),
        &mut m,
        &g,
        &count,
        &beta,
        &squared
    );
    Ok(())
}

/// AdamW's parameter update in place from the updated moments, float32:
/// `p ← p·decay − step_size · m / (√v · inv_bias2_sqrt + eps)`; `k` = `[decay, step_size,
/// inv_bias2_sqrt, eps]`.
pub(crate) fn adamw_param(
    op: &str,
    (ps, pl): (&mut CudaStorage, &Layout),
    (ms, ml): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    k: [f32; 4],
) -> Result<()> {
    let dev = ms.device().clone();
    let n = pl.shape().elem_count();
    if ml.shape().elem_count() != n || vl.shape().elem_count() != n {
        bail!("{op}: parameters and moments differ in length");
    }
    let (m, v) = (input::<f32>(op, ms, ml)?, input::<f32>(op, vs, vl)?);
    let mut p = destination(op, ps, pl)?;
    let [decay, step_size, inv_bias2_sqrt, eps] = k;
    let count = n as i64;
    launch!(
        &dev,
        "adamw_param_f32",
        launch::elementwise(n),
        &mut p,
        &m,
        &v,
        &count,
        &decay,
        &step_size,
        &inv_bias2_sqrt,
        &eps
    );
    Ok(())
}

/// Rows of a float32 `[V, D]` table for u32 ids `[N]` (NaN rows for ids outside it).
pub(super) fn embedding(
    op: &str,
    (ts, tl): (&CudaStorage, &Layout),
    (is, il): (&CudaStorage, &Layout),
    slice: VocabSlice,
) -> Result<(CudaStorage, Shape)> {
    let dev = ts.device();
    let (v, d) = tl.shape().dims2()?;
    let n = il.shape().elem_count();
    let (table, ids) = (input::<f32>(op, ts, tl)?, input::<u32>(op, is, il)?);
    let mut out = output::<f32>(dev, n * d)?;
    let (count, d32, rows) = (n as i64, d as i32, v as i64);
    let (start, vocab) = (slice.start as i64, slice.vocab as i64);
    launch!(
        dev,
        "embedding_fwd_f32",
        launch::rows(n),
        &table,
        &ids,
        &mut out,
        &count,
        &d32,
        &rows,
        &start,
        &vocab
    );
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((n, d)),
    ))
}

/// The float32 gradient `[rows, D]` of a table of the ids `start .. start + rows`, from u32
/// ids `[N]` and the rows' gradient `[N, D]`.
pub(super) fn embedding_backward(
    op: &str,
    (is, il): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    rows: usize,
    start: usize,
) -> Result<(CudaStorage, Shape)> {
    let dev = gs.device();
    let (n, d) = gl.shape().dims2()?;
    let (ids, g) = (input::<u32>(op, is, il)?, input::<f32>(op, gs, gl)?);
    let mut dtable = dev.alloc_zeros::<f32>(rows * d)?;
    let (count, d32, v, start) = (n as i64, d as i32, rows as i64, start as i64);
    launch!(
        dev,
        "embedding_bwd_f32",
        launch::rows(n),
        &ids,
        &g,
        &mut dtable,
        &count,
        &d32,
        &v,
        &start
    );
    Ok((
        CudaStorage::wrap_cuda_slice(dtable, dev.clone()),
        Shape::from((rows, d)),
    ))
}
