//! The residual stream's sum with a branch that may be in half precision.

use super::{f32_data, fused, written_f32, ROWS_PER_TASK};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task of the CPU kernel.
const CHUNK: usize = 1024 * ROWS_PER_TASK;

/// `x + y` for the float32 residual stream `x` and a branch output `y` of the same shape in any
/// float dtype (under autocast the compute dtype of the branch's last product), `y` widened to
/// float32 first, as autocast's type promotion does. The same numbers as
/// `x + y.to_dtype(F32)`, forward and backward, but the graph keeps neither the widened copy
/// of `y` (4 bytes per element) nor `y` itself, as an addition's inputs would be kept: the
/// backward pass reads no values here, so the op records its arguments as graph handles
/// (candle's `Tensor::graph_handle`, a change of the vendored candle) and the branch's output
/// is freed when the block's forward returns. Twice per transformer block. Float32 `x` on
/// the CPU or on a GPU runs the op (on a GPU candle's own cast and addition, the copy freed as
/// the op returns); anything else, the composition.
pub fn add_widened(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || x.shape() != y.shape() || !fused(&[x]) {
        return x + y.to_dtype(x.dtype())?;
    }
    x.contiguous()?.apply_op2(&y.contiguous()?, AddWidened)
}

struct AddWidened;

/// `x[i] + widen(y[i])` into a new buffer (written once, not zero-filled first).
fn widen_add<T: Sync>(x: &[f32], y: &[T], widen: impl Fn(&T) -> f32 + Sync) -> Result<Vec<f32>> {
    if x.len() != y.len() {
        bail!("add-widened: {} and {} elements", x.len(), y.len());
    }
    // SAFETY: `x`, `y` and the output have the same length, so their chunks pair up one for
    // one, and every element of each output chunk is written.
    Ok(unsafe {
        written_f32(x.len(), |out| {
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
                .for_each(|(out, (x, y))| {
                    for ((o, x), y) in out.iter_mut().zip(x).zip(y) {
                        o.write(x + widen(y));
                    }
                })
        })
    })
}

impl CustomOp2 for AddWidened {
    fn name(&self) -> &'static str {
        "add-widened"
    }

    /// The backward pass passes the gradient on (cast to the branch's dtype): it reads no
    /// values, so the graph holds its arguments as handles and the branch's output is freed
    /// once the block's forward returns (PyTorch's addition does not keep it either).
    fn bwd_reads_args(&self) -> bool {
        false
    }

    fn bwd_reads_result(&self) -> bool {
        false
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), s1, l1)?;
        let Some((start, end)) = l2.contiguous_offsets() else {
            bail!("{}: the branch must be contiguous", self.name());
        };
        // candle's own conversions (`to_dtype`), so the sum is the composition's bit for bit.
        let out = match s2 {
            CpuStorage::BF16(y) => widen_add(x, &y[start..end], |v| v.to_f32())?,
            CpuStorage::F16(y) => widen_add(x, &y[start..end], |v| v.to_f32())?,
            CpuStorage::F32(y) => widen_add(x, &y[start..end], |v| *v)?,
            other => bail!("{}: a {:?} branch", self.name(), other.dtype()),
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        // candle's cast and addition kernels; the widened copy lives only inside the op.
        if s2.dtype() == DType::F32 {
            let sum = s1.binary_impl::<candle_core::op::Add>(s2, l1, l2)?;
            return Ok((sum, l1.shape().clone()));
        }
        let widened = s2.to_dtype(l2, DType::F32)?;
        let sum =
            s1.binary_impl::<candle_core::op::Add>(&widened, l1, &Layout::contiguous(l2.shape()))?;
        Ok((sum, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        y: &Tensor,
        _sum: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(grad.to_dtype(y.dtype())?)))
    }
}
