//! The checkpoint and one teacher-forced pass: the `weights`, `forward`, `loss` and `grads`
//! sections.

use super::SectionReport;
use super::{finish, Reference, FORWARD_TOL, GRAD_TOL, LOSS_REL};
use crate::checkpoint::{check_against_model, read_state_dict};
use crate::compare::{Comparison, Tolerance};
use crate::model::{coca_loss, CocaLossConfig};
use crate::train::trainable::trainable_model;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Relative precision of a stored dtype: half a unit in the last place.
fn stored_precision(dtype: DType) -> Tolerance {
    let (abs, rel) = match dtype {
        DType::BF16 => (1e-38, 2f64.powi(-8)),
        DType::F16 => (6e-8, 2f64.powi(-11)),
        DType::F64 => (0.0, 1e-15),
        _ => (0.0, 2f64.powi(-24)),
    };
    Tolerance::Elementwise { abs, rel }
}

/// A checkpoint's weights, widened to float32.
pub(crate) struct Loaded {
    pub weights: HashMap<String, Tensor>,
    /// Whether every tensor was stored with at least the reference's (float32) precision.
    pub lossless: bool,
}

/// The checkpoint, read and mapped to open_clip's layout, against the reference weights.
pub(crate) fn weights_section(
    reference: &Reference,
    checkpoint: &Path,
) -> (SectionReport, Option<Loaded>) {
    let mut tolerance = "stored dtype precision".to_string();
    let mut loaded = None;
    let outcome = (|| -> Result<Comparison> {
        let tensors = read_state_dict(checkpoint)?;
        check_against_model(&tensors, &reference.config)?;
        let mut comparison = Comparison::default();
        for (name, tensor) in &tensors {
            let tol = stored_precision(tensor.dtype());
            tolerance = format!("{tol} ({:?})", tensor.dtype());
            let expected = reference
                .weights
                .get(name)
                .with_context(|| format!("reference weights lack {name}"))?;
            comparison.check(name, tensor, expected, tol)?;
        }
        let lossless = tensors
            .iter()
            .all(|(_, t)| matches!(t.dtype(), DType::F32 | DType::F64));
        let weights = tensors
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        loaded = Some(Loaded { weights, lossless });
        Ok(comparison)
    })();
    let report = finish("weights", tolerance, outcome);
    (report, loaded)
}

/// forward, loss and grads from one teacher-forced pass.
pub(crate) fn model_sections(
    reference: &Reference,
    weights: HashMap<String, Tensor>,
) -> Vec<SectionReport> {
    let names: Vec<String> = weights.keys().cloned().collect();
    let run = || -> Result<(Comparison, Comparison, Comparison)> {
        let (model, vars) = trainable_model(
            &reference.config,
            Some(weights),
            0,
            DType::F32,
            &reference.device,
        )?;
        let image = reference.io("input.image")?;
        let text = reference.io("input.text")?;
        let out = model.forward(image, text)?;
        let mut forward = Comparison::default();
        let unnormalized = model.visual.forward(image)?.pooled;
        for (name, ours) in [
            ("output.image_features", &out.image_features),
            ("output.image_features_unnormalized", &unnormalized),
            ("output.image_embs", &out.image_embs),
            ("output.text_features", &out.text_features),
            ("output.token_embs", &out.token_embs),
            ("output.logits", &out.logits),
            ("output.labels", &out.labels.to_dtype(DType::I64)?),
            ("output.logit_scale", &out.logit_scale.reshape(1)?),
        ] {
            forward.check(name, ours, reference.io(name)?, FORWARD_TOL)?;
        }
        let loss = coca_loss(&out, &CocaLossConfig::default())?;
        let mut losses = Comparison::default();
        for (name, ours) in [
            ("loss.contrastive", &loss.contrastive),
            ("loss.caption", &loss.caption),
            ("loss.total", &loss.total),
        ] {
            let theirs = reference.io(name)?.flatten_all()?.to_vec1::<f32>()?[0];
            losses.check_scalar_rel(
                name,
                ours.to_scalar::<f32>()? as f64,
                theirs as f64,
                LOSS_REL,
            );
        }
        let grads = loss.total.backward()?;
        let mut gradients = Comparison::default();
        for name in &names {
            let var = vars
                .get(name)
                .with_context(|| format!("model has no weight {name}"))?;
            let theirs = reference.io(&format!("grad.{name}"))?;
            match grads.get(var.as_tensor()) {
                Some(ours) => gradients.check(name, ours, theirs, GRAD_TOL)?,
                None => gradients
                    .failures
                    .push(format!("{name}: no gradient reached it")),
            }
        }
        Ok((forward, losses, gradients))
    };
    match run() {
        Ok((forward, losses, gradients)) => vec![
            finish("forward", FORWARD_TOL.to_string(), Ok(forward)),
            finish("loss", format!("rel {LOSS_REL:e}"), Ok(losses)),
            finish("grads", GRAD_TOL.to_string(), Ok(gradients)),
        ],
        Err(e) => ["forward", "loss", "grads"]
            .into_iter()
            .map(|name| finish(name, "-".into(), Err(anyhow::anyhow!("{e:#}"))))
            .collect(),
    }
}
