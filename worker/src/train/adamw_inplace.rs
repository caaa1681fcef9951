//! AdamW's update of device-resident flat buffers as in-place ops: the moments, then the
//! parameters, written where they are (no temporaries the size of the model, as a composition
//! of tensor ops would allocate). On a GPU these launch our kernels
//! (`model::ops::cuda`); on the CPU (flat buffers placed as tensors) they run the same
//! arithmetic as [`super::adamw::adamw_chunk`].

use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result};
use rayon::prelude::*;

/// Elements handed to one rayon task.
const CHUNK: usize = 1 << 15;

/// `m ← β·m + (1 − β)·g`, or of `g²` into the second moment.
pub(super) struct AdamMoment {
    pub(super) beta: f32,
    pub(super) squared: bool,
}

/// `p ← p·decay − step_size · m / (√v · inv_bias2_sqrt + eps)`, from moments already updated.
pub(super) struct AdamWParam {
    /// `[decay, step_size, inv_bias2_sqrt, eps]`.
    pub(super) k: [f32; 4],
}

/// The contiguous float32 values of a CPU storage, read-only.
fn values<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((start, end))) => Ok(&d[start..end]),
        _ => bail!("{op}: float32 contiguous buffers only"),
    }
}

/// The contiguous float32 values of a CPU storage, to be written.
fn values_mut<'a>(op: &str, s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((start, end))) => Ok(&mut d[start..end]),
        _ => bail!("{op}: float32 contiguous buffers only"),
    }
}

impl InplaceOp2 for AdamMoment {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = values(self.name(), s2, l2)?;
        let m = values_mut(self.name(), s1, l1)?;
        if m.len() != g.len() {
            bail!(
                "{}: {} moments but {} gradients",
                self.name(),
                m.len(),
                g.len()
            );
        }
        let (beta, squared) = (self.beta, self.squared);
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let w = (1.0 - beta) * g;
                    *m = beta * *m + if squared { w * g } else { w };
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::model::ops::adam_moment(self.name(), (s1, l1), (s2, l2), self.beta, self.squared)
    }
}

impl InplaceOp3 for AdamWParam {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (m, v) = (values(self.name(), s2, l2)?, values(self.name(), s3, l3)?);
        let p = values_mut(self.name(), s1, l1)?;
        if m.len() != p.len() || v.len() != p.len() {
            bail!("{}: parameters and moments differ in length", self.name());
        }
        let [decay, step_size, inv_bias2_sqrt, eps] = self.k;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    *p *= decay;
                    *p -= step_size * m / (v.sqrt() * inv_bias2_sqrt + eps);
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::model::ops::adamw_param(self.name(), (s1, l1), (s2, l2), (s3, l3), self.k)
    }
}
