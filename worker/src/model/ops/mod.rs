//! The ops the model spends its time in, each in two implementations chosen per call:
//!
//! - **Fused kernels** with hand-written backward passes: on the CPU for float32 tensors
//!   (bfloat16 and float16 inputs, which autocast's products return, are widened to float32
//!   copies first), and in the `cuda` build on a GPU for float32, bfloat16 and float16 (`worker/kernels/
//!   fused_ops.cu`, launched with the geometry of [`launch`] and run on the CPU by emulation in
//!   `worker/tests/cuda_kernels_emulated.rs`); inputs made contiguous where they are not.
//!   candle 0.11's fused `LayerNorm`, `ops::layer_norm`, `ops::softmax_last_dim` and
//!   `ops::sdpa` record no backward (gradients silently vanish), and its primitive
//!   compositions allocate many temporaries. Each op here is a `CustomOp` whose backward is
//!   itself a fused op, so gradients are exact and cheap. This is what runs by default.
//! - **Portable compositions** ([`portable`]) of candle primitives that have kernels and
//!   backward passes on every device: what runs for any other device or dtype (and for the
//!   CPU-only ops on a GPU), and everywhere when [`force_portable`] or `COCA_PORTABLE_OPS=1`
//!   asks for it. Their gradients are candle's autograd through the composition: exact, not
//!   approximated.

//! ## Dtypes (PyTorch autocast's rules)
//!
//! The dtype is a value: half-precision inputs compute internally in float32 (float64 stays
//! float64), and each op returns what PyTorch autocast returns for it:
//!
//! | op | computes in | returns |
//! |---|---|---|
//! | [`layer_norm`] | float32 statistics and affine | float32 (autocast's float32 list) |
//! | [`softmax_last_dim`], [`masked_softmax`] | float32: − row max, exp, normalise | float32 |
//! | [`gelu_erf`] | float32 erf and products | the input's dtype (not an autocast op) |
//! | [`cross_entropy_rows`], [`cross_entropy_stats`] | float32 log-sum-exp | float32 (same) |
//! | [`transpose_contiguous`] | no arithmetic | the input's dtype |
//!
//! A bfloat16 model therefore gets float32 activations out of its layer norms and softmaxes;
//! the mixed-precision model casts them back to bfloat16 where the next matrix product reads
//! them, as autocast does.

mod attention_probs;
mod bias;
mod blocked_linear;
pub mod collective;
mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
mod dispatch;
mod embedding;
mod frozen_attention;
mod gelu;
pub mod launch;
mod layer_norm;
mod math;
pub mod portable;
mod residual;
mod softmax;
mod transpose;

pub use attention_probs::attention_probs;
pub use bias::{add_bias, biased_product};
pub use blocked_linear::BlockedWeight;
pub use cross_entropy::{cross_entropy_rows, cross_entropy_stats};
#[cfg(feature = "cuda")]
pub(crate) use cuda::{adam_moment, adamw_param};
pub use dispatch::{force_portable, fused_dispatches, portable_forced, PORTABLE_OPS_ENV};
pub(crate) use dispatch::{fused, fused_on_cpu, widened, widened_on_cpu};
pub use embedding::{embedding, embedding_slice};
pub use frozen_attention::frozen_self_attention;
pub use gelu::gelu_erf;
pub(crate) use gelu::gelu_erf_f32;
#[cfg(test)]
use gelu::gelu_erf_value;
pub(crate) use layer_norm::layer_norm_row;
pub use layer_norm::{layer_norm, layer_norm_to};
pub use residual::add_widened;
pub(crate) use softmax::softmax_row;
pub use softmax::{masked_softmax, softmax_last_dim};
pub use transpose::transpose_contiguous;

use candle_core::{backend::BackendStorage, bail, CpuStorage, Layout, Result, Tensor};

/// Rows handed to one rayon task; small enough to balance, large enough to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

/// Which vocabulary ids the rows of an embedding table, or the columns of a row of logits,
/// are: `start .. start + V` of a vocabulary of `vocab` ids. Tensor parallelism splits the token
/// embedding and the caption logits this way; an unsplit one is [`VocabSlice::whole`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VocabSlice {
    /// The id of the first row or column.
    pub start: usize,
    /// The size of the whole vocabulary (ids at or past it are errors).
    pub vocab: usize,
}

impl VocabSlice {
    /// Every id of a vocabulary of `vocab`.
    pub fn whole(vocab: usize) -> Self {
        Self { start: 0, vocab }
    }

    /// Checks that `width` ids from `start` fit in the vocabulary, or fails naming `op`.
    pub(crate) fn check(&self, op: &str, width: usize) -> Result<()> {
        if self.start + width > self.vocab {
            bail!(
                "{op}: ids {}..{} are outside the vocabulary of {}",
                self.start,
                self.start + width,
                self.vocab
            );
        }
        Ok(())
    }
}

/// `t` in float32 and contiguous: the auxiliary inputs (weights, masks) of a fused op, which its
/// kernels read as float32 whatever the main input's dtype.
pub(crate) fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(candle_core::DType::F32)?.contiguous()
}

/// [`crate::f32_view::F32View::new`] with candle's error type, for ops that read a float32
/// CPU tensor in place.
pub(crate) fn f32_view<'t>(t: &'t Tensor, name: &str) -> Result<crate::f32_view::F32View<'t>> {
    crate::f32_view::F32View::new(t, name).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
}

/// A float32 matrix by its first element and strides (`row`, `col`), for
/// [`single_threaded_product`].
#[derive(Clone, Copy)]
pub(crate) struct Strided<P> {
    pub ptr: P,
    pub row: isize,
    pub col: isize,
}

/// `dst = lhs · rhs` for `lhs` `m × k` and `rhs` `k × n` on the calling thread (`gemm`, its
/// output written over, not read), for kernels that split the work between threads themselves.
///
/// # Safety
/// Every element the strides reach (`m × k` of `lhs`, `k × n` of `rhs`, `m × n` of `dst`) must lie
/// in live allocations, and no other thread may touch `dst`'s elements during the call.
pub(crate) unsafe fn single_threaded_product(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
) {
    // SAFETY: the caller's contract; `gemm` takes each matrix as (column, row) strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col,
            dst.row,
            false,
            lhs.ptr,
            lhs.col,
            lhs.row,
            rhs.ptr,
            rhs.col,
            rhs.row,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The contiguous f32 data behind a CPU storage, or an error naming `op`.
pub(crate) fn f32_data<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [f32]> {
    if !matches!(storage, CpuStorage::F32(_)) {
        bail!(
            "{op}: only float32 is implemented on CPU, got {:?}",
            storage.dtype()
        );
    }
    cpu_elements(op, storage, layout)
}

/// The contiguous elements of type `T` behind a CPU storage, or an error naming `op` (a
/// storage of another dtype is candle's error).
pub(crate) fn cpu_elements<'a, T: candle_core::WithDType>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
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
mod candle_amx_tests;
#[cfg(test)]
mod candle_backprop_tests;
#[cfg(test)]
mod candle_patch_tests;
#[cfg(test)]
mod portable_tests;
#[cfg(test)]
mod tests;

/// `len` float32 values written by `fill`, without zero-filling the buffer first: a write-only
/// kernel's output (a zero fill was a whole extra pass over the GELU's output, the largest
/// activation of a transformer block).
///
/// # Safety
/// `fill` must write every element of the slice it is given.
pub(crate) unsafe fn written_f32(
    len: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut out: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { out.set_len(len) };
    fill(&mut out);
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: the caller's `fill` wrote every element; MaybeUninit<f32> has f32's layout, and
    // the allocation is handed over whole (pointer, length, capacity).
    unsafe { Vec::from_raw_parts(out.as_mut_ptr() as *mut f32, out.len(), out.capacity()) }
}
