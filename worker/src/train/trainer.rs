//! One optimizer step of CoCa: forward and backward over micro-batches, the gradient reduction
//! over the data-parallel group (ZeRO stage 1 or 2 when sharded), clipping by the true global
//! norm, AdamW over this rank's partition of the flat buffers, and the logit-scale clamp.
//!
//! Without sharding every rank all-reduces the whole gradient and updates everything. With
//! `--sharding stage1` the gradient is still all-reduced, but each sharding rank updates only
//! its [`Partition`] (and holds AdamW moments only for it), then the parameters are
//! all-gathered. `stage2` also partitions the gradient: each micro-batch's gradient is
//! reduce-scattered at once, so between micro-batches and after the reduction a rank keeps only
//! its block. The clipping norm is always the norm of the whole reduced gradient (partial
//! squared norms summed over the sharding group), never a rank's partial view.

use super::adamw::{global_norm, AdamWConfig, FlatAdamW, UpdateSpan};
use super::flat::{FlatParams, GradWrite, GroupRule, Segment};
use super::moments::MOMENT_NAMES;
use super::norm::{clip_range, combine_squares, device_range_squares, segment_squares};
use super::partition::Partition;
use super::schedule::CosineSchedule;
use crate::comm::{Communicator, FlatBuffer, HostTransport, PlacementRule};
use crate::model::group_loss::{coca_group_loss, ContrastiveSpan, LossValues};
use crate::model::{CoCa, CocaLossConfig};
use crate::train::trainable::TrainableWeights;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use coca_common::collective::ReduceOp;
use std::collections::HashMap;
use std::sync::Arc;

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
    /// Where the flat buffers live ([`PlacementRule::Auto`]: host memory for a CPU model).
    pub buffers: PlacementRule,
}

/// ZeRO's stages (`--sharding stage1|stage2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroStage {
    /// Optimizer state partitioned.
    One,
    /// Optimizer state and gradients partitioned.
    Two,
}

/// The process groups a trainer reduces over.
#[derive(Clone)]
pub struct TrainerGroups {
    /// Ranks that read different samples (dp × sharding): the loss spans them and their
    /// gradients are summed.
    pub data: Arc<dyn Communicator>,
    /// Ranks partitioning the optimizer state (a group of one: no sharding).
    pub sharding: Arc<dyn Communicator>,
    /// The ranks holding the same partition in the other data-parallel replicas.
    pub replicas: Arc<dyn Communicator>,
    /// `None`: no sharding (the sharding group must then be a group of one).
    pub stage: Option<ZeroStage>,
}

impl TrainerGroups {
    /// One process.
    pub fn single() -> Self {
        Self::data_parallel(HostTransport::single())
    }

    /// Plain data parallelism over `data`.
    pub fn data_parallel(data: Arc<dyn Communicator>) -> Self {
        Self {
            data,
            sharding: HostTransport::single(),
            replicas: HostTransport::single(),
            stage: None,
        }
    }
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

/// Bytes a rank holds for training, from the real buffers (the memory report of `bench`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TrainerMemory {
    pub parameters: usize,
    /// Gradient kept between micro-batches and after the reduction.
    pub gradients: usize,
    pub optimizer_state: usize,
}

/// The model with its optimizer state.
pub struct Trainer {
    pub model: CoCa,
    params: FlatParams,
    /// The parameters: the 1-D buffer the model's variables are views of (on its device),
    /// updated in place.
    values: Tensor,
    /// Accumulated gradient: the whole buffer, or (stage 2) this rank's reduced block.
    grads: FlatBuffer,
    /// Whether `grads` holds this step's sum so far; when not, its contents are stale and the
    /// next micro-batch writes over them instead of adding (no zero fill between steps).
    grads_held: bool,
    pub optimizer: FlatAdamW,
    config: TrainerConfig,
    /// Offset of `logit_scale` in the flat buffers.
    logit_scale_offset: Option<usize>,
    /// Schedule steps taken (applied or skipped).
    pub step: u64,
    groups: TrainerGroups,
    partition: Partition,
    /// The segments of `partition`, offsets relative to its start.
    owned: Vec<Segment>,
}

impl Trainer {
    /// Wraps a trainable model (from [`crate::train::trainable::trainable_model`]) for one
    /// process.
    pub fn new(
        model: CoCa,
        weights: &TrainableWeights,
        groups: &dyn GroupRule,
        config: TrainerConfig,
    ) -> Result<Self> {
        Self::in_groups(model, weights, groups, config, TrainerGroups::single())
    }

    /// Like [`Self::new`], reducing over `groups`. Every member must start from the same
    /// weights.
    pub fn in_groups(
        model: CoCa,
        weights: &TrainableWeights,
        rule: &dyn GroupRule,
        config: TrainerConfig,
        groups: TrainerGroups,
    ) -> Result<Self> {
        let vars = weights.iter().cloned().collect();
        let params = FlatParams::new(vars, rule)?;
        let placement = config.buffers.placement(model.device());
        let values = weights
            .flat()
            .context("the trainer updates float32 variables that view one flat buffer")?
            .clone();
        params.check_views_of(&values)?;
        let logit_scale_offset = params
            .segments()
            .iter()
            .find(|s| s.name == "logit_scale")
            .map(|s| s.offset);
        let partition = match groups.stage {
            None if groups.sharding.size() > 1 => {
                bail!(
                    "a sharding group of {} needs a ZeRO stage",
                    groups.sharding.size()
                )
            }
            None => Partition::whole(params.len()),
            Some(_) => Partition::new(params.len(), groups.sharding.rank(), groups.sharding.size()),
        };
        let grad_len = match groups.stage {
            Some(ZeroStage::Two) => partition.len(),
            _ => params.len(),
        };
        Ok(Self {
            model,
            grads: FlatBuffer::zeros(grad_len, &placement)?,
            grads_held: false,
            optimizer: FlatAdamW::new(partition.len(), config.adamw, &placement)?,
            values,
            owned: partition.segments(params.segments()),
            partition,
            params,
            config,
            logit_scale_offset,
            step: 0,
            groups,
        })
    }

    /// The flat parameter layout.
    pub fn params(&self) -> &FlatParams {
        &self.params
    }

    /// The block of the flat buffers this rank updates.
    pub fn partition(&self) -> Partition {
        self.partition
    }

    /// Bytes held for parameters, kept gradients and optimizer state.
    pub fn memory(&self) -> TrainerMemory {
        let f32_bytes = std::mem::size_of::<f32>();
        TrainerMemory {
            parameters: self.values.elem_count() * f32_bytes,
            gradients: self.grads.len() * f32_bytes,
            optimizer_state: (self.optimizer.exp_avg.len() + self.optimizer.exp_avg_sq.len())
                * f32_bytes,
        }
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
        let mut loss =
            coca_group_loss(&out, &self.config.loss, self.config.span, &self.groups.data)?;
        // Nothing but the loss's share holds the graph into the backward pass, which then frees
        // each activation once its gradient is passed on (`backward_freeing`): the activations
        // and the gradients are not all alive at once at its end.
        drop(out);
        let detached = loss.share.detach();
        let share = std::mem::replace(&mut loss.share, detached);
        // The backward pass is built (on a GPU: enqueued) before the loss values are read, so
        // the device never waits for the host between the two; a non-finite loss then drops the
        // gradients it gave, on every member alike (the values are global).
        let grads = (share * loss_scale)?.backward_freeing()?;
        let values = loss.values()?;
        if !values.total.is_finite() {
            return Ok(values);
        }
        let write = match self.grads_held {
            true => GradWrite::Add,
            false => GradWrite::Overwrite,
        };
        if self.groups.stage != Some(ZeroStage::Two) {
            self.params
                .accumulate_grads(&grads, &mut self.grads, write)
                .context("accumulating gradients")?;
            self.grads_held = true;
            return Ok(values);
        }
        // Stage 2: reduce this micro-batch's gradient at once and keep only this rank's block.
        let p = self.partition;
        let mut full = FlatBuffer::zeros(p.padded_total(), &self.grads.placement())?;
        self.params
            .accumulate_grads(&grads, &mut full, GradWrite::Overwrite)
            .context("accumulating gradients")?;
        let mut block = self
            .groups
            .sharding
            .reduce_scatter(&full, ReduceOp::Sum)
            .context("reduce-scattering gradients over the sharding group")?;
        drop(full);
        self.groups
            .replicas
            .all_reduce(&mut block, ReduceOp::Sum)
            .context("all-reducing gradient blocks over the data-parallel replicas")?;
        // The last block may be padding past the end of the buffer.
        let block = block.truncated(p.len())?;
        match write {
            GradWrite::Add => self.grads.add_assign(&block)?,
            GradWrite::Overwrite => self.grads.write_at(0, &block)?,
        }
        self.grads_held = true;
        Ok(values)
    }

    /// Discards the accumulated gradients without updating (a micro-batch's loss was not
    /// finite); the schedule still advances.
    pub fn skip_update(&mut self) -> Result<UpdateReport> {
        let report = UpdateReport {
            step: self.step,
            lr_factor: self.config.schedule.factor(self.step),
            grad_norm: f64::NAN,
            applied: false,
        };
        self.step += 1;
        self.grads_held = false;
        Ok(report)
    }

    /// Reduces the accumulated gradients, clips, updates this rank's partition, gathers the
    /// parameters and clamps, then clears the gradients. Non-finite gradients skip the update
    /// on every rank alike (the schedule still advances).
    pub fn update(&mut self) -> Result<UpdateReport> {
        self.update_scaled(1.0, false)
    }

    /// [`Self::update`] for gradients of a loss multiplied by `loss_scale` (float16 loss
    /// scaling): they are divided by it after the reduction, before the norm, the clipping and
    /// the update. `inject_overflow` (a test hook) makes this rank's gradient non-finite first,
    /// as an overflow would; the global norm then skips the step on every rank.
    pub fn update_scaled(
        &mut self,
        loss_scale: f64,
        inject_overflow: bool,
    ) -> Result<UpdateReport> {
        // An update without a backward pass since the last one sees a zero gradient.
        if !self.grads_held {
            self.grads.fill_zero()?;
        }
        if inject_overflow {
            self.grads.set(0, f32::INFINITY)?;
        }
        let p = self.partition;
        // Where this rank's block starts in the gradient buffer.
        let grads_offset = match self.groups.stage {
            Some(ZeroStage::Two) => 0,
            _ => {
                self.groups
                    .data
                    .all_reduce(&mut self.grads, ReduceOp::Sum)
                    .context("all-reducing gradients over the data-parallel group")?;
                p.start
            }
        };
        if loss_scale != 1.0 {
            self.grads.scale(1.0 / loss_scale)?;
        }
        let grad_norm = self.grad_norm(grads_offset)?;
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
                let range = grads_offset..grads_offset + p.len();
                clip_range(&mut self.grads, range, grad_norm, max)?;
            }
            let span = UpdateSpan {
                params_offset: p.start,
                grads_offset,
                segments: &self.owned,
            };
            self.optimizer
                .update(&self.values, &self.grads, span, lr_factor)?;
            if self.groups.sharding.size() > 1 {
                let owned = self.values.narrow(0, p.start, p.len())?;
                let block = FlatBuffer::copied_from(&owned, &self.grads.placement())?;
                let all = self
                    .gather_blocks(block)
                    .context("all-gathering parameters")?;
                all.copy_into(&self.values)?;
            }
            if let Some(i) = self.logit_scale_offset {
                self.clamp_logit_scale(i)?;
            }
        }
        self.grads_held = false;
        Ok(report)
    }

    /// The norm of the whole reduced gradient, from this rank's block at `offset` in the
    /// gradient buffer. Under tensor parallelism a rank holds only its shards' gradients: the
    /// split parameters' squares are also summed over the TP group (plain `global_norm` at
    /// degree 1, bit for bit). Sharded, every block's squared norm is summed over the sharding
    /// group (the true norm, never a rank's partial view).
    fn grad_norm(&self, offset: usize) -> Result<f64> {
        let tp = &self.model.tp;
        let block = offset..offset + self.partition.len();
        let squared = match &self.grads {
            FlatBuffer::Host(g) if tp.is_single() => {
                let norm = global_norm(&g[block]);
                if self.groups.sharding.size() == 1 {
                    return Ok(norm);
                }
                norm * norm
            }
            FlatBuffer::Device(g) if tp.is_single() => {
                let squared = device_range_squares(g, block)?;
                if self.groups.sharding.size() == 1 {
                    return Ok(squared.sqrt());
                }
                squared
            }
            grads => {
                let squares = segment_squares(grads, offset, &self.owned)?;
                combine_squares(&self.owned, &squares, tp)?
            }
        };
        if self.groups.sharding.size() == 1 {
            return Ok(squared.sqrt());
        }
        let mut squares = FlatBuffer::Host(vec![squared as f32]);
        self.groups
            .sharding
            .all_reduce(&mut squares, ReduceOp::Sum)
            .context("summing squared gradient norms over the sharding group")?;
        Ok((squares.to_vec()?[0] as f64).sqrt())
    }

    /// Clamps `logit_scale` (at flat offset `i`) to `[0, ln 100]`, as open_clip does.
    fn clamp_logit_scale(&mut self, i: usize) -> Result<()> {
        let clamped = self.values.narrow(0, i, 1)?.clamp(0f32, LOGIT_SCALE_MAX)?;
        self.values.slice_set(&clamped, 0, i)?;
        Ok(())
    }
}

impl Trainer {
    /// The optimizer's moments as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`), so a
    /// checkpoint does not depend on the flat layout it was saved from. Unsharded trainers only
    /// (a sharded one saves [`Self::optimizer_block`]).
    pub fn optimizer_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        if self.partition.len() != self.params.len() {
            bail!("a sharded trainer saves its optimizer block, not named tensors");
        }
        let mut out = self.named(MOMENT_NAMES[0], &self.optimizer.exp_avg)?;
        out.extend(self.named(MOMENT_NAMES[1], &self.optimizer.exp_avg_sq)?);
        Ok(out)
    }

    /// The moments of every parameter this rank holds as named tensors, all-gathering the
    /// blocks over the sharding group when sharded (every member must call it).
    pub fn gathered_optimizer_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        if self.partition.count == 1 {
            return self.optimizer_tensors();
        }
        let mut out = self.named(
            MOMENT_NAMES[0],
            &self.gather_blocks(self.optimizer.exp_avg.clone())?,
        )?;
        out.extend(self.named(
            MOMENT_NAMES[1],
            &self.gather_blocks(self.optimizer.exp_avg_sq.clone())?,
        )?);
        Ok(out)
    }

    /// `flat` (a whole flat buffer) as one CPU tensor per parameter (for checkpoints), named
    /// `<prefix>.<param>`.
    fn named(&self, prefix: &str, flat: &FlatBuffer) -> Result<Vec<(String, Tensor)>> {
        self.params
            .segments()
            .iter()
            .map(|s| {
                let range = s.offset..s.offset + s.len;
                let t = flat.tensor(range, &s.shape, &Device::Cpu)?;
                Ok((format!("{prefix}.{}", s.name), t.to_device(&Device::Cpu)?))
            })
            .collect()
    }

    /// Every sharding rank's block (this rank's is `owned`) put together: the whole flat buffer.
    fn gather_blocks(&self, owned: FlatBuffer) -> Result<FlatBuffer> {
        let p = self.partition;
        let all = self
            .groups
            .sharding
            .all_gather(&owned.padded(p.block)?)
            .context("all-gathering blocks over the sharding group")?;
        all.truncated(self.params.len())
    }

    /// This rank's block of the moments as 1-D tensors named `exp_avg` and `exp_avg_sq`
    /// (covering flat elements `partition().start..end`).
    pub fn optimizer_block(&self) -> Result<Vec<(String, Tensor)>> {
        MOMENT_NAMES
            .iter()
            .zip([&self.optimizer.exp_avg, &self.optimizer.exp_avg_sq])
            .map(|(name, buffer)| {
                let t = buffer.tensor(0..buffer.len(), &[buffer.len()], &Device::Cpu)?;
                Ok((name.to_string(), t.to_device(&Device::Cpu)?))
            })
            .collect()
    }

    /// Restores moments saved under parameter names (by any layout: each rank copies the part
    /// of every tensor its partition covers) and the step counters.
    pub fn restore_optimizer(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        adam_step: u64,
        schedule_step: u64,
    ) -> Result<()> {
        let p = self.partition;
        for (prefix, buffer) in MOMENT_NAMES
            .iter()
            .zip([&mut self.optimizer.exp_avg, &mut self.optimizer.exp_avg_sq])
        {
            for s in self.params.segments() {
                let (from, to) = (s.offset.max(p.start), (s.offset + s.len).min(p.end));
                if from >= to {
                    continue;
                }
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
                    .narrow(0, from - s.offset, to - from)?
                    .to_vec1::<f32>()?;
                let values = FlatBuffer::from_host(values, &buffer.placement())?;
                buffer.write_at(from - p.start, &values)?;
            }
        }
        self.optimizer.step = adam_step;
        self.step = schedule_step;
        Ok(())
    }
}
