//! A contiguous float32 CPU tensor read in place: the decoding kernels read weights through it
//! and the trainer reads gradients through it, without copying either.

use candle_core::{CpuStorage, Storage, StorageRef, Tensor};

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
            anyhow::bail!("{name} is not contiguous");
        };
        match &*storage {
            Storage::Cpu(CpuStorage::F32(_)) => {}
            _ => anyhow::bail!(
                "{name} must be float32 on the CPU, got {:?} on {:?}",
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
