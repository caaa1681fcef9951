//! The training loop of `coca-worker pretrain`, one rank of a data-parallel job (or a job of
//! one): set up (`TrainingRun::set_up`), step, log, evaluate and save, until the last step
//! or a preemption. Every rank trains; rank 0 alone writes checkpoints, metrics, evaluations
//! and the demo report (the weights are identical on every rank).

use super::args::PretrainArgs;
use super::checkpoint::TrainerState;
use super::demo;
use super::elastic;
use super::metrics::StepMetrics;
use super::preemption::Preemption;
use super::preflight::{self, Checked};
use super::rank_checkpoint;
use super::setup::TrainingRun;
use crate::comm::peer_failure::PeerFailed;
use crate::distributed::context::{env_world_rank, RankContext};
use crate::eval::classification::{evaluate, paddlemix_classifier_file};
use crate::eval::image_batches::ImageBatches;
use crate::model::tensor_parallel::gather_state_dict;
use crate::model::CoCa;
use anyhow::Result;
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use coca_common::preempt::Decision;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Samples in the built-in synthetic training set.
pub const SYNTHETIC_TRAIN_LEN: usize = 20_000;

/// How a `pretrain` run ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Every step was taken.
    Completed,
    /// The job was asked to stop (the checkpoint signal, SIGTERM): every rank saved its part of
    /// this checkpoint and stopped (exit code [`coca_common::preempt::EXIT_PREEMPTED`]).
    Preempted(Decision),
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

/// Trains as rank `ctx.rank`.
fn train(
    args: &PretrainArgs,
    ctx: &RankContext,
    checked: Checked,
    preemption: &Preemption,
) -> Result<Ended> {
    let mut run = TrainingRun::set_up(args, ctx, checked)?;
    preemption.attach(ctx, &run.args.output_dir, run.trainer.step)?;
    while run.trainer.step < run.total_steps {
        let metrics = run.step()?;
        run.log_step(&metrics)?;
        let step = run.trainer.step;
        if step == run.total_steps {
            break;
        }
        if let Some(decision) = preemption.at_boundary(step)? {
            run.save_preempted(&decision)?;
            return Ok(Ended::Preempted(decision));
        }
        if run
            .args
            .eval_steps
            .is_some_and(|every| step.is_multiple_of(every))
        {
            run.zero_shot()?;
        }
        if run.args.save_steps > 0 && step.is_multiple_of(run.args.save_steps) {
            run.save()?;
        }
    }
    run.finish()
}

impl TrainingRun<'_> {
    /// The step's line on the progress bar, and its record every `--logging_steps` and at the end.
    fn log_step(&mut self, metrics: &StepMetrics) -> Result<()> {
        self.log.step(metrics);
        let step = self.trainer.step;
        if step.is_multiple_of(self.args.logging_steps.max(1)) || step == self.total_steps {
            self.log.log(metrics)?;
        }
        Ok(())
    }

    /// Zero-shot classification on `--classification_eval` (when given) with the current
    /// weights, logged at the current step.
    fn zero_shot(&mut self) -> Result<()> {
        let Some(folder) = &self.eval_folder else {
            return Ok(());
        };
        let step = self.trainer.step;
        // The current weights, detached: evaluation records no graph. The classifier is rebuilt
        // every time: the weights change every step (the seed's frozen cache goes stale).
        let weights: HashMap<String, Tensor> = self.vars.tensors().into_iter().collect();
        let model = CoCa::new_parallel(
            &self.config,
            VarBuilder::from_tensors(weights, DType::F32, &self.device),
            &self.tp,
        )?;
        // With --pretrained_text_model the classifier is written where PaddleMIX keeps it,
        // keyed by the step (so it is never taken for another step's).
        let args = &self.args;
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
                progress: !args.disable_tqdm && self.ctx.data.rank() == 0,
            },
            &self.ctx.data,
        )?;
        self.log.log_eval(step, &result)
    }

    /// This rank's part of a checkpoint at the current step (rank 0 writes the shared files).
    fn save(&self) -> Result<()> {
        let state = TrainerState {
            loss_scaler: self.scaler,
            format_version: 1,
            global_step: self.trainer.step,
            adam_step: self.trainer.optimizer.step,
            loader_position: self.position,
            loader_layout: Some(self.loader_layout),
            model_config: self.config.clone(),
            run: self.run_record.clone(),
        };
        rank_checkpoint::save(
            self.ctx,
            &self.tp,
            &self.args.output_dir,
            &state,
            &self.trainer,
            &self.vars,
            self.args.save_total_limit,
        )
    }

    /// The checkpoint the job agreed on when it was asked to stop.
    fn save_preempted(&self, decision: &Decision) -> Result<()> {
        self.skips.report(&self.log);
        let saving = Instant::now();
        self.save()?;
        self.log.println(format!(
            "rank {}: preempted at step {}, checkpoint {} (its part saved in {:.2} s)",
            self.ctx.rank,
            decision.step,
            decision.checkpoint,
            saving.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// After the last step: the final evaluation and checkpoint, the loss curve, and on the
    /// synthetic set the demo report.
    fn finish(mut self) -> Result<Ended> {
        self.skips.report(&self.log);
        self.zero_shot()?;
        self.save()?;
        self.log
            .finish(&self.args.output_dir.join("loss_curve.png"))?;
        if self.skipped_total > 0 {
            eprintln!(
                "{} samples were skipped in all (see the epoch reports above)",
                self.skipped_total
            );
        }
        if !self.is_synthetic {
            return Ok(Ended::Completed);
        }
        drop(self.loader);
        // Generation runs on one unsplit model: tensor-parallel ranks gather the weights first.
        let full = if self.tp.is_single() {
            None
        } else {
            let local: HashMap<String, Tensor> = self.vars.tensors().into_iter().collect();
            let full = gather_state_dict(&local, &self.config, self.tp.group().as_ref())?;
            Some(CoCa::new(
                &self.config,
                VarBuilder::from_tensors(full, DType::F32, &self.device),
            )?)
        };
        if self.ctx.is_main() {
            demo::report(
                full.as_ref().unwrap_or(&self.trainer.model),
                &self.tokenizer,
                self.args.seed,
                &self.config,
                &self.args.output_dir,
            )?;
        }
        Ok(Ended::Completed)
    }
}
