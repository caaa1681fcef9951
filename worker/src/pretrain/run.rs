//! The training loop of `coca-worker pretrain`, one rank of a data-parallel job (or a job of
//! one). Every rank trains; rank 0 alone writes checkpoints, metrics, evaluations and the demo
//! report (the weights are identical on every rank).

use super::args::PretrainArgs;
use super::checkpoint::{self, TrainerState};
use super::demo;
use super::elastic::{self, LoaderLayout};
use super::metrics::{RunLog, StepMetrics};
use super::model_source::{resolve_model, ResolvedModel, DEMO_MODEL};
use super::preemption::Preemption;
use super::preflight::{self, Checked, TrainData};
use super::rank_checkpoint;
use super::summary::{StartupSummary, WeightsOrigin};
use crate::comm::peer_failure::PeerFailed;
use crate::comm::PlacementRule;
use crate::data::loader::{Loader, LoaderPosition};
use crate::data::sampler::DistributedSampler;
use crate::data::tokenizer::ClipTokenizer;
use crate::distributed::context::{env_world_rank, RankContext};
use crate::distributed::job_groups::JobGroups;
use crate::eval::classification::{evaluate, paddlemix_classifier_file, ImageBatches};
use crate::hub::{Hub, HubEnv, NodeGate};
use crate::model::group_loss::ContrastiveSpan;
use crate::model::manifest::parameter_count;
use crate::model::tensor_parallel::{gather_state_dict, TensorParallel};
use crate::model::trainable::trainable_model_parallel;
use crate::model::{CoCa, CocaLossConfig};
use crate::train::adamw::AdamWConfig;
use crate::train::groups::TowerGroups;
use crate::train::loss_scaler::LossScaler;
use crate::train::moments::shard_moments;
use crate::train::schedule::CosineSchedule;
use crate::train::trainer::{Trainer, TrainerConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Samples in the built-in synthetic training set.
pub const SYNTHETIC_TRAIN_LEN: usize = 20_000;
/// Non-finite steps in a row after which training stops.
const MAX_NONFINITE_IN_A_ROW: u32 = 10;

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

/// How a `pretrain` run ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Every step was taken.
    Completed,
    /// The job was asked to stop (the checkpoint signal, SIGTERM): every rank saved its part of
    /// this checkpoint and stopped (exit code [`coca_common::preempt::EXIT_PREEMPTED`]).
    Preempted(coca_common::preempt::Decision),
}

/// Runs `pretrain` as the rank the launcher's environment describes (or alone).
pub fn run(mut args: PretrainArgs) -> Result<Ended> {
    // First: a checkpoint signal during the slow start must not kill the worker.
    let preemption = Preemption::listen()?;
    elastic::apply_launcher_batch(&mut args, |k| std::env::var(k).ok())?;
    let (world, rank) = env_world_rank()?;
    let checked = preflight::check(&args, world, rank)?;
    let ctx = RankContext::from_env(args.tensor_parallel_degree, args.sharding_parallel_degree)?;
    let result = match train(&args, &ctx, checked, &preemption) {
        Err(e) if ctx.peer_failed(PEER_VERDICT_WAIT) => Err(e.context(PeerFailed)),
        other => other,
    };
    preemption.detach();
    result
}

/// How long a rank whose collective failed waits to learn whether another rank failed first.
const PEER_VERDICT_WAIT: Duration = Duration::from_secs(3);

/// The newest checkpoint to resume from: after a restart (generation > 0) the newest in
/// `--output_dir`, whatever `--resume_from_checkpoint` said; otherwise that flag.
fn resume_dir(args: &PretrainArgs, ctx: &RankContext) -> Result<Option<std::path::PathBuf>> {
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

/// Trains as rank `ctx.rank`.
fn train(
    args: &PretrainArgs,
    ctx: &RankContext,
    checked: Checked,
    preemption: &Preemption,
) -> Result<Ended> {
    let args = args.clone();
    let device = args.device.open()?;
    let data_rank = ctx.topology.data_rank(ctx.rank)?;
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
    let weights_loaded = weights.is_some();
    let memory = crate::memory_estimate::estimate(
        &config,
        args.tensor_parallel_degree,
        args.sharding_parallel_degree,
        args.zero_stage()?,
        batch,
        args.grad_checkpointing,
        args.precision.compute_dtype(),
    )?;
    crate::cuda_setup::check_fits(&device, &memory)?;
    crate::cuda_setup::check_precision(&device, args.precision.compute_dtype())?;
    let TrainData {
        source,
        synthetic: is_synthetic,
        per_rank,
        description: data_description,
    } = data;
    let accum = args.gradient_accumulation_steps;
    let tokenizer = Arc::new(ClipTokenizer::new()?);
    let text_len = config.text_cfg.context_length;

    let resume = resume_dir(&args, ctx)?;
    let resumed = match &resume {
        Some(dir) => Some(checkpoint::load(dir, &config)?),
        None => None,
    };
    let initial = match &resumed {
        Some(c) => Some(c.weights.clone()),
        None => weights,
    };
    let tp = TensorParallel::new(ctx.tensor.clone()).with_autocast(args.precision.autocast());
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
    // A per-rank source is this rank's whole share; otherwise the rank takes its slice of each
    // global batch, so that the global batches are the same whatever the world size.
    let sampler = if per_rank {
        DistributedSampler::new(source.len(), args.seed, batch, 0, 1)?
    } else {
        DistributedSampler::new(source.len(), args.seed, batch, data_rank, data_world)?
    };
    let loader_layout = LoaderLayout {
        samples_per_batch: sampler.global_batch,
        data_world,
        per_rank_source: per_rank,
    };
    let batches_per_epoch = sampler.batches_per_epoch();
    // Ranks holding different shares agree on the shortest epoch, so they take the same steps.
    let steps_batches = if per_rank {
        let mut all = vec![0f32; ctx.data.size()];
        ctx.data
            .all_gather(&[batches_per_epoch as f32], &mut all)
            .context("agreeing on the epoch length")?;
        all.into_iter().fold(f32::MAX, f32::min) as usize
    } else {
        batches_per_epoch
    };
    let steps_per_epoch = (steps_batches / accum).max(1);
    let total_steps = match args.max_steps {
        Some(s) if s > 0 => s as u64,
        _ => (args.num_train_epochs.unwrap_or(d.epochs) * steps_per_epoch as f64).ceil() as u64,
    };
    let trainer_config = TrainerConfig {
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
    };
    // Kept alive as long as the trainer: its watchdog releases blocked NCCL collectives.
    let job_groups = JobGroups::for_device(ctx, &device)?;
    tracing::info!(backend = job_groups.backend, "gradient collectives");
    let trainer_groups = job_groups.trainer_groups(args.zero_stage()?);
    let mut trainer = Trainer::in_groups(model, &vars, &groups, trainer_config, trainer_groups)?;
    let mut position = LoaderPosition::default();
    let mut scaler = args.precision.loss_scaler();
    if let Some(c) = &resumed {
        let moments = shard_moments(&c.optimizer, &tp)?;
        trainer.restore_optimizer(&moments, c.state.adam_step, c.state.global_step)?;
        position = elastic::resume_position(&c.state, &loader_layout)?;
        if let Some(s) = c.state.loss_scaler {
            scaler = Some(s);
        }
        eprintln!(
            "resuming from {} at step {}",
            c.dir.display(),
            c.state.global_step
        );
    }
    let tok = tokenizer.clone();
    let mut loader = Loader::new(
        source.clone(),
        sampler,
        Arc::new(move |caption: &str| tok.tokenize(caption, text_len)),
        args.dataloader_num_workers,
        position,
    )?;
    let run_record = serde_json::json!({
        "args": &args,
        "per_device_train_batch_size": batch,
        "total_steps": total_steps,
        "learning_rate": groups.lr,
        "weight_decay": groups.weight_decay,
        "warmup_steps": trainer_config.schedule.warmup_steps,
    });
    let zero_shot = |log: &mut RunLog, step: u64| -> Result<()> {
        let Some(folder) = &eval_folder else {
            return Ok(());
        };
        // The current weights, detached: evaluation records no graph. The classifier is rebuilt
        // every time: the weights change every step (the seed's frozen cache goes stale).
        let weights: HashMap<String, Tensor> = vars.tensors().into_iter().collect();
        let model = CoCa::new_parallel(
            &config,
            VarBuilder::from_tensors(weights, DType::F32, &device),
            &tp,
        )?;
        // With --pretrained_text_model the classifier is written where PaddleMIX keeps it,
        // keyed by the step (so it is never taken for another step's).
        let cache = match (&args.pretrained_text_model, &args.classification_eval) {
            (Some(name), Some(dir)) => {
                Some(args.output_dir.join(paddlemix_classifier_file(name, dir)))
            }
            _ => None,
        };
        let result = evaluate(
            &model,
            &format!("training-step-{step}"),
            folder,
            cache.as_deref(),
            ImageBatches {
                batch_size: args.per_device_eval_batch_size,
                decode_threads: args.dataloader_num_workers,
                progress: !args.disable_tqdm,
            },
            &ctx.data,
        )?;
        log.log_eval(step, &result)
    };
    let mut log = if ctx.is_main() {
        RunLog::new(
            &args.output_dir,
            trainer.step,
            total_steps,
            args.disable_tqdm,
        )?
    } else {
        RunLog::lines_only(&args.output_dir, trainer.step, total_steps)?
    };
    if ctx.is_main() {
        let weights = match (&resumed, weights_loaded) {
            (Some(c), _) => WeightsOrigin::Resumed {
                dir: c.dir.display().to_string(),
                step: c.state.global_step,
            },
            (None, true) => WeightsOrigin::Loaded { from: origin },
            (None, false) => WeightsOrigin::Random { seed: args.seed },
        };
        let t = &ctx.topology;
        let summary = StartupSummary {
            model: args.model.as_deref().unwrap_or(DEMO_MODEL).to_string(),
            parameters: parameter_count(&config)?,
            weights,
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
    }
    let image_size = config.vision_cfg.image_size;
    let mut nonfinite_in_a_row = 0;
    let mut skipped_total = 0usize;
    let mut skips = EpochSkips::new(position.epoch);
    let save = |trainer: &Trainer,
                position: LoaderPosition,
                loss_scaler: Option<LossScaler>|
     -> Result<()> {
        let state = TrainerState {
            loss_scaler,
            format_version: 1,
            global_step: trainer.step,
            adam_step: trainer.optimizer.step,
            loader_position: position,
            loader_layout: Some(loader_layout),
            model_config: config.clone(),
            run: run_record.clone(),
        };
        rank_checkpoint::save(
            ctx,
            &tp,
            &args.output_dir,
            &state,
            trainer,
            &vars,
            args.save_total_limit,
        )
    };
    preemption.attach(ctx, &args.output_dir, trainer.step)?;
    while trainer.step < total_steps {
        let started = Instant::now();
        let (mut sums, mut samples, mut finite) = ([0f64; 3], 0usize, true);
        for _ in 0..accum {
            let b = loader.next_batch()?;
            if b.position.epoch != skips.epoch {
                skips.report(&log);
                skips = EpochSkips::new(b.position.epoch);
            }
            skipped_total += b.skipped.len();
            skips.add(b.skipped);
            position = next_position(b.position, batches_per_epoch);
            if b.len == 0 {
                continue;
            }
            let images = Tensor::from_vec(b.images, (b.len, 3, image_size, image_size), &device)?;
            let text = Tensor::from_vec(b.tokens, (b.len, text_len), &device)?;
            let loss_scale = scaler.map_or(1.0, |s| s.scale);
            let loss = trainer
                .backward(&images, &text, loss_scale / accum as f64)
                .map_err(|e| step_error(e, trainer.step, b.len, &memory))?;
            finite &= loss.total.is_finite();
            sums[0] += loss.total / accum as f64;
            sums[1] += loss.contrastive / accum as f64;
            sums[2] += loss.caption / accum as f64;
            samples += b.len;
        }
        let report = if finite {
            let inject = args.precision.fp16_inject_overflow_step == Some(trainer.step);
            let step = trainer.step;
            trainer
                .update_scaled(scaler.map_or(1.0, |s| s.scale), inject)
                .map_err(|e| step_error(e, step, samples, &memory))?
        } else {
            trainer.skip_update()?
        };
        if let Some(s) = scaler.as_mut() {
            let before = s.scale;
            s.update(report.applied);
            if s.scale != before {
                log.println(format!(
                    "step {}: loss scale {before} -> {}",
                    report.step + 1,
                    s.scale
                ));
            }
        }
        // A float16 overflow (finite loss, non-finite gradients) is the loss scaler's business.
        let overflow = finite && scaler.is_some();
        if !report.applied && !overflow {
            nonfinite_in_a_row += 1;
            log.println(format!(
                "warning: step {}: non-finite loss or gradient, update skipped ({nonfinite_in_a_row} in a row)",
                report.step + 1
            ));
            if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW {
                bail!(
                    "{MAX_NONFINITE_IN_A_ROW} non-finite steps in a row at step {}: stopping",
                    report.step + 1
                );
            }
        } else if report.applied {
            nonfinite_in_a_row = 0;
        }
        let metrics = StepMetrics {
            step: trainer.step,
            epoch: (position.epoch as f64) + position.batch as f64 / batches_per_epoch as f64,
            loss: sums[0],
            contrastive_loss: sums[1],
            caption_loss: sums[2],
            learning_rate: groups.lr * report.lr_factor,
            grad_norm: report.grad_norm,
            samples_per_s: (samples * data_world) as f64 / started.elapsed().as_secs_f64(),
            skipped_samples: skipped_total,
        };
        log.step(&metrics);
        if trainer.step % args.logging_steps.max(1) == 0 || trainer.step == total_steps {
            log.log(&metrics)?;
        }
        if trainer.step < total_steps {
            if let Some(decision) = preemption.at_boundary(trainer.step)? {
                skips.report(&log);
                let saving = Instant::now();
                save(&trainer, position, scaler)?;
                log.println(format!(
                    "rank {}: preempted at step {}, checkpoint {} (its part saved in {:.2} s)",
                    ctx.rank,
                    decision.step,
                    decision.checkpoint,
                    saving.elapsed().as_secs_f64()
                ));
                return Ok(Ended::Preempted(decision));
            }
        }
        if let Some(every) = args.eval_steps {
            if trainer.step % every == 0 && trainer.step < total_steps {
                zero_shot(&mut log, trainer.step)?;
            }
        }
        if args.save_steps > 0 && trainer.step % args.save_steps == 0 && trainer.step < total_steps
        {
            save(&trainer, position, scaler)?;
        }
    }
    skips.report(&log);
    zero_shot(&mut log, trainer.step)?;
    save(&trainer, position, scaler)?;
    log.finish(&args.output_dir.join("loss_curve.png"))?;
    if skipped_total > 0 {
        eprintln!("{skipped_total} samples were skipped in all (see the epoch reports above)");
    }
    if is_synthetic {
        drop(loader);
        // Generation runs on one unsplit model: tensor-parallel ranks gather the weights first.
        let full = if tp.is_single() {
            None
        } else {
            let local: HashMap<String, Tensor> = vars.tensors().into_iter().collect();
            let full = gather_state_dict(&local, &config, tp.group().as_ref())?;
            Some(CoCa::new(
                &config,
                VarBuilder::from_tensors(full, DType::F32, &device),
            )?)
        };
        if !ctx.is_main() {
            return Ok(Ended::Completed);
        }
        demo::report(
            full.as_ref().unwrap_or(&trainer.model),
            &tokenizer,
            args.seed,
            &config,
            &args.output_dir,
        )?;
    }
    Ok(Ended::Completed)
}

/// The position after `p`.
fn next_position(p: LoaderPosition, batches_per_epoch: usize) -> LoaderPosition {
    if p.batch + 1 >= batches_per_epoch {
        LoaderPosition {
            epoch: p.epoch + 1,
            batch: 0,
        }
    } else {
        LoaderPosition {
            epoch: p.epoch,
            batch: p.batch + 1,
        }
    }
}

/// Reasons listed in an epoch's report before the rest are counted.
const SKIPS_LISTED: usize = 20;

/// Samples skipped during one epoch, reported (with file and line) when the epoch ends.
struct EpochSkips {
    epoch: u64,
    reasons: Vec<String>,
}

impl EpochSkips {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            reasons: Vec::new(),
        }
    }

    fn add(&mut self, reasons: Vec<String>) {
        for r in &reasons {
            tracing::debug!("skipped {r}");
        }
        self.reasons.extend(reasons);
    }

    fn report(&self, log: &RunLog) {
        if self.reasons.is_empty() {
            return;
        }
        log.println(format!(
            "epoch {}: {} sample(s) skipped:",
            self.epoch,
            self.reasons.len()
        ));
        for r in self.reasons.iter().take(SKIPS_LISTED) {
            log.println(format!("  {r}"));
        }
        if self.reasons.len() > SKIPS_LISTED {
            log.println(format!(
                "  ... and {} more",
                self.reasons.len() - SKIPS_LISTED
            ));
        }
    }
}

/// A training step's error with the step and the micro-batch named; an out-of-memory (the
/// host's or a GPU's) also gets the per-rank estimate and what lowers it. The last checkpoint
/// is untouched: checkpoints are written atomically between steps.
fn step_error(
    e: impl Into<anyhow::Error>,
    step: u64,
    samples: usize,
    memory: &crate::memory_estimate::MemoryEstimate,
) -> anyhow::Error {
    let e = e.into();
    let text = format!("{e:#}");
    let out_of_memory = text.contains("OUT_OF_MEMORY")
        || text.contains("out of memory")
        || text.contains("memory allocation");
    let what = format!(
        "training step {} ({samples} samples on this rank)",
        step + 1
    );
    if out_of_memory {
        e.context(format!(
            "{what} ran out of memory; this rank's estimate: {}. Lower \
             --per_device_train_batch_size, add --grad_checkpointing True or --bf16 True, or \
             raise --sharding_parallel_degree or --tensor_parallel_degree",
            memory.by_part()
        ))
    } else {
        e.context(what)
    }
}

#[cfg(test)]
mod step_error_tests {
    use super::*;

    #[test]
    fn an_out_of_memory_names_the_step_the_estimate_and_the_remedies() {
        let config = crate::model::CocaConfig::resolve("coca_ViT-B-32").unwrap();
        let memory =
            crate::memory_estimate::estimate(&config, 1, 1, None, 8, false, DType::F32).unwrap();
        let oom = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        let text = format!("{:#}", step_error(oom, 2, 8, &memory));
        for needle in [
            "training step 3 (8 samples",
            "ran out of memory",
            "activations",
            "--grad_checkpointing True",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from {text}");
        }
        let other = format!(
            "{:#}",
            step_error(anyhow::anyhow!("shape mismatch"), 0, 4, &memory)
        );
        assert!(
            other.starts_with("training step 1 (4 samples on this rank): shape mismatch"),
            "{other}"
        );
        // The cause stays reachable for the exit code's classification.
        let peer = step_error(anyhow::Error::new(PeerFailed), 0, 4, &memory);
        assert!(peer.downcast_ref::<PeerFailed>().is_some());
    }
}
