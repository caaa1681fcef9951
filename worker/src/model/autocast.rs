//! Mixed precision as PyTorch's `torch.autocast`: which dtype the matrix products compute in.
//!
//! The weights stay float32 (the masters). Under a half-precision compute dtype every matrix
//! product (linear layers, attention's `q·kᵀ` and `probs·v`, the patch embedding, the
//! projections and the vocabulary projection) casts its operands to that dtype and returns it;
//! layer norm, softmax, the GELU's erf, the losses, L2 normalisation and the residual stream
//! stay float32 (the ops in [`super::ops`] compute their statistics in float32 whatever their
//! input). The cast's backward returns the gradients to float32, so the variables' gradients
//! are float32.

use candle_core::{DType, Result, Tensor};

/// The compute dtype of the matrix products: off (float32) or bf16/f16.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Autocast {
    dtype: Option<DType>,
}

impl Autocast {
    /// Float32 everywhere.
    pub fn off() -> Self {
        Self { dtype: None }
    }

    /// Matrix products in `dtype` (`BF16` or `F16`; `F32` is [`Self::off`]).
    pub fn new(dtype: DType) -> Self {
        Self {
            dtype: (dtype != DType::F32).then_some(dtype),
        }
    }

    /// The half-precision compute dtype, if any.
    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    /// The dtype matrix products return (float32 when off).
    pub fn compute_dtype(&self) -> DType {
        self.dtype.unwrap_or(DType::F32)
    }

    /// `x` in the compute dtype (unchanged when off): the operand of a matrix product.
    pub fn cast(&self, x: &Tensor) -> Result<Tensor> {
        match self.dtype {
            Some(dtype) if x.dtype() != dtype => x.to_dtype(dtype),
            _ => Ok(x.clone()),
        }
    }

    /// `a · b` with both operands in the compute dtype. `a` is made contiguous: it is often
    /// one position of a sequence (a pooled token, the last one), a view whose row stride is
    /// the whole sequence, which candle's cuBLAS product refuses ("matmul is only supported
    /// for contiguous tensors", seen on an H100 in float32, where no cast copies it).
    pub fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.cast(a)?.contiguous()?.matmul(&self.cast(b)?)
    }
}

/// `x` in float32 (unchanged when it is): what autocast's promotion does when a half-precision
/// product meets the float32 residual stream or a float32 op.
pub fn widen(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        Ok(x.clone())
    } else {
        x.to_dtype(DType::F32)
    }
}
