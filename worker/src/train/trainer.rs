//! One optimizer step of CoCa: forward and backward over micro-batches, gradient clipping,
//! AdamW over flat buffers, and the logit-scale clamp.

use super::adamw::{clip_to_norm, AdamWConfig, FlatAdamW};
use super::flat::{FlatParams, GroupRule};
use super::schedule::CosineSchedule;
use crate::distributed::loss::{coca_group_loss, ContrastiveSpan, LossValues};
use crate::distributed::tensor_parallel::global_grad_norm;
use crate::model::trainable::TrainableWeights;
use crate::model::{CoCa, CocaLossConfig};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use coca_common::collective::{Collective, ReduceOp, SingleProcess};
use std::collections::HashMap;
use std::sync::Arc;

/// Gradients are all-reduced in buckets of this many elements (64 MiB of f32), which bounds
/// the transport's buffers without costing bandwidth.
const GRAD_BUCKET: usize = 16 << 20;

/// `logit_scale` is clamped to `[0, ln 100]` after every update, as open_clip does.
pub const LOGIT_SCALE_MAX: f32 = 4.605_170_2;

/// Everything that decides an update besides the data.
#[derive(Debug, Clone, Copy)]
pub struct TrainerConfig {
    pub adamw: AdamWConfig,
    /// Global-norm clipping threshold; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
    pub schedule: CosineSchedule,
    pub loss: CocaLossConfig,
    pub span: ContrastiveSpan,
}

/// What one update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateReport {
    /// Schedule step this update used (0-based).
    pub step: u64,
    /// The learning-rate factor of the schedule (multiply by a group's base rate).
    pub lr_factor: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// `false` when the gradients were not finite and the update was skipped.
    pub applied: bool,
}

/// The model with its optimizer state.
pub struct Trainer {
    pub model: CoCa,
    params: FlatParams,
    values: Vec<f32>,
    grads: Vec<f32>,
    pub optimizer: FlatAdamW,
    config: TrainerConfig,
    /// Offset of `logit_scale` in the flat buffers.
    logit_scale_offset: Option<usize>,
    /// Schedule steps taken (applied or skipped).
    pub step: u64,
    /// The ranks that read different samples and reduce gradients together.
    data_group: Arc<dyn Collective>,
}

impl Trainer {
    /// Wraps a trainable model (from [`crate::model::trainable::trainable_model`]) for one
    /// process.
    pub fn new(
        model: CoCa,
        weights: &TrainableWeights,
        groups: &dyn GroupRule,
        config: TrainerConfig,
    ) -> Result<Self> {
        Self::in_group(model, weights, groups, config, Arc::new(SingleProcess))
    }

    /// Like [`Self::new`], reducing gradients over `data_group`. Every member must start from
    /// the same weights.
    pub fn in_group(
        model: CoCa,
        weights: &TrainableWeights,
        groups: &dyn GroupRule,
        config: TrainerConfig,
        data_group: Arc<dyn Collective>,
    ) -> Result<Self> {
        let vars = weights.iter().cloned().collect();
        let params = FlatParams::new(vars, groups)?;
        let values = params.gather_values()?;
        let logit_scale_offset = params
            .segments()
            .iter()
            .find(|s| s.name == "logit_scale")
            .map(|s| s.offset);
        Ok(Self {
            model,
            grads: vec![0.0; params.len()],
            optimizer: FlatAdamW::new(params.len(), config.adamw),
            values,
            params,
            config,
            logit_scale_offset,
            step: 0,
            data_group,
        })
    }

    /// The flat parameter layout.
    pub fn params(&self) -> &FlatParams {
        &self.params
    }

    /// Forward and backward on this member's part of one micro-batch; the gradients of its share
    /// of the loss · `loss_scale` are added to the accumulated gradients. Returns the global
    /// loss (the same on every member); a non-finite one adds nothing, on every member alike.
    pub fn backward(
        &mut self,
        images: &Tensor,
        text: &Tensor,
        loss_scale: f64,
    ) -> Result<LossValues> {
        let out = self.model.forward(images, text)?;
        let loss = coca_group_loss(&out, &self.config.loss, self.config.span, &self.data_group)?;
        let values = loss.values;
        if values.total.is_finite() {
            let grads = (loss.share * loss_scale)?.backward()?;
            self.params
                .accumulate_grads(&grads, &mut self.grads)
                .context("accumulating gradients")?;
        }
        Ok(values)
    }

    /// Discards the accumulated gradients without updating (a micro-batch's loss was not
    /// finite); the schedule still advances.
    pub fn skip_update(&mut self) -> UpdateReport {
        let report = UpdateReport {
            step: self.step,
            lr_factor: self.config.schedule.factor(self.step),
            grad_norm: f64::NAN,
            applied: false,
        };
        self.step += 1;
        self.grads.iter_mut().for_each(|g| *g = 0.0);
        report
    }

    /// Clips, updates and clamps from the accumulated gradients, then clears them. Non-finite
    /// gradients skip the update (the schedule still advances).
    pub fn update(&mut self) -> Result<UpdateReport> {
        for bucket in self.grads.chunks_mut(GRAD_BUCKET) {
            self.data_group
                .all_reduce(bucket, ReduceOp::Sum)
                .context("all-reducing gradients over the data-parallel group")?;
        }
        // Under tensor parallelism each member holds only its shards' gradients: the norm sums
        // them over the TP group (`global_norm` at degree 1, bit for bit).
        let grad_norm = global_grad_norm(&self.grads, self.params.segments(), &self.model.tp)?;
        let lr_factor = self.config.schedule.factor(self.step);
        let report = UpdateReport {
            step: self.step,
            lr_factor,
            grad_norm,
            applied: grad_norm.is_finite(),
        };
        self.step += 1;
        if report.applied {
            if let Some(max) = self.config.max_grad_norm {
                clip_to_norm(&mut self.grads, grad_norm, max);
            }
            self.optimizer.update(
                &mut self.values,
                &self.grads,
                self.params.segments(),
                lr_factor,
            );
            if let Some(i) = self.logit_scale_offset {
                self.values[i] = self.values[i].clamp(0.0, LOGIT_SCALE_MAX);
            }
            self.params.scatter_values(&self.values)?;
        }
        self.grads.iter_mut().for_each(|g| *g = 0.0);
        Ok(report)
    }
}

/// Names of the two AdamW moment buffers in saved optimizer state (`exp_avg.<param>`, ...).
pub const MOMENT_NAMES: [&str; 2] = ["exp_avg", "exp_avg_sq"];

impl Trainer {
    /// The optimizer's moments as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`), so a
    /// checkpoint does not depend on the flat layout it was saved from.
    pub fn optimizer_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.params.segments().len());
        for (prefix, buffer) in MOMENT_NAMES
            .iter()
            .zip([&self.optimizer.exp_avg, &self.optimizer.exp_avg_sq])
        {
            for s in self.params.segments() {
                let values = &buffer[s.offset..s.offset + s.len];
                let t = Tensor::from_slice(values, s.shape.as_slice(), &Device::Cpu)?;
                out.push((format!("{prefix}.{}", s.name), t));
            }
        }
        Ok(out)
    }

    /// Restores the moments saved by [`Self::optimizer_tensors`] and the step counters.
    pub fn restore_optimizer(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        adam_step: u64,
        schedule_step: u64,
    ) -> Result<()> {
        for (prefix, buffer) in MOMENT_NAMES
            .iter()
            .zip([&mut self.optimizer.exp_avg, &mut self.optimizer.exp_avg_sq])
        {
            for s in self.params.segments() {
                let name = format!("{prefix}.{}", s.name);
                let t = tensors
                    .get(&name)
                    .with_context(|| format!("optimizer state has no {name}"))?;
                if t.dims() != s.shape.as_slice() {
                    bail!(
                        "optimizer state {name} has shape {:?}, expected {:?}",
                        t.dims(),
                        s.shape
                    );
                }
                let values = t
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                buffer[s.offset..s.offset + s.len].copy_from_slice(&values);
            }
        }
        self.optimizer.step = adam_step;
        self.step = schedule_step;
        Ok(())
    }
}
