//! What an elastic restart (`coca-launch --nnodes MIN:MAX`) changes for a training rank, so
//! that a job continuing on fewer nodes follows the trajectory it would have followed on all
//! of them:
//! - the per-device batch comes from the launcher
//!   ([`coca_common::topology::PER_DEVICE_BATCH_ENV`]), raised as the data-parallel world
//!   shrinks, so that every micro-batch (per-device batch × dp) keeps its samples: the sampler
//!   slices one permutation into micro-batches whatever the world size (`data::sampler`), and
//!   the losses span a micro-batch, so the same micro-batches give the same steps (raising the
//!   accumulation instead would change them: see `coca-launch`'s `elastic` module);
//! - the data loader's position is saved with the size of its batches, and a run whose batches
//!   differ (resumed by hand in another layout) continues after the same number of samples, or
//!   is refused when that falls inside one of its batches.

use super::args::PretrainArgs;
use super::checkpoint::TrainerState;
use crate::data::loader::LoaderPosition;
use anyhow::{bail, Context, Result};
use coca_common::topology::PER_DEVICE_BATCH_ENV;
use serde::{Deserialize, Serialize};

/// Sets `--per_device_train_batch_size` to the launcher's value for this generation, when the
/// launcher gave one (`env` looks the variable up).
pub fn apply_launcher_batch(
    args: &mut PretrainArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<()> {
    let Some(value) = env(PER_DEVICE_BATCH_ENV) else {
        return Ok(());
    };
    let batch: usize = value
        .trim()
        .parse()
        .ok()
        .filter(|&b| b > 0)
        .with_context(|| {
            format!("{PER_DEVICE_BATCH_ENV}={value:?} is not a positive whole number")
        })?;
    if Some(batch) != args.per_device_train_batch_size {
        tracing::info!(
            "per-device batch {batch} (the launcher's, for this generation's data-parallel \
             world; the command says {:?}): the global batch stays the same",
            args.per_device_train_batch_size
        );
        args.per_device_train_batch_size = Some(batch);
    }
    Ok(())
}

/// What one loader batch was when a checkpoint was written: the unit of its
/// [`LoaderPosition::batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderLayout {
    /// Samples per loader batch: the per-device batch × the data-parallel world, or one rank's
    /// batch when each rank reads its own share (data split by file).
    pub samples_per_batch: usize,
    /// Ranks reading different samples (dp × sharding).
    pub data_world: usize,
    /// Each rank reads its own share of the data (LAION part files, webdataset shards).
    pub per_rank_source: bool,
}

/// Where the loader of layout `now` continues a checkpoint: its saved position, in `now`'s
/// batches. Checkpoints from before layouts were recorded continue as saved.
pub fn resume_position(state: &TrainerState, now: &LoaderLayout) -> Result<LoaderPosition> {
    let saved = state.loader_position;
    let Some(then) = state.loader_layout else {
        return Ok(saved);
    };
    if then == *now {
        return Ok(saved);
    }
    if then.per_rank_source || now.per_rank_source {
        if then.data_world != now.data_world {
            bail!(
                "the checkpoint at step {} was written with a data-parallel world of {} and this \
                 run has {}, but the data set is split across ranks by file (LAION parts, \
                 webdataset shards): its samples cannot be dealt again the same way, so the \
                 trajectory would change. Resume with {} data-parallel ranks",
                state.global_step,
                then.data_world,
                now.data_world,
                then.data_world
            );
        }
        return Ok(saved);
    }
    let samples = saved.batch * then.samples_per_batch;
    if !samples.is_multiple_of(now.samples_per_batch) {
        bail!(
            "the checkpoint at step {} stopped after {samples} samples of epoch {} ({} batches of \
             {}), which is not a whole number of this run's batches of {} samples: the global \
             batch (per-device batch × dp × gradient accumulation) must stay the same",
            state.global_step,
            saved.epoch,
            saved.batch,
            then.samples_per_batch,
            now.samples_per_batch
        );
    }
    let batch = samples / now.samples_per_batch;
    tracing::info!(
        "data loader: epoch {} after {samples} samples = batch {batch} of {} samples (the \
         checkpoint counted batches of {})",
        saved.epoch,
        now.samples_per_batch,
        then.samples_per_batch
    );
    Ok(LoaderPosition {
        epoch: saved.epoch,
        batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn state(position: LoaderPosition, layout: Option<LoaderLayout>) -> TrainerState {
        TrainerState {
            format_version: 1,
            global_step: 3,
            adam_step: 3,
            loader_position: position,
            loader_layout: layout,
            loss_scaler: None,
            model_config: crate::model::CocaConfig::named("coca_demo").unwrap(),
            run: serde_json::Value::Null,
        }
    }

    fn layout(per_device: usize, data_world: usize) -> LoaderLayout {
        LoaderLayout {
            samples_per_batch: per_device * data_world,
            data_world,
            per_rank_source: false,
        }
    }

    #[test]
    fn the_position_in_samples_carries_over_to_another_layout() {
        // dp 3 × accumulation 2 (batch 2): 3 steps = 6 loader batches of 6 = 36 samples; on
        // dp 2 × accumulation 3 that is batch 9 of 4 samples.
        let at = LoaderPosition { epoch: 1, batch: 6 };
        let s = state(at, Some(layout(2, 3)));
        let got = resume_position(&s, &layout(2, 2)).unwrap();
        assert_eq!(got, LoaderPosition { epoch: 1, batch: 9 });
        // The same layout, or a checkpoint without one: as saved.
        assert_eq!(resume_position(&s, &layout(2, 3)).unwrap(), at);
        assert_eq!(
            resume_position(&state(at, None), &layout(2, 2)).unwrap(),
            at
        );
        // 36 samples are no whole number of batches of 5 × 2.
        let e = format!("{:#}", resume_position(&s, &layout(5, 2)).unwrap_err());
        assert!(
            e.contains("36 samples") && e.contains("batches of 10"),
            "{e}"
        );
        // A data set split by file cannot be dealt to another number of ranks.
        let per_rank = |w| LoaderLayout {
            per_rank_source: true,
            ..layout(2, w)
        };
        let s = state(at, Some(per_rank(3)));
        let e = format!("{:#}", resume_position(&s, &per_rank(2)).unwrap_err());
        assert!(e.contains("split across ranks by file"), "{e}");
    }

    #[test]
    fn the_launcher_sets_the_batch_of_a_generation() {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: PretrainArgs,
        }
        let cli = Cli::try_parse_from(["pretrain", "--per-device-train-batch-size", "2"]).unwrap();
        let mut args = cli.args;
        apply_launcher_batch(&mut args, |_| None).unwrap();
        assert_eq!(args.per_device_train_batch_size, Some(2));
        apply_launcher_batch(&mut args, |_| Some("3".into())).unwrap();
        assert_eq!(args.per_device_train_batch_size, Some(3));
        for bad in ["0", "x"] {
            let e = apply_launcher_batch(&mut args, |_| Some(bad.into())).unwrap_err();
            assert!(e.to_string().contains(PER_DEVICE_BATCH_ENV), "{e}");
        }
    }
}
