//! Six AdamW steps against open_clip's trajectory: the `train` section.

use super::{finish, not_checked, Reference, SectionReport};
use crate::compare::{Comparison, Tolerance};
use crate::model::autocast::Autocast;
use crate::model::tensor_parallel::TensorParallel;
use crate::model::CocaLossConfig;
use crate::train::adamw::AdamWConfig;
use crate::train::groups::TowerGroups;
use crate::train::schedule::CosineSchedule;
use crate::train::trainable::{trainable_model_parallel, TrainableWeights};
use crate::train::trainer::{Trainer, TrainerConfig};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;

/// The training trajectory's settings, from `extras.json` under `train`.
#[derive(Debug, serde::Deserialize)]
struct TrainSettings {
    steps: u64,
    lr: f64,
    warmup_steps: u64,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    max_grad_norm: f64,
}

/// The fixture trajectory as run here: the loss before and the pre-clip gradient norm of each
/// step, the final variables, and the extras it was read from.
pub(crate) struct Trajectory {
    pub losses: Vec<f64>,
    pub norms: Vec<f64>,
    pub vars: TrainableWeights,
    pub extras: HashMap<String, Tensor>,
}

/// Runs the fixture's 6 AdamW steps (`extras.json` `train`) from the reference weights on the
/// reference's device, with the matrix products in `compute` (float32, or bf16/f16 autocast).
pub(crate) fn run_trajectory(reference: &Reference, compute: DType) -> Result<Trajectory> {
    let extras_json = reference.dir.join("extras.json");
    let extras_st = reference.dir.join("extras.safetensors");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&extras_json)
            .with_context(|| format!("cannot read {}", extras_json.display()))?,
    )
    .with_context(|| format!("{} is not JSON", extras_json.display()))?;
    let settings: TrainSettings = serde_json::from_value(json["train"].clone())
        .with_context(|| format!("{}: bad `train` settings", extras_json.display()))?;
    let extras = candle_core::safetensors::load(&extras_st, &reference.device)
        .with_context(|| format!("cannot read {}", extras_st.display()))?;
    let get = |name: &str| {
        extras
            .get(name)
            .with_context(|| format!("extras.safetensors has no tensor {name}"))
    };
    let tp = TensorParallel::single().with_autocast(Autocast::new(compute));
    let (model, vars) = trainable_model_parallel(
        &reference.config,
        Some(reference.weights.clone()),
        0,
        DType::F32,
        &reference.device,
        &tp,
    )?;
    let config = TrainerConfig {
        adamw: AdamWConfig {
            beta1: settings.betas[0],
            beta2: settings.betas[1],
            eps: settings.eps,
        },
        max_grad_norm: Some(settings.max_grad_norm),
        schedule: CosineSchedule {
            warmup_steps: settings.warmup_steps,
            total_steps: settings.steps,
        },
        loss: CocaLossConfig::default(),
        span: Default::default(),
        buffers: crate::comm::PlacementRule::from_env()?,
    };
    let groups = TowerGroups::uniform(settings.lr, settings.weight_decay);
    let mut trainer = Trainer::new(model, &vars, &groups, config)?;
    let (image, text) = (get("train.image")?, get("train.text")?);
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for _ in 0..settings.steps {
        losses.push(trainer.backward(image, text, 1.0)?.total);
        norms.push(trainer.update()?.grad_norm);
    }
    drop(trainer);
    Ok(Trajectory {
        losses,
        norms,
        vars,
        extras,
    })
}

/// Six AdamW steps on the fixed batch from the reference weights: losses, pre-clip gradient
/// norms and the final parameters against open_clip's trajectory.
pub(crate) fn train_section(reference: &Reference) -> SectionReport {
    if !has_trajectory(reference) {
        return not_checked("train", "no extras.json / extras.safetensors");
    }
    let tol = Tolerance::Elementwise {
        abs: 1e-4,
        rel: 1e-4,
    };
    let outcome = (|| -> Result<Comparison> {
        let Trajectory {
            losses: ours,
            norms: our_norms,
            vars,
            extras,
        } = run_trajectory(reference, DType::F32)?;
        let get = |name: &str| {
            extras
                .get(name)
                .with_context(|| format!("extras.safetensors has no tensor {name}"))
        };
        let losses = get("train.losses")?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let norms = get("train.grad_norms")?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let mut comparison = Comparison::default();
        for (step, (loss, norm)) in ours.iter().zip(&our_norms).enumerate() {
            let (want_loss, want_norm) = (
                *losses.get(step).context("train.losses is too short")?,
                *norms.get(step).context("train.grad_norms is too short")?,
            );
            comparison.check_scalar_rel(&format!("loss[{step}]"), *loss, want_loss, 1e-4);
            comparison.check_scalar_rel(&format!("grad_norm[{step}]"), *norm, want_norm, 1e-4);
        }
        let mut finals = 0;
        for (name, expected) in &extras {
            if let Some(param) = name.strip_prefix("train.final.") {
                let var = vars
                    .get(param)
                    .with_context(|| format!("model has no weight {param}"))?;
                let mut ours = var.as_tensor().clone();
                // open_clip stores the scalar logit_scale as [] or [1]; compare values.
                if ours.elem_count() == expected.elem_count() {
                    ours = ours.reshape(expected.shape())?;
                }
                comparison.check(name, &ours, expected, tol)?;
                finals += 1;
            }
        }
        anyhow::ensure!(
            finals > 0,
            "extras.safetensors has no train.final.* tensors"
        );
        Ok(comparison)
    })();
    finish(
        "train",
        format!("losses and norms rel 1e-4, parameters {tol}"),
        outcome,
    )
}

/// Whether the reference folder holds the training trajectory's inputs.
pub(crate) fn has_trajectory(reference: &Reference) -> bool {
    reference.dir.join("extras.json").exists() && reference.dir.join("extras.safetensors").exists()
}
