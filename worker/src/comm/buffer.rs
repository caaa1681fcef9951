//! Flat float32 buffers where training keeps parameters, gradients and AdamW moments, and what
//! collectives reduce: host memory when the model computes on the CPU (the fused kernels of
//! [`crate::train::adamw`] and the ring work on it in place), a 1-D tensor on the model's device
//! otherwise (candle ops on the device; NCCL reduces it in place). The trainer is written once
//! against this type; only the few operations here look at which it is.

use crate::f32_view::with_f32_mut;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

/// Where a trainer keeps its flat buffers.
#[derive(Debug, Clone)]
pub enum Placement {
    /// Host memory (a CPU model).
    Host,
    /// Tensors on this device (a GPU model; or the CPU, to run the device code path there).
    Device(Device),
}

/// Which placement a trainer uses for a model on `device` (`--flat-buffers` in tests and for
/// debugging the device path on the CPU).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PlacementRule {
    /// Host memory on the CPU, device tensors elsewhere.
    #[default]
    Auto,
    /// Tensors on the model's device even on the CPU: the GPU code path, run on the CPU.
    Tensors,
}

impl PlacementRule {
    /// The environment variable that selects [`PlacementRule::Tensors`] (`tensors`).
    pub const ENV: &'static str = "COCA_FLAT_BUFFERS";

    /// From [`Self::ENV`]: `tensors` or unset/`auto`; anything else is an error.
    pub fn from_env() -> Result<Self> {
        match std::env::var(Self::ENV).ok().as_deref() {
            None | Some("") | Some("auto") => Ok(Self::Auto),
            Some("tensors") => Ok(Self::Tensors),
            Some(other) => anyhow::bail!("{}={other}: expected auto or tensors", Self::ENV),
        }
    }

    /// The placement for a model on `device`.
    pub fn placement(self, device: &Device) -> Placement {
        match (self, device) {
            (Self::Auto, Device::Cpu) => Placement::Host,
            _ => Placement::Device(device.clone()),
        }
    }
}

/// A flat float32 buffer, on the host or on a device.
#[derive(Debug, Clone)]
pub enum FlatBuffer {
    Host(Vec<f32>),
    /// A contiguous 1-D float32 tensor.
    Device(Tensor),
}

impl FlatBuffer {
    /// `len` zeros.
    pub fn zeros(len: usize, placement: &Placement) -> Result<Self> {
        Ok(match placement {
            Placement::Host => Self::Host(vec![0.0; len]),
            Placement::Device(d) => Self::Device(Tensor::zeros(len, DType::F32, d)?),
        })
    }

    /// `data` placed like `placement`.
    pub fn from_host(data: Vec<f32>, placement: &Placement) -> Result<Self> {
        Ok(match placement {
            Placement::Host => Self::Host(data),
            Placement::Device(d) => {
                let len = data.len();
                Self::Device(Tensor::from_vec(data, len, d)?)
            }
        })
    }

    /// A 1-D tensor as a buffer (made contiguous, float32).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        Ok(Self::Device(
            t.flatten_all()?.to_dtype(DType::F32)?.contiguous()?,
        ))
    }

    /// A copy of the elements of `t` (any shape, float32), placed by `placement`.
    pub fn copied_from(t: &Tensor, placement: &Placement) -> Result<Self> {
        let flat = t.flatten_all()?;
        Ok(match placement {
            Placement::Host => Self::Host(flat.to_vec1::<f32>()?),
            Placement::Device(d) => Self::Device(flat.to_device(d)?.copy()?),
        })
    }

    /// Writes every element into `dst`, a 1-D float32 tensor as long as this buffer, in place
    /// (on `dst`'s device; the trainer's parameter buffer, which the model's variables view).
    pub fn copy_into(&self, dst: &Tensor) -> Result<()> {
        ensure!(
            dst.dims() == [self.len()],
            "copying {} elements into a tensor of shape {:?}",
            self.len(),
            dst.dims()
        );
        match self {
            Self::Host(v) if dst.device().is_cpu() => {
                with_f32_mut(dst, "the copy's destination", |d| d.copy_from_slice(v))?
            }
            Self::Host(v) => dst.slice_set(&Tensor::from_slice(v, v.len(), dst.device())?, 0, 0)?,
            Self::Device(t) => dst.slice_set(&t.to_device(dst.device())?, 0, 0)?,
        }
        Ok(())
    }

    /// Where this buffer lives.
    pub fn placement(&self) -> Placement {
        match self {
            Self::Host(_) => Placement::Host,
            Self::Device(t) => Placement::Device(t.device().clone()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Host(v) => v.len(),
            Self::Device(t) => t.elem_count(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values on the host (a copy from a device).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        Ok(match self {
            Self::Host(v) => v.clone(),
            Self::Device(t) => t.to_vec1::<f32>()?,
        })
    }

    /// Elements `range` as a new buffer placed like this one.
    pub fn range(&self, range: Range<usize>) -> Result<Self> {
        ensure!(
            range.end <= self.len(),
            "range {range:?} beyond a buffer of {}",
            self.len()
        );
        Ok(match self {
            Self::Host(v) => Self::Host(v[range].to_vec()),
            // A copy, not a view: later writes into this buffer must not reach it.
            Self::Device(t) => Self::Device(t.narrow(0, range.start, range.len())?.copy()?),
        })
    }

    /// Elements `range` as a tensor of `shape` (a copy on the host; a view on a device).
    pub fn tensor(&self, range: Range<usize>, shape: &[usize], device: &Device) -> Result<Tensor> {
        Ok(match self {
            Self::Host(v) => Tensor::from_slice(&v[range], shape, device)?,
            Self::Device(t) => t.narrow(0, range.start, range.len())?.reshape(shape)?,
        })
    }

    /// Sets every element to zero.
    pub fn fill_zero(&mut self) -> Result<()> {
        match self {
            Self::Host(v) => v.iter_mut().for_each(|x| *x = 0.0),
            Self::Device(t) => *t = t.zeros_like()?,
        }
        Ok(())
    }

    /// Multiplies every element by `factor` (e.g. unscaling loss-scaled gradients).
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        match self {
            Self::Host(v) => {
                let f = factor as f32;
                v.iter_mut().for_each(|x| *x *= f);
            }
            Self::Device(t) => *t = t.affine(factor, 0.0)?,
        }
        Ok(())
    }

    /// Sets element `i` to `value` (a test's injected overflow).
    pub fn set(&mut self, i: usize, value: f32) -> Result<()> {
        ensure!(i < self.len(), "element {i} of a buffer of {}", self.len());
        match self {
            Self::Host(v) => v[i] = value,
            Self::Device(t) => {
                let one = Tensor::new(&[value], t.device())?;
                *t = t.slice_scatter0(&one, i)?;
            }
        }
        Ok(())
    }

    /// `self += other` (the same length and placement).
    pub fn add_assign(&mut self, other: &Self) -> Result<()> {
        ensure!(
            self.len() == other.len(),
            "adding a buffer of {} to one of {}",
            other.len(),
            self.len()
        );
        match (self, other) {
            (Self::Host(a), Self::Host(b)) => a.iter_mut().zip(b).for_each(|(a, b)| *a += b),
            (Self::Device(a), Self::Device(b)) => *a = (&*a + b)?,
            _ => anyhow::bail!("adding buffers placed differently (host and device)"),
        }
        Ok(())
    }

    /// Copies `src` into elements `offset..offset + src.len()`.
    pub fn write_at(&mut self, offset: usize, src: &Self) -> Result<()> {
        ensure!(
            offset + src.len() <= self.len(),
            "writing {} elements at {offset} into a buffer of {}",
            src.len(),
            self.len()
        );
        match (self, src) {
            (Self::Host(a), Self::Host(b)) => a[offset..offset + b.len()].copy_from_slice(b),
            (Self::Device(a), Self::Device(b)) => a.slice_set(b, 0, offset)?,
            _ => anyhow::bail!("copying between buffers placed differently (host and device)"),
        }
        Ok(())
    }

    /// This buffer followed by zeros up to `len` (collectives need equal blocks).
    pub fn padded(self, len: usize) -> Result<Self> {
        ensure!(
            len >= self.len(),
            "padding {} elements to {len}",
            self.len()
        );
        Ok(match self {
            Self::Host(mut v) => {
                v.resize(len, 0.0);
                Self::Host(v)
            }
            Self::Device(t) if len == t.elem_count() => Self::Device(t),
            Self::Device(t) => Self::Device(Tensor::cat(
                &[
                    &t,
                    &Tensor::zeros(len - t.elem_count(), DType::F32, t.device())?,
                ],
                0,
            )?),
        })
    }

    /// The first `len` elements.
    pub fn truncated(self, len: usize) -> Result<Self> {
        Ok(match self {
            Self::Host(mut v) => {
                v.truncate(len);
                Self::Host(v)
            }
            Self::Device(t) if len == t.elem_count() => Self::Device(t),
            Self::Device(t) => Self::Device(t.narrow(0, 0, len)?.contiguous()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(data: Vec<f32>) -> [FlatBuffer; 2] {
        [
            FlatBuffer::from_host(data.clone(), &Placement::Host).unwrap(),
            FlatBuffer::from_host(data, &Placement::Device(Device::Cpu)).unwrap(),
        ]
    }

    #[test]
    fn host_and_tensor_buffers_agree() {
        for mut b in both(vec![1.0, 2.0, 3.0, 4.0]) {
            let other = FlatBuffer::from_host(vec![0.5; 4], &b.placement()).unwrap();
            b.add_assign(&other).unwrap();
            assert_eq!(b.to_vec().unwrap(), [1.5, 2.5, 3.5, 4.5]);
            assert_eq!(b.range(1..3).unwrap().to_vec().unwrap(), [2.5, 3.5]);
            let two = FlatBuffer::from_host(vec![9.0, 8.0], &b.placement()).unwrap();
            b.write_at(2, &two).unwrap();
            assert_eq!(b.to_vec().unwrap(), [1.5, 2.5, 9.0, 8.0]);
            let padded = b.clone().padded(6).unwrap();
            assert_eq!(padded.to_vec().unwrap(), [1.5, 2.5, 9.0, 8.0, 0.0, 0.0]);
            assert_eq!(
                padded.truncated(3).unwrap().to_vec().unwrap(),
                [1.5, 2.5, 9.0]
            );
            let t = b.tensor(0..4, &[2, 2], &Device::Cpu).unwrap();
            assert_eq!(t.to_vec2::<f32>().unwrap(), [[1.5, 2.5], [9.0, 8.0]]);
            b.fill_zero().unwrap();
            assert_eq!(b.to_vec().unwrap(), [0.0; 4]);
            assert!(b.write_at(3, &two).is_err());
        }
    }

    #[test]
    fn mixing_placements_is_an_error() {
        let [mut host, device] = both(vec![1.0]);
        assert!(host.add_assign(&device).is_err());
    }

    #[test]
    fn placement_rule_keeps_cpu_models_on_the_host() {
        assert!(matches!(
            PlacementRule::Auto.placement(&Device::Cpu),
            Placement::Host
        ));
        assert!(matches!(
            PlacementRule::Tensors.placement(&Device::Cpu),
            Placement::Device(Device::Cpu)
        ));
    }
}
