//! Fused CPU kernels with hand-written backward passes.
//!
//! candle 0.11's fused `LayerNorm`, `ops::layer_norm`, `ops::softmax_last_dim` and `ops::sdpa`
//! record no backward (gradients silently vanish), and its primitive compositions allocate many
//! temporaries. Each op here is a `CustomOp` whose backward is itself a fused op, so gradients are
//! exact and cheap. They run on contiguous float32 CPU tensors; any other dtype or device is an
//! error naming the op (GPU kernels come with the CUDA feature).

mod cross_entropy;
mod gelu;
mod layer_norm;
mod softmax;
mod transpose;

pub use cross_entropy::cross_entropy_rows;
pub(crate) use cross_entropy::{CrossEntropyBackward, VocabShard};
pub use gelu::gelu_erf;
pub(crate) use gelu::gelu_erf_value;
pub use layer_norm::layer_norm;
pub(crate) use layer_norm::layer_norm_row;
pub(crate) use softmax::softmax_row;
pub use softmax::{masked_softmax, softmax_last_dim};
pub use transpose::transpose_contiguous;

use candle_core::{backend::BackendStorage, bail, CpuStorage, Layout, Result};

/// Rows handed to one rayon task; small enough to balance, large enough to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

/// The contiguous f32 data behind a CPU storage, or an error naming `op`.
pub(crate) fn f32_data<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        other => bail!(
            "{op}: only float32 is implemented on CPU, got {:?}",
            other.dtype()
        ),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// The contiguous u32 data behind a CPU storage, or an error naming `op`.
pub(crate) fn u32_data<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [u32]> {
    let data = match storage {
        CpuStorage::U32(d) => d.as_slice(),
        other => bail!("{op}: indices must be u32, got {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: indices must be contiguous"),
    }
}

#[cfg(test)]
mod tests;
