//! A contiguous float32 CPU tensor read or written in place: the decoding kernels read weights
//! through it and the trainer reads gradients through it, without copying either, and the
//! trainer's AdamW writes the flat parameter buffer the model's variables view.

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, StorageRef, Tensor};
use std::cell::RefCell;

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

/// Runs `f` on the elements of `tensor`, a contiguous float32 CPU tensor, written in place
/// (the trainer's flat parameter buffer, whose views are the model's variables, updated by
/// the CPU's AdamW kernels). `name` goes into the error otherwise. The storage is locked for
/// writing while `f` runs: nothing else may read it meanwhile (candle ops on any view of it
/// from another thread wait).
pub fn with_f32_mut<R>(
    tensor: &Tensor,
    name: &str,
    f: impl FnOnce(&mut [f32]) -> R,
) -> anyhow::Result<R> {
    if !tensor.device().is_cpu() || tensor.dtype() != candle_core::DType::F32 {
        anyhow::bail!(
            "{name} must be float32 on the CPU, got {:?} on {:?}",
            tensor.dtype(),
            tensor.device()
        );
    }
    let op = WriteInPlace {
        f: RefCell::new(Some(f)),
        result: RefCell::new(None),
    };
    tensor
        .inplace_op1(&op)
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    op.result
        .into_inner()
        .ok_or_else(|| anyhow::anyhow!("{name} was not written"))
}

/// [`with_f32_mut`]'s op: candle hands it the storage, locked for writing.
struct WriteInPlace<F, R> {
    f: RefCell<Option<F>>,
    result: RefCell<Option<R>>,
}

impl<F: FnOnce(&mut [f32]) -> R, R> InplaceOp1 for WriteInPlace<F, R> {
    fn name(&self) -> &'static str {
        "write-f32-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the buffer is not contiguous");
        };
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("the buffer is not float32");
        };
        let f = self.f.borrow_mut().take();
        if let Some(f) = f {
            *self.result.borrow_mut() = Some(f(&mut data[start..end]));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn written_in_place_through_a_view_and_refused_otherwise() {
        let flat = Tensor::arange(0f32, 6., &Device::Cpu).unwrap();
        let view = flat.narrow(0, 2, 3).unwrap();
        let sum = with_f32_mut(&view, "the view", |x| {
            x.iter_mut().for_each(|v| *v *= 10.0);
            x.iter().sum::<f32>()
        })
        .unwrap();
        assert_eq!(sum, 90.0);
        assert_eq!(
            flat.to_vec1::<f32>().unwrap(),
            [0.0, 1.0, 20.0, 30.0, 40.0, 5.0]
        );
        let ints = Tensor::arange(0u32, 4, &Device::Cpu).unwrap();
        let err = with_f32_mut(&ints, "the ids", |_| ()).unwrap_err();
        assert!(
            format!("{err}").contains("the ids must be float32"),
            "{err}"
        );
        let strided = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert!(with_f32_mut(&strided, "the transpose", |_| ()).is_err());
    }
}
