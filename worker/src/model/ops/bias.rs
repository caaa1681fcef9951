//! A linear layer's bias: `y + b` over the rows of `y`, with a backward that sums the
//! gradient's columns in one pass; and `x · w + b` as one node of the autograd graph.
//!
//! candle's `broadcast_add` records a backward that reduces the gradient over its leading
//! dimension with the generic strided reduction: about 7 % of the B-32 backward pass on the
//! CPU, for a sum a vectorised pass over the rows does at memory speed.
//!
//! candle's graph keeps every op's inputs alive until backward, needed or not, so `x · w`
//! followed by `+ b` keeps the product beside the output although neither backward reads it.
//! [`biased_product`] adds the bias into the product's own buffer inside one op, so a linear
//! layer keeps only its output: one activation of every linear layer's output size less
//! (about a fifth of a B-32 step's activations).

use super::{cpu_elements, fused, widened_on_cpu};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use half::{bf16, f16};
use rayon::prelude::*;

/// Columns of the bias gradient one task sums (over every row, in row order).
const COLUMNS_PER_TASK: usize = 256;
/// Rows of the output one task writes.
const ROWS_PER_TASK: usize = 32;

/// Whether the bias ops run our kernels over `tensors` (all of one dtype): the fused path
/// (float32 on the CPU, any float dtype on a GPU), or bfloat16/float16 on the CPU, where the
/// kernels widen each element to float32 and round each result once, as the GPU's do. candle's
/// composition would sum the bias gradient in the half type itself, rounding at every row.
fn bias_kernels(tensors: &[&Tensor]) -> bool {
    fused(tensors) || widened_on_cpu(tensors)
}

/// `y + b` for `y` `[..., n]` and `b` `[n]` of one float dtype: our kernels ([`bias_kernels`];
/// the bias gradient is summed in float32 and rounded once), else candle's `broadcast_add`.
pub fn add_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    if y.dtype() != b.dtype()
        || b.rank() != 1
        || y.dims().last() != Some(&b.dim(0)?)
        || !bias_kernels(&[y, b])
    {
        return y.broadcast_add(b);
    }
    y.contiguous()?.apply_op2(&b.contiguous()?, AddBias)
}

/// `x · w + b` for `x` `[m, k]`, `w` `[k, n]` (any strides, e.g. a transposed weight) and `b`
/// `[n]`, all of one dtype: one node of the graph, which keeps `x`, `w`, `b` and the output but
/// not the product. The same numbers as `x.matmul(w)` then [`add_bias`], forward and backward.
/// Where the fused kernels do not run (see [`add_bias`]), or for an empty product, it is those
/// two ops.
pub fn biased_product(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (k2, n) = w.dims2()?;
    if k != k2 || b.dims() != [n] {
        candle_core::bail!(
            "biased product of {:?} and {:?} with a bias of {:?}",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    let same_dtype = x.dtype() == w.dtype() && w.dtype() == b.dtype();
    if !same_dtype || m * n * k == 0 || !bias_kernels(&[x, w, b]) {
        return add_bias(&x.matmul(w)?, b);
    }
    x.contiguous()?
        .apply_op3(w, &b.contiguous()?, BiasedProduct { m, n, k })
}

/// An element type the CPU's bias kernels take: float32, or a half type, widened exactly to
/// float32 and rounded back to nearest even (what `bf16 + bf16` does).
pub(super) trait BiasElement: WithDType + Send + Sync {
    fn widen(self) -> f32;
    fn narrow(v: f32) -> Self;
}

impl BiasElement for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        v
    }
}

macro_rules! half_bias_element {
    ($($t:ty),*) => {$(
        impl BiasElement for $t {
            #[inline(always)]
            fn widen(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn narrow(v: f32) -> Self {
                <$t>::from_f32(v)
            }
        }
    )*};
}

half_bias_element!(bf16, f16);

/// Runs `$body` with `$t` the element type of `$storage` (float32, bfloat16 or float16), or
/// fails naming `$op`.
macro_rules! by_element {
    ($op:expr, $storage:expr, $t:ident => $body:expr) => {
        match $storage.dtype() {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $t = f16;
                $body
            }
            other => candle_core::bail!("{}: no CPU kernel for {other:?}", $op),
        }
    };
}

/// Every row of `out` set to the same row of `y` plus `b` (`y`: `None` adds `b` to `out` in
/// place), each sum in float32 rounded once to `T`, rows split between tasks.
pub(super) fn add_rows<T: BiasElement>(out: &mut [T], y: Option<&[T]>, b: &[T]) {
    let n = b.len();
    if n == 0 {
        return;
    }
    let block = ROWS_PER_TASK * n;
    out.par_chunks_mut(block)
        .enumerate()
        .for_each(|(task, out)| match y {
            Some(y) => {
                let y = &y[task * block..task * block + out.len()];
                for (out, y) in out.chunks_exact_mut(n).zip(y.chunks_exact(n)) {
                    for ((o, y), b) in out.iter_mut().zip(y).zip(b) {
                        *o = T::narrow(y.widen() + b.widen());
                    }
                }
            }
            None => {
                for out in out.chunks_exact_mut(n) {
                    for (o, b) in out.iter_mut().zip(b) {
                        *o = T::narrow(o.widen() + b.widen());
                    }
                }
            }
        });
}

/// `Σ_rows g[row][c]` for each column `c` in float32, rows added in order.
pub(super) fn column_sums<T: BiasElement>(g: &[T], n: usize) -> Vec<f32> {
    let mut sums = vec![0f32; n];
    sums.par_chunks_mut(COLUMNS_PER_TASK)
        .enumerate()
        .for_each(|(task, sums)| {
            let columns = task * COLUMNS_PER_TASK..task * COLUMNS_PER_TASK + sums.len();
            for row in g.chunks_exact(n) {
                for (s, v) in sums.iter_mut().zip(&row[columns.clone()]) {
                    *s += v.widen();
                }
            }
        });
    sums
}

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    /// The backward pass reads the output gradient alone: neither the result nor the
    /// arguments' values (the graph holds handles of them and may drop them).
    fn bwd_reads_result(&self) -> bool {
        false
    }

    fn bwd_reads_args(&self) -> bool {
        false
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_element!(self.name(), s1, T => {
            let y = cpu_elements::<T>(self.name(), s1, l1)?;
            let b = cpu_elements::<T>(self.name(), s2, l2)?;
            let mut out = vec![T::narrow(0.0); y.len()];
            add_rows(&mut out, Some(y), b);
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::add_bias(self.name(), (s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let db = grad.apply_op1_no_bwd(&BiasGradient)?;
        Ok((Some(grad), Some(db)))
    }
}

/// `x · w + b` ([`biased_product`]): the product's sizes.
struct BiasedProduct {
    m: usize,
    n: usize,
    k: usize,
}

impl CustomOp3 for BiasedProduct {
    fn name(&self) -> &'static str {
        "biased-product"
    }

    /// The backward pass reads the input and the weight, not the result (the graph may drop it).
    fn bwd_reads_result(&self) -> bool {
        false
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // The product in the inputs' dtype (a half-precision one computed in float32 and
        // rounded once, by the patched candle), then the bias added into it.
        let mut y = s1.matmul(s2, (1, self.m, self.n, self.k), l1, l2)?;
        match &mut y {
            CpuStorage::F32(out) => add_rows(out, None, cpu_elements(self.name(), s3, l3)?),
            CpuStorage::BF16(out) => add_rows(out, None, cpu_elements(self.name(), s3, l3)?),
            CpuStorage::F16(out) => add_rows(out, None, cpu_elements(self.name(), s3, l3)?),
            other => candle_core::bail!("{}: no CPU kernel for {:?}", self.name(), other.dtype()),
        }
        Ok((y, Shape::from((self.m, self.n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        // cuBLAS's product (TF32 as configured), then the bias kernel into a second buffer; the
        // product is freed when the op returns, so only the output outlives it.
        let y = s1.matmul(s2, (1, self.m, self.n, self.k), l1, l2)?;
        let layout = Layout::contiguous((self.m, self.n));
        super::cuda::add_bias(self.name(), (&y, &layout), (s3, l3))
    }

    /// The backward passes of the product and of [`AddBias`], as those ops compute them.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let db = grad.apply_op1_no_bwd(&BiasGradient)?;
        let dx = match x.track_op() {
            true => Some(grad.matmul(&w.t()?)?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(candle_core::backprop::matmul_rhs_grad(x, w, &grad)?),
            false => None,
        };
        Ok((dx, dw, Some(db)))
    }
}

/// The bias gradient: the column sums of the output's gradient, in float32, rounded once to
/// its dtype.
struct BiasGradient;

impl CustomOp1 for BiasGradient {
    fn name(&self) -> &'static str {
        "add-bias-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l.dims().last().copied().unwrap_or(1);
        by_element!(self.name(), s, T => {
            let g = cpu_elements::<T>(self.name(), s, l)?;
            let sums = if n == 0 {
                Vec::new()
            } else {
                column_sums(g, n).into_iter().map(T::narrow).collect()
            };
            Ok((T::to_cpu_storage_owned(sums), Shape::from(n)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::column_sums(self.name(), (s, l))
    }
}
