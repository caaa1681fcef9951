//! Setting up one rank's training run: the device, the model (pretrained, resumed or seeded),
//! the trainer over the job's process groups, the data loader at its position, the memory
//! check and the start-up summary. What comes out is a [`TrainingRun`], which the loop in
//! `run.rs` steps.

use super::args::PretrainArgs;
use super::checkpoint::{self, LoadedCheckpoint};
use super::elastic::{self, LoaderLayout};
use super::metrics::RunLog;
use super::model_source::{resolve_model, ResolvedModel, DEMO_MODEL};
use super::preflight::{Checked, TrainData};
use super::skips::EpochSkips;
use super::summary::{StartupSummary, WeightsOrigin};
use crate::comm::PlacementRule;
use crate::data::image_folder::ImageFolder;
use crate::data::loader::{Loader, LoaderPosition};
use crate::data::sampler::DistributedSampler;
use crate::data::tokenizer::ClipTokenizer;
use crate::distributed::context::RankContext;
use crate::distributed::job_groups::JobGroups;
use crate::hub::{Hub, HubEnv, NodeGate};
use crate::memory_estimate::{MemoryEstimate, OpsPath};
use crate::model::group_loss::ContrastiveSpan;
use crate::model::manifest::parameter_count;
use crate::model::tensor_parallel::TensorParallel;
use crate::model::{CocaConfig, CocaLossConfig};
use crate::train::adamw::AdamWConfig;
use crate::train::groups::TowerGroups;
use crate::train::loss_scaler::LossScaler;
use crate::train::moments::shard_moments;
use crate::train::schedule::CosineSchedule;
use crate::train::trainable::{trainable_model_parallel, TrainableWeights};
use crate::train::trainer::{Trainer, TrainerConfig};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use std::path::PathBuf;
use std::sync::Arc;

/// Settings that differ between the built-in demo and a run on real data (the batch is
/// [`Checked::batch`]).
struct Defaults {
    lr: f64,
    weight_decay: f64,
    warmup: u64,
    epochs: f64,
}

fn defaults(demo: bool) -> Defaults {
    if demo {
        Defaults {
            lr: 1e-3,
            weight_decay: 0.1,
            warmup: 50,
            epochs: 1.0,
        }
    } else {
        Defaults {
            lr: 5e-5,
            weight_decay: 0.0,
            warmup: 0,
            epochs: 3.0,
        }
    }
}

/// One rank's run, set up and ready to step: everything the loop, the evaluations and the
/// checkpoints share.
pub(super) struct TrainingRun<'a> {
    pub args: PretrainArgs,
    pub ctx: &'a RankContext,
    pub device: Device,
    pub config: CocaConfig,
    pub tp: TensorParallel,
    /// This rank's trainable weights (its shards under tensor parallelism).
    pub vars: TrainableWeights,
    pub trainer: Trainer,
    /// Declared after the trainer, so it outlives it: its watchdog releases blocked NCCL
    /// collectives.
    pub _job_groups: JobGroups,
    pub loader: Loader,
    pub tokenizer: Arc<ClipTokenizer>,
    /// float16's loss scaler (`None` in other precisions).
    pub scaler: Option<LossScaler>,
    pub log: RunLog,
    /// This rank's memory estimate, for the start-up summary and out-of-memory errors.
    pub memory: MemoryEstimate,
    /// The learning rate before the schedule (the logged rate is this times its factor).
    pub base_lr: f64,
    pub total_steps: u64,
    pub batches_per_epoch: usize,
    /// Micro-batches per optimizer step (`--gradient_accumulation_steps`).
    pub accum: usize,
    pub data_world: usize,
    /// The loader's position after the last batch taken (what a checkpoint resumes from).
    pub position: LoaderPosition,
    pub loader_layout: LoaderLayout,
    /// The flags and derived settings recorded in every checkpoint's `trainer_state.json`.
    pub run_record: serde_json::Value,
    pub eval_folder: Option<ImageFolder>,
    /// The built-in synthetic set: the run ends with the demo report.
    pub is_synthetic: bool,
    /// Bad samples skipped this epoch, reported when it ends, and in all.
    pub skips: EpochSkips,
    pub skipped_total: usize,
    /// Steps in a row whose update was skipped for a non-finite loss or gradient.
    pub nonfinite_in_a_row: u32,
}

impl<'a> TrainingRun<'a> {
    /// Sets up rank `ctx.rank` for `args`, whose data and model `checked` has already read.
    pub fn set_up(args: &PretrainArgs, ctx: &'a RankContext, checked: Checked) -> Result<Self> {
        let args = args.clone();
        let device = args.device.open()?;
        let data_world = ctx.topology.data_world();
        let d = defaults(checked.is_demo(&args));
        let batch = checked.batch(&args);
        let Checked {
            config: _,
            data,
            eval_folder,
        } = checked;
        let hub = Hub::new(HubEnv::from_env(), NodeGate::for_rank(ctx)?);
        let ResolvedModel {
            config,
            weights,
            origin,
        } = resolve_model(&args, &hub)?;
        let memory = crate::memory_estimate::estimate(
            &config,
            args.tensor_parallel_degree,
            args.sharding_parallel_degree,
            args.zero_stage()?,
            batch,
            args.grad_checkpointing,
            args.precision.compute_dtype(),
            OpsPath::for_device(&device),
        )?;
        crate::cuda_setup::check_fits(&device, &memory)?;
        crate::cuda_setup::check_precision(&device, args.precision.compute_dtype())?;
        let accum = args.gradient_accumulation_steps;

        let resumed = match resume_dir(&args, ctx)? {
            Some(dir) => Some(checkpoint::load(&dir, &config)?),
            None => None,
        };
        let weights_origin = match (&resumed, weights.is_some()) {
            (Some(c), _) => WeightsOrigin::Resumed {
                dir: c.dir.display().to_string(),
                step: c.state.global_step,
            },
            (None, true) => WeightsOrigin::Loaded { from: origin },
            (None, false) => WeightsOrigin::Random { seed: args.seed },
        };
        let initial = match &resumed {
            Some(c) => Some(c.weights.clone()),
            None => weights,
        };
        // The communicators first: the model's tensor-parallel layers hold theirs.
        let job_groups = JobGroups::for_device(ctx, &device)?;
        tracing::info!(backend = job_groups.backend, "collectives");
        let tp = TensorParallel::new(ctx.tensor.clone())
            .with_communicator(job_groups.tensor().clone())
            .with_autocast(args.precision.autocast());
        tp.check(&config)
            .context("--tensor_parallel_degree does not fit the model")?;
        // Full weights (pretrained or resumed) are sliced to this rank's shards.
        let (mut model, vars) =
            trainable_model_parallel(&config, initial, args.seed, DType::F32, &device, &tp)?;
        model.set_grad_checkpointing(args.grad_checkpointing);
        let groups = TowerGroups {
            lr: args.learning_rate.unwrap_or(d.lr),
            weight_decay: args.weight_decay.unwrap_or(d.weight_decay),
            visual_lr: args.visual_lr,
            visual_wd: args.visual_wd,
            text_lr: args.text_lr,
            text_wd: args.text_wd,
        };
        let TrainData {
            source,
            synthetic: is_synthetic,
            per_rank,
            description: data_description,
        } = data;
        // A per-rank source is this rank's whole share; otherwise the rank takes its slice of
        // each global batch, so that the global batches are the same whatever the world size.
        let sampler = if per_rank {
            DistributedSampler::new(source.len(), args.seed, batch, 0, 1)?
        } else {
            let data_rank = ctx.topology.data_rank(ctx.rank)?;
            DistributedSampler::new(source.len(), args.seed, batch, data_rank, data_world)?
        };
        let loader_layout = LoaderLayout {
            samples_per_batch: sampler.global_batch,
            data_world,
            per_rank_source: per_rank,
        };
        let batches_per_epoch = sampler.batches_per_epoch();
        let steps_per_epoch = (epoch_batches(ctx, per_rank, batches_per_epoch)? / accum).max(1);
        let total_steps = match args.max_steps {
            Some(s) if s > 0 => s as u64,
            _ => (args.num_train_epochs.unwrap_or(d.epochs) * steps_per_epoch as f64).ceil() as u64,
        };
        let trainer_config = trainer_config(&args, &config, &d, total_steps)?;
        let trainer_groups = job_groups.trainer_groups(args.zero_stage()?);
        let mut trainer =
            Trainer::in_groups(model, &vars, &groups, trainer_config, trainer_groups)?;
        let mut position = LoaderPosition::default();
        let mut scaler = args.precision.loss_scaler();
        if let Some(c) = &resumed {
            position = resume(&mut trainer, &mut scaler, c, &tp, &loader_layout)?;
        }
        let tokenizer = Arc::new(ClipTokenizer::new()?);
        let (tok, text_len) = (tokenizer.clone(), config.text_cfg.context_length);
        let loader = Loader::new(
            source.clone(),
            sampler,
            Arc::new(move |caption: &str| tok.tokenize(caption, text_len)),
            args.dataloader_num_workers,
            position,
            &device,
        )?;
        let run_record = serde_json::json!({
            "args": &args,
            "per_device_train_batch_size": batch,
            "total_steps": total_steps,
            "learning_rate": groups.lr,
            "weight_decay": groups.weight_decay,
            "warmup_steps": trainer_config.schedule.warmup_steps,
        });
        let log = if ctx.is_main() {
            let log = RunLog::new(
                &args.output_dir,
                trainer.step,
                total_steps,
                args.disable_tqdm,
            )?;
            let t = &ctx.topology;
            let summary = StartupSummary {
                model: args.model.as_deref().unwrap_or(DEMO_MODEL).to_string(),
                parameters: parameter_count(&config)?,
                weights: weights_origin,
                data: data_description,
                samples: source.len(),
                samples_per_rank: per_rank,
                world: t.world,
                dp: t.dp,
                sharding: t.sharding,
                zero_stage: match args.zero_stage()? {
                    Some(_) => args.sharding.trim().to_ascii_lowercase(),
                    None => String::new(),
                },
                tp: t.tp,
                per_device_batch: batch,
                accumulation: accum,
                global_batch: batch * data_world * accum,
                start_step: trainer.step,
                total_steps,
                steps_per_epoch,
                precision: args.precision.describe(),
                grad_checkpointing: args.grad_checkpointing,
                memory,
                output_dir: args.output_dir.display().to_string(),
            };
            log.println(summary.to_string());
            log
        } else {
            RunLog::lines_only(&args.output_dir, trainer.step, total_steps)?
        };
        Ok(Self {
            ctx,
            device,
            config,
            tp,
            vars,
            trainer,
            _job_groups: job_groups,
            loader,
            tokenizer,
            scaler,
            log,
            memory,
            base_lr: groups.lr,
            total_steps,
            batches_per_epoch,
            accum,
            data_world,
            position,
            loader_layout,
            run_record,
            eval_folder,
            is_synthetic,
            skips: EpochSkips::new(position.epoch),
            skipped_total: 0,
            nonfinite_in_a_row: 0,
            args,
        })
    }
}

/// The newest checkpoint to resume from: after a restart (generation > 0) the newest in
/// `--output_dir`, whatever `--resume_from_checkpoint` said; otherwise that flag.
fn resume_dir(args: &PretrainArgs, ctx: &RankContext) -> Result<Option<PathBuf>> {
    if ctx.generation > 0 {
        if let Some((_, dir)) = checkpoint::list_checkpoints(&args.output_dir)?.pop() {
            eprintln!(
                "restart {}: resuming from the newest checkpoint {}",
                ctx.generation,
                dir.display()
            );
            return Ok(Some(dir));
        }
    }
    match &args.resume_from_checkpoint {
        Some(v) => checkpoint::resolve_resume(v, &args.output_dir),
        None => Ok(None),
    }
}

/// Batches in an epoch for every rank: ranks holding different shares of a per-rank source
/// agree on the shortest epoch, so they take the same steps.
fn epoch_batches(ctx: &RankContext, per_rank: bool, batches_per_epoch: usize) -> Result<usize> {
    if !per_rank {
        return Ok(batches_per_epoch);
    }
    let mut all = vec![0f32; ctx.data.size()];
    ctx.data
        .all_gather(&[batches_per_epoch as f32], &mut all)
        .context("agreeing on the epoch length")?;
    Ok(all.into_iter().fold(f32::MAX, f32::min) as usize)
}

/// Restores the optimizer (this rank's shards of the moments), the loss scale and the
/// loader's position from `c`; returns the position.
fn resume(
    trainer: &mut Trainer,
    scaler: &mut Option<LossScaler>,
    c: &LoadedCheckpoint,
    tp: &TensorParallel,
    layout: &LoaderLayout,
) -> Result<LoaderPosition> {
    let moments = shard_moments(&c.optimizer, tp)?;
    trainer.restore_optimizer(&moments, c.state.adam_step, c.state.global_step)?;
    if let Some(s) = c.state.loss_scaler {
        *scaler = Some(s);
    }
    let position = elastic::resume_position(&c.state, layout)?;
    eprintln!(
        "resuming from {} at step {}",
        c.dir.display(),
        c.state.global_step
    );
    Ok(position)
}

/// The trainer's settings from the flags (the demo's or the real data's defaults where a flag
/// is absent).
fn trainer_config(
    args: &PretrainArgs,
    config: &CocaConfig,
    d: &Defaults,
    total_steps: u64,
) -> Result<TrainerConfig> {
    Ok(TrainerConfig {
        adamw: AdamWConfig {
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
        },
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        schedule: CosineSchedule {
            warmup_steps: args.warmup_steps.unwrap_or(d.warmup),
            total_steps,
        },
        loss: CocaLossConfig {
            contrastive_weight: args.coca_contrastive_loss_weight,
            caption_weight: args.coca_caption_loss_weight,
            pad_id: config.text_cfg.pad_id,
        },
        span: ContrastiveSpan {
            local_loss: args.local_loss,
            gather_with_grad: args.gather_with_grad,
        },
        buffers: PlacementRule::from_env()?,
    })
}
