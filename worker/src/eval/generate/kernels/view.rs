//! What the kernels read: float32 tensors viewed in place, weight element types, and weight
//! matrices in either precision.

use candle_core::{CpuStorage, Storage, StorageRef, Tensor};
use half::bf16;
use rayon::prelude::*;

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

/// A weight element the kernels read: float32, or bfloat16 widened exactly to float32 (all
/// arithmetic is float32 either way).
pub trait WeightElement: Copy + Send + Sync {
    /// Bits per element (32 or 16), for the SIMD loads.
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
