//! The `precision` section: the fixture trajectory under bf16 and float16 autocast against the
//! float32 one on the same device, measured as open_clip's own autocast drifts
//! (`scripts/open_clip_precision_drift.py`: worst tensor 8.6e-3 of its scale in bf16, 1.5e-3 in
//! float16, PyTorch 2.9.1 on the CPU). The bounds: the 1e-2 for bf16, 3e-3 for float16.

use super::train_section::{has_trajectory, run_trajectory};
use super::{finish, not_checked, Reference, SectionReport};
use crate::compare::Comparison;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The trajectory's peak learning rate × steps: Adam moves a parameter by about the rate per
/// step, so this is how far a tensor that started at zero can have gone (its scale floor).
const MOVE: f64 = 1e-3 * 6.0;

/// The bound on each half dtype's worst parameter drift and loss drift.
const BOUNDS: [(DType, f64, f64); 2] = [(DType::BF16, 1e-2, 2e-3), (DType::F16, 3e-3, 3e-4)];

/// How far a half-precision trajectory ended from the float32 one.
#[derive(Debug, Clone, PartialEq)]
pub struct PrecisionDrift {
    /// The largest relative loss difference over the steps.
    pub losses: f64,
    /// The worst tensor's `rms(a − b) / max(rms(a), lr·steps)`.
    pub parameters: f64,
    /// Its name.
    pub worst: String,
}

/// The drift of the fixture trajectory in `reference_dir` under `compute` autocast from the
/// float32 one, both on `device`.
pub fn precision_drift(
    reference_dir: &Path,
    device: &Device,
    compute: DType,
) -> Result<PrecisionDrift> {
    let reference = Reference::open(reference_dir, device)?;
    let float32 = run_trajectory(&reference, DType::F32)?;
    let half = run_trajectory(&reference, compute)?;
    drift(&float32, &half)
}

fn drift(
    float32: &super::train_section::Trajectory,
    half: &super::train_section::Trajectory,
) -> Result<PrecisionDrift> {
    let losses = float32
        .losses
        .iter()
        .zip(&half.losses)
        .map(|(a, b)| ((a - b) / a).abs())
        .fold(0f64, f64::max);
    let a: HashMap<String, Tensor> = float32.vars.tensors().into_iter().collect();
    let b: HashMap<String, Tensor> = half.vars.tensors().into_iter().collect();
    let (parameters, worst) = worst_drift(&a, &b)?;
    Ok(PrecisionDrift {
        losses,
        parameters,
        worst,
    })
}

fn rms(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .sqr()?
        .mean_all()?
        .sqrt()?
        .to_scalar::<f64>()?)
}

/// The worst tensor's drift and its name. The key third of a packed `in_proj_bias` is left
/// out: its true gradient is zero (softmax ignores it), so Adam moves it by normalised rounding
/// noise in any precision (the PyTorch script leaves it out too).
fn worst_drift(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> Result<(f64, String)> {
    let without_keys = |t: &Tensor| -> Result<Tensor> {
        let third = t.dim(0)? / 3;
        Ok(Tensor::cat(
            &[t.narrow(0, 0, third)?, t.narrow(0, 2 * third, third)?],
            0,
        )?)
    };
    let mut worst = (0f64, String::new());
    for (name, ta) in a {
        let tb = b
            .get(name)
            .with_context(|| format!("{name} is missing from the half-precision run"))?;
        let (ta, tb) = if name.ends_with("attn.in_proj_bias") {
            (without_keys(ta)?, without_keys(tb)?)
        } else {
            (ta.clone(), tb.clone())
        };
        let ratio = rms(&(&ta - &tb)?)? / rms(&ta)?.max(MOVE);
        if ratio > worst.0 || ratio.is_nan() {
            worst = (ratio, name.clone());
        }
    }
    Ok(worst)
}

/// bf16 and float16 trajectories against float32 on the reference's device.
pub(crate) fn precision_section(reference: &Reference) -> SectionReport {
    if !has_trajectory(reference) {
        return not_checked("precision", "no extras.json / extras.safetensors");
    }
    let outcome = (|| -> Result<Comparison> {
        let float32 = run_trajectory(reference, DType::F32)?;
        let mut comparison = Comparison::default();
        for (dtype, bound, loss_bound) in BOUNDS {
            let d = drift(&float32, &run_trajectory(reference, dtype)?)?;
            comparison.max_rel = comparison.max_rel.max(d.parameters);
            comparison.max_abs = comparison.max_abs.max(d.losses);
            if !(d.parameters <= bound && d.losses <= loss_bound) {
                comparison.failures.push(format!(
                    "{dtype:?}: {} drifts {:.3e} of its scale (bound {bound:e}), losses {:.3e} \
                     (bound {loss_bound:e})",
                    d.worst, d.parameters, d.losses
                ));
            }
        }
        Ok(comparison)
    })();
    let [(_, bf16, _), (_, f16, _)] = BOUNDS;
    finish(
        "precision",
        format!("bf16 parameters {bf16:e}, f16 {f16:e} of scale vs float32 (max_rel)"),
        outcome,
    )
}
