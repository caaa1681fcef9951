//! Comparing tensors against reference values with the tolerances the fixtures define.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Running maxima of how far computed tensors are from their references.
#[derive(Debug, Clone, Default)]
pub struct Comparison {
    /// Largest absolute difference seen.
    pub max_abs: f64,
    /// Largest absolute difference divided by the largest reference element of its tensor.
    pub max_rel: f64,
    /// Tensors that failed, with the reason.
    pub failures: Vec<String>,
}

/// How close is close enough.
#[derive(Debug, Clone, Copy)]
pub enum Tolerance {
    /// Each element within `abs` absolutely or within `rel` of its reference value.
    Elementwise { abs: f64, rel: f64 },
    /// Each element within `rel` times the largest reference element of the tensor.
    OfTensorMax { rel: f64 },
    /// Exactly equal (token ids).
    Exact,
    /// Mean absolute difference over the tensor at most `abs` (resampled pixels).
    MeanAbs { abs: f64 },
}

impl std::fmt::Display for Tolerance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Elementwise { abs, rel } => write!(f, "abs {abs:e} or rel {rel:e}"),
            Self::OfTensorMax { rel } => write!(f, "{rel:e} of tensor max"),
            Self::Exact => write!(f, "exact"),
            Self::MeanAbs { abs } => write!(f, "mean abs {abs:e}"),
        }
    }
}

/// Largest absolute element of a tensor (0 when it is empty).
pub fn max_abs(t: &Tensor) -> Result<f32> {
    let flat = t.to_dtype(DType::F32)?.abs()?.flatten_all()?;
    if flat.elem_count() == 0 {
        return Ok(0.0);
    }
    Ok(flat.max(0)?.to_scalar::<f32>()?)
}

/// Largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        bail!("shapes differ: {:?} and {:?}", a.dims(), b.dims());
    }
    max_abs(&(a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?)
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

impl Comparison {
    /// Compares `ours` with `reference` (same shape) and records the outcome under `name`.
    pub fn check(
        &mut self,
        name: &str,
        ours: &Tensor,
        reference: &Tensor,
        tol: Tolerance,
    ) -> Result<()> {
        if ours.dims() != reference.dims() {
            self.failures.push(format!(
                "{name}: shape {:?}, reference {:?}",
                ours.dims(),
                reference.dims()
            ));
            return Ok(());
        }
        let a = to_f64(ours)?;
        let b = to_f64(reference)?;
        let scale = b
            .iter()
            .fold(0f64, |m, v| m.max(v.abs()))
            .max(f64::MIN_POSITIVE);
        let mut bad = 0usize;
        let mut max_abs = 0f64;
        let mut sum_abs = 0f64;
        for (x, y) in a.iter().zip(&b) {
            let d = (x - y).abs();
            if d.is_nan() {
                bad += 1;
                max_abs = f64::NAN;
                continue;
            }
            max_abs = max_abs.max(d);
            sum_abs += d;
            let ok = match tol {
                Tolerance::Elementwise { abs, rel } => d <= abs || d <= rel * y.abs(),
                Tolerance::OfTensorMax { rel } => d <= rel * scale,
                Tolerance::Exact => d == 0.0,
                Tolerance::MeanAbs { .. } => true,
            };
            if !ok {
                bad += 1;
            }
        }
        if let Tolerance::MeanAbs { abs } = tol {
            let mean = sum_abs / a.len().max(1) as f64;
            if mean > abs {
                self.failures
                    .push(format!("{name}: mean abs {mean:e} > {abs:e}"));
            }
        }
        self.max_abs = self.max_abs.max(max_abs);
        self.max_rel = self.max_rel.max(max_abs / scale);
        if bad > 0 || max_abs.is_nan() {
            self.failures.push(format!(
                "{name}: {bad} of {} elements outside {tol} (max abs {max_abs:e})",
                a.len()
            ));
        }
        Ok(())
    }

    /// Compares two scalars by relative difference.
    pub fn check_scalar_rel(&mut self, name: &str, ours: f64, reference: f64, rel: f64) {
        let d = (ours - reference).abs();
        let r = d / reference.abs().max(f64::MIN_POSITIVE);
        self.max_abs = self.max_abs.max(d);
        self.max_rel = self.max_rel.max(r);
        if r.is_nan() || r > rel {
            self.failures.push(format!(
                "{name}: {ours} vs reference {reference} (rel {r:e} > {rel:e})"
            ));
        }
    }

    /// `Ok` when nothing failed, else an error listing the failures.
    pub fn into_result(self) -> Result<Self> {
        if self.failures.is_empty() {
            Ok(self)
        } else {
            bail!("{}", self.failures.join("; "))
        }
    }
}
