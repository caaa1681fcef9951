//! Parameters as one flat float32 buffer, with a table of where each tensor lives.
//!
//! The optimizer, gradient clipping and (later) sharding work on flat buffers: one pass over
//! contiguous memory instead of a dozen tensor ops per parameter, and a partition of the buffer
//! is a partition of the optimizer state.

use crate::comm::FlatBuffer;
use crate::f32_view::F32View;
use anyhow::{bail, ensure, Result};
use candle_core::{backprop::GradStore, DType, Tensor, Var};
use rayon::prelude::*;

/// How [`FlatParams::accumulate_grads`] puts a backward pass's gradients into a flat buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradWrite {
    /// Added to what the buffer holds (the later micro-batches of a step).
    Add,
    /// Written over whatever it holds (the first micro-batch of a step).
    Overwrite,
}

/// Where one parameter lives in the flat buffers, and how it is optimised.
#[derive(Debug, Clone)]
pub struct Segment {
    /// open_clip name.
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// Base learning rate (before the schedule factor).
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Segment {
    /// A gradient of `len` elements fits this parameter, or an error naming it.
    fn check_gradient_len(&self, len: usize) -> Result<()> {
        ensure!(
            len == self.len,
            "the gradient of {} has {len} elements, the parameter {}",
            self.name,
            self.len
        );
        Ok(())
    }
}

/// The trainable variables in a fixed order, and their segments in the flat buffers.
pub struct FlatParams {
    vars: Vec<Var>,
    segments: Vec<Segment>,
    total: usize,
}

/// The flat layout of named parameters: `named` is sorted by name in place (so every process
/// lays out the same parameters alike) and each is placed after the ones before it. Returns
/// the offsets, in the sorted order, and the total length. The model's variables are made
/// views of one buffer in this layout ([`crate::train::trainable`]) and the trainer's segments
/// follow it ([`FlatParams::new`]).
pub fn lay_out_by_name<T>(
    named: &mut [(String, T)],
    len: impl Fn(&T) -> usize,
) -> (Vec<usize>, usize) {
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut total = 0;
    let offsets = named
        .iter()
        .map(|(_, item)| {
            let offset = total;
            total += len(item);
            offset
        })
        .collect();
    (offsets, total)
}

/// Per-parameter learning rate and weight decay, decided by name and shape.
pub trait GroupRule {
    fn lr_and_wd(&self, name: &str, shape: &[usize]) -> (f64, f64);
}

impl FlatParams {
    /// Lays out `vars` ([`lay_out_by_name`]: the layout is the same in every process) with the
    /// learning rate and weight decay `rule` gives each.
    pub fn new(mut vars: Vec<(String, Var)>, rule: &dyn GroupRule) -> Result<Self> {
        let (offsets, total) = lay_out_by_name(&mut vars, |v| v.elem_count());
        let mut segments = Vec::with_capacity(vars.len());
        for ((name, var), offset) in vars.iter().zip(offsets) {
            if var.dtype() != DType::F32 {
                bail!(
                    "{name}: the optimizer keeps float32 parameters, found {:?}",
                    var.dtype()
                );
            }
            let shape = var.dims().to_vec();
            let (lr, weight_decay) = rule.lr_and_wd(name, &shape);
            segments.push(Segment {
                name: name.clone(),
                len: var.elem_count(),
                shape,
                offset,
                lr,
                weight_decay,
            });
        }
        Ok(Self {
            vars: vars.into_iter().map(|(_, v)| v).collect(),
            segments,
            total,
        })
    }

    /// Total number of scalars.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether there are no parameters at all.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Checks that `flat` is the buffer the variables view, in this layout: as long as all
    /// of them, each variable a contiguous view at its segment's offset (what
    /// [`crate::train::trainable`] makes), so that updating `flat` updates them.
    pub fn check_views_of(&self, flat: &Tensor) -> Result<()> {
        ensure!(
            flat.rank() == 1 && flat.elem_count() == self.total && flat.dtype() == DType::F32,
            "the parameter buffer is {:?} {:?}, the variables need {} float32 scalars",
            flat.dtype(),
            flat.dims(),
            self.total
        );
        for (var, s) in self.vars.iter().zip(&self.segments) {
            let at = var.layout().start_offset();
            ensure!(
                var.is_contiguous() && at == s.offset && var.device().same_device(flat.device()),
                "{} is not a view of the parameter buffer at {} (it starts at {at})",
                s.name,
                s.offset
            );
        }
        Ok(())
    }

    /// Adds the gradients in `grads` into the first [`len`](Self::len) elements of `flat` (for
    /// accumulation; a longer buffer keeps its tail); parameters that received no gradient add
    /// nothing. With [`GradWrite::Overwrite`] the gradients are written instead (and the
    /// segments of parameters without one set to zero): the first micro-batch of a step then
    /// needs neither a zero-filled buffer nor a read of it (`0 + g` is `g`).
    pub fn accumulate_grads(
        &self,
        grads: &GradStore,
        flat: &mut FlatBuffer,
        write: GradWrite,
    ) -> Result<()> {
        if flat.len() < self.total {
            bail!(
                "gradient buffer has {} scalars, expected at least {}",
                flat.len(),
                self.total
            );
        }
        let rest = match flat {
            FlatBuffer::Host(v) => &mut v[..self.total],
            FlatBuffer::Device(t) => {
                // Segment by segment, in place: a concatenated gradient would be a second full
                // copy for the length of the pass.
                for (var, s) in self.vars.iter().zip(&self.segments) {
                    let g = match (grads.get(var.as_tensor()), write) {
                        (Some(g), _) => g.flatten_all()?.to_dtype(DType::F32)?,
                        (None, GradWrite::Overwrite) => {
                            t.narrow(0, s.offset, s.len)?.zeros_like()?
                        }
                        (None, GradWrite::Add) => continue,
                    };
                    s.check_gradient_len(g.elem_count())?;
                    let value = match write {
                        GradWrite::Add => (t.narrow(0, s.offset, s.len)? + g)?,
                        GradWrite::Overwrite => g,
                    };
                    t.slice_set(&value, 0, s.offset)?;
                }
                return Ok(());
            }
        };
        // Each gradient is read in place (made contiguous first where it is not): copying them
        // out would hold a second full gradient for the length of the pass.
        let contiguous: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).map(|g| g.contiguous()).transpose())
            .collect::<candle_core::Result<_>>()?;
        let views: Vec<Option<F32View>> = contiguous
            .iter()
            .zip(&self.segments)
            .map(|(g, s)| {
                g.as_ref()
                    .map(|g| {
                        let view = F32View::new(g, &format!("the gradient of {}", s.name))?;
                        s.check_gradient_len(view.as_slice().len())?;
                        Ok(view)
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let parts: Vec<Option<&[f32]>> = views
            .iter()
            .map(|v| v.as_ref().map(F32View::as_slice))
            .collect();
        let mut rest = rest;
        let mut chunks = Vec::with_capacity(self.segments.len());
        for s in &self.segments {
            let (head, tail) = rest.split_at_mut(s.len);
            chunks.push(head);
            rest = tail;
        }
        chunks
            .into_par_iter()
            .zip(parts.par_iter())
            .for_each(|(dst, src)| match (src, write) {
                (Some(src), GradWrite::Add) => {
                    dst.iter_mut().zip(src.iter()).for_each(|(d, s)| *d += s)
                }
                (Some(src), GradWrite::Overwrite) => dst.copy_from_slice(src),
                (None, GradWrite::Add) => {}
                (None, GradWrite::Overwrite) => dst.fill(0.0),
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Placement;
    use candle_core::Device;

    struct Uniform;
    impl GroupRule for Uniform {
        fn lr_and_wd(&self, _: &str, _: &[usize]) -> (f64, f64) {
            (1.0, 0.0)
        }
    }

    #[test]
    fn gradients_are_added_or_written_over_stale_contents() {
        // `a` (2 scalars) gets a gradient, `b` (3) none; the buffer holds a stale sum and a
        // tail past the parameters. Adding keeps `b`'s and the tail; writing over sets `a`'s
        // gradient and zeroes `b`'s (its stale values are no gradient of this step), and
        // leaves the tail.
        let a = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let b = Var::new(&[0f32; 3], &Device::Cpu).unwrap();
        let params =
            FlatParams::new(vec![("a".into(), a.clone()), ("b".into(), b)], &Uniform).unwrap();
        let grads = (a.as_tensor() * 3.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let stale = vec![10f32, 20.0, 30.0, 40.0, 50.0, 60.0];
        for placement in [Placement::Host, Placement::Device(Device::Cpu)] {
            for (write, want) in [
                (GradWrite::Add, [13f32, 23.0, 30.0, 40.0, 50.0, 60.0]),
                (GradWrite::Overwrite, [3f32, 3.0, 0.0, 0.0, 0.0, 60.0]),
            ] {
                let mut flat = FlatBuffer::from_host(stale.clone(), &placement).unwrap();
                params.accumulate_grads(&grads, &mut flat, write).unwrap();
                assert_eq!(flat.to_vec().unwrap(), want, "{write:?} {placement:?}");
            }
        }
    }
}
