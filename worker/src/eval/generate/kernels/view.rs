//! What the kernels read: float32 tensors viewed in place, weight element types, and weight
//! matrices in either precision.

pub use crate::f32_view::F32View;
use half::bf16;
use rayon::prelude::*;

/// A weight element the kernels read: float32, or bfloat16 widened exactly to float32 (all
/// arithmetic is float32 either way).
pub trait WeightElement: Copy + Send + Sync {
    /// Bits per element (32 or 16), for the SIMD loads (x86's AVX2 loops only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const BITS: u32;
    fn widen(self) -> f32;
}

impl WeightElement for f32 {
    const BITS: u32 = 32;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl WeightElement for bf16 {
    const BITS: u32 = 16;
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// A weight matrix as the kernels read it.
pub enum Matrix<'t> {
    /// The model's float32 tensor, read in place.
    F32(F32View<'t>),
    /// A bfloat16 copy (rounded to nearest even): half the bytes to stream per step.
    Bf16(Vec<bf16>),
}

impl<'t> Matrix<'t> {
    /// The bfloat16 copy of `view`.
    pub fn bf16_of(view: &F32View) -> Matrix<'static> {
        Matrix::Bf16(
            view.as_slice()
                .par_chunks(1 << 16)
                .flat_map_iter(|c| c.iter().map(|&v| bf16::from_f32(v)))
                .collect(),
        )
    }

    /// Elements held.
    pub fn elements(&self) -> usize {
        match self {
            Matrix::F32(v) => v.as_slice().len(),
            Matrix::Bf16(d) => d.len(),
        }
    }

    /// Moves the elements onto huge pages (see [`crate::huge_pages::advise`]): every step
    /// streams them.
    pub fn advise_huge_pages(&self) -> std::io::Result<()> {
        match self {
            Matrix::F32(v) => crate::huge_pages::advise(v.as_slice()),
            Matrix::Bf16(d) => crate::huge_pages::advise(d),
        }
    }

    /// Bytes streamed by one product.
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::F32(v) => std::mem::size_of_val(v.as_slice()),
            Matrix::Bf16(d) => std::mem::size_of_val(d.as_slice()),
        }
    }
}
