//! `coca-worker verify`: this implementation against a reference folder exported from
//! open_clip (the layout of `shared/fixtures/coca-tiny/`).
//!
//! Each section compares one thing and reports `pass`, `FAIL` or `not-checked` (when the
//! reference folder lacks its inputs, or this build does not implement it yet). A section that
//! cannot even run (a corrupt checkpoint, a missing tensor) fails with the reason.

use crate::checkpoint::{check_against_model, read_state_dict};
use crate::compare::{Comparison, Tolerance};
use crate::model::trainable::trainable_model;
use crate::model::{coca_loss, CocaConfig, CocaLossConfig};
use crate::train::adamw::AdamWConfig;
use crate::train::groups::TowerGroups;
use crate::train::schedule::CosineSchedule;
use crate::train::trainer::{Trainer, TrainerConfig};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Outcome of one section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    NotChecked,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct SectionReport {
    pub name: &'static str,
    pub status: Status,
    pub comparison: Comparison,
    pub tolerance: String,
    /// Why a section failed or was not checked.
    pub note: String,
}

impl std::fmt::Display for SectionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = match self.status {
            Status::Pass => "pass",
            Status::Fail => "FAIL",
            Status::NotChecked => "not-checked",
        };
        write!(
            f,
            "{} {status} max_abs={:.3e} max_rel={:.3e} tol={}",
            self.name, self.comparison.max_abs, self.comparison.max_rel, self.tolerance
        )?;
        if !self.note.is_empty() {
            write!(f, " ({})", self.note)?;
        }
        Ok(())
    }
}

const FORWARD_TOL: Tolerance = Tolerance::Elementwise {
    abs: 1e-4,
    rel: 1e-4,
};
const LOSS_REL: f64 = 1e-4;
const GRAD_TOL: Tolerance = Tolerance::OfTensorMax { rel: 1e-3 };

/// The reference folder's contents.
struct Reference {
    dir: PathBuf,
    config: CocaConfig,
    weights: HashMap<String, Tensor>,
    io: Option<HashMap<String, Tensor>>,
}

impl Reference {
    fn open(dir: &Path) -> Result<Self> {
        let config = CocaConfig::from_file(&dir.join("config.json"))?;
        let weights_path = dir.join("weights.safetensors");
        let weights = candle_core::safetensors::load(&weights_path, &Device::Cpu)
            .with_context(|| format!("cannot read {}", weights_path.display()))?;
        let io_path = dir.join("io.safetensors");
        let io = if io_path.exists() {
            Some(
                candle_core::safetensors::load(&io_path, &Device::Cpu)
                    .with_context(|| format!("cannot read {}", io_path.display()))?,
            )
        } else {
            None
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            io,
        })
    }

    fn io(&self, name: &str) -> Result<&Tensor> {
        let io = self
            .io
            .as_ref()
            .with_context(|| format!("{} has no io.safetensors", self.dir.display()))?;
        io.get(name)
            .with_context(|| format!("io.safetensors has no tensor {name}"))
    }
}

/// Runs every section; the reference folder itself must at least hold `config.json` and
/// `weights.safetensors`.
pub fn verify(reference_dir: &Path, checkpoint: Option<&Path>) -> Result<Vec<SectionReport>> {
    let reference = Reference::open(reference_dir)?;
    let mut reports = Vec::new();
    let mut model_note = String::new();
    let weights = match checkpoint {
        Some(path) => {
            let (report, loaded) = weights_section(&reference, path);
            reports.push(report);
            match loaded {
                Some(Loaded {
                    weights,
                    lossless: true,
                }) => Some(weights),
                // The reference outputs were computed from float32 weights: a model on rounded
                // weights cannot reproduce them to 1e-4, so the model sections use the
                // reference weights and the weights section alone judges the checkpoint.
                Some(Loaded {
                    lossless: false, ..
                }) => {
                    model_note = "checkpoint is lower precision than the reference: model \
                                  sections use the reference weights"
                        .into();
                    Some(reference.weights.clone())
                }
                None => None,
            }
        }
        None => {
            reports.push(not_checked("weights", "no --checkpoint given"));
            Some(reference.weights.clone())
        }
    };
    match (&reference.io, weights) {
        (Some(_), Some(weights)) => reports.extend(
            model_sections(&reference, weights)
                .into_iter()
                .map(|mut r| {
                    if r.note.is_empty() {
                        r.note.clone_from(&model_note);
                    }
                    r
                }),
        ),
        (None, _) => {
            for name in ["forward", "loss", "grads"] {
                reports.push(not_checked(name, "no io.safetensors"));
            }
        }
        (_, None) => {
            for name in ["forward", "loss", "grads"] {
                reports.push(not_checked(name, "the checkpoint did not load"));
            }
        }
    }
    reports.push(train_section(&reference));
    for name in ["tokenizer", "preprocess", "zeroshot", "generate"] {
        reports.push(not_checked(name, "not implemented in this build"));
    }
    Ok(reports)
}

fn not_checked(name: &'static str, why: &str) -> SectionReport {
    SectionReport {
        name,
        status: Status::NotChecked,
        comparison: Comparison::default(),
        tolerance: "-".into(),
        note: why.into(),
    }
}

fn finish(name: &'static str, tolerance: String, outcome: Result<Comparison>) -> SectionReport {
    match outcome {
        Ok(comparison) => match comparison.clone().into_result() {
            Ok(c) => SectionReport {
                name,
                status: Status::Pass,
                comparison: c,
                tolerance,
                note: String::new(),
            },
            Err(e) => SectionReport {
                name,
                status: Status::Fail,
                comparison,
                tolerance,
                note: format!("{e:#}"),
            },
        },
        Err(e) => SectionReport {
            name,
            status: Status::Fail,
            comparison: Comparison::default(),
            tolerance,
            note: format!("{e:#}"),
        },
    }
}

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
struct Loaded {
    weights: HashMap<String, Tensor>,
    /// Whether every tensor was stored with at least the reference's (float32) precision.
    lossless: bool,
}

/// The checkpoint, read and mapped to open_clip's layout, against the reference weights.
fn weights_section(reference: &Reference, checkpoint: &Path) -> (SectionReport, Option<Loaded>) {
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
fn model_sections(reference: &Reference, weights: HashMap<String, Tensor>) -> Vec<SectionReport> {
    let names: Vec<String> = weights.keys().cloned().collect();
    let run = || -> Result<(Comparison, Comparison, Comparison)> {
        let (model, vars) = trainable_model(
            &reference.config,
            Some(weights),
            0,
            DType::F32,
            &Device::Cpu,
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

/// Six AdamW steps on the fixed batch from the reference weights: losses, pre-clip gradient
/// norms and the final parameters against open_clip's trajectory.
fn train_section(reference: &Reference) -> SectionReport {
    let extras_json = reference.dir.join("extras.json");
    let extras_st = reference.dir.join("extras.safetensors");
    if !extras_json.exists() || !extras_st.exists() {
        return not_checked("train", "no extras.json / extras.safetensors");
    }
    let tol = Tolerance::Elementwise {
        abs: 1e-4,
        rel: 1e-4,
    };
    let outcome = (|| -> Result<Comparison> {
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&extras_json)?)
            .with_context(|| format!("{} is not JSON", extras_json.display()))?;
        let settings: TrainSettings = serde_json::from_value(json["train"].clone())
            .with_context(|| format!("{}: bad `train` settings", extras_json.display()))?;
        let extras = candle_core::safetensors::load(&extras_st, &Device::Cpu)
            .with_context(|| format!("cannot read {}", extras_st.display()))?;
        let get = |name: &str| {
            extras
                .get(name)
                .with_context(|| format!("extras.safetensors has no tensor {name}"))
        };
        let (model, vars) = trainable_model(
            &reference.config,
            Some(reference.weights.clone()),
            0,
            DType::F32,
            &Device::Cpu,
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
        };
        let groups = TowerGroups::uniform(settings.lr, settings.weight_decay);
        let mut trainer = Trainer::new(model, &vars, &groups, config)?;
        let losses = get("train.losses")?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let norms = get("train.grad_norms")?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let (image, text) = (get("train.image")?, get("train.text")?);
        let mut comparison = Comparison::default();
        for step in 0..settings.steps as usize {
            let loss = trainer.backward(image, text, 1.0)?;
            let report = trainer.update()?;
            let (want_loss, want_norm) = (
                *losses.get(step).context("train.losses is too short")?,
                *norms.get(step).context("train.grad_norms is too short")?,
            );
            comparison.check_scalar_rel(&format!("loss[{step}]"), loss.total, want_loss, 1e-4);
            comparison.check_scalar_rel(
                &format!("grad_norm[{step}]"),
                report.grad_norm,
                want_norm,
                1e-4,
            );
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
