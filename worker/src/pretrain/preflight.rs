//! Everything `pretrain` can check before building the model: the flags, the layout's
//! arithmetic, the model config (not its weights), the evaluation folder, the output folder,
//! the checkpoint to resume from, and the training data (opened and indexed). A worker runs it
//! first; `coca-launch` runs it once (`coca-worker check-args`) before starting any worker, so a
//! typo costs one message and well under a second instead of one per worker after the model
//! was built.

use super::args::PretrainArgs;
use super::checkpoint::resolve_resume;
use super::model_source::DEMO_MODEL;
use super::run::SYNTHETIC_TRAIN_LEN;
use crate::data::image_folder::ImageFolder;
use crate::data::loader::CaptionSource;
use crate::data::parts::ShardSpec;
use crate::data::synthetic::SyntheticCaptions;
use crate::data::synthetic_source::SyntheticSource;
use crate::data::train_set::{classify, open_train_set, DataSpec};
use crate::hub::source::resolve_config_in;
use crate::hub::{coco, Hub, HubEnv};
use crate::model::tensor_parallel::check_degree;
use crate::model::CocaConfig;
use crate::preflight::writable_dir;
use anyhow::{Context, Result};
use coca_common::topology::Topology;
use std::sync::Arc;

/// The training samples of this rank.
pub struct TrainData {
    pub source: Arc<dyn CaptionSource>,
    /// The built-in synthetic set (demo defaults and report).
    pub synthetic: bool,
    /// `source` holds only this rank's share (see [`crate::data::train_set::TrainSet`]).
    pub per_rank: bool,
    /// What was opened, for the start-up summary.
    pub description: String,
}

/// What the checks found, for the run to go on with.
pub struct Checked {
    pub config: CocaConfig,
    pub data: TrainData,
    pub eval_folder: Option<ImageFolder>,
}

impl Checked {
    /// The per-device batch: the flag, else the demo's 32 (synthetic data, no `--model`) or 8.
    pub fn batch(&self, args: &PretrainArgs) -> usize {
        args.per_device_train_batch_size
            .unwrap_or(if self.is_demo(args) { 32 } else { 8 })
    }

    /// The built-in demo: synthetic data and no `--model`.
    pub fn is_demo(&self, args: &PretrainArgs) -> bool {
        self.data.synthetic && args.model.is_none()
    }
}

/// Runs the checks as rank `rank` of a job of `world` processes.
pub fn check(args: &PretrainArgs, world: usize, rank: usize) -> Result<Checked> {
    args.validate()?;
    args.device.check()?;
    let topology = Topology::new(
        world,
        args.tensor_parallel_degree,
        args.sharding_parallel_degree,
    )?;
    let model = args.model.as_deref().unwrap_or(DEMO_MODEL);
    let (config, _) = resolve_config_in(model, &HubEnv::from_env())
        .with_context(|| format!("--model {model}"))?;
    check_degree(&config, args.tensor_parallel_degree)
        .context("--tensor_parallel_degree does not fit the model")?;
    let eval_folder = match &args.classification_eval {
        Some(dir) => Some(
            ImageFolder::open(dir)
                .with_context(|| format!("--classification_eval {}", dir.display()))?,
        ),
        None => None,
    };
    if let Some(v) = &args.resume_from_checkpoint {
        resolve_resume(v, &args.output_dir)
            .with_context(|| format!("--resume_from_checkpoint {v}"))?;
    }
    let shard = ShardSpec::new(topology.data_rank(rank)?, topology.data_world())?;
    let data = open_data(args, config.vision_cfg.image_size, shard)?;
    // Last: it creates the folder, which a failed check should not leave behind.
    writable_dir(&args.output_dir, "--output_dir")?;
    Ok(Checked {
        config,
        data,
        eval_folder,
    })
}

/// The data set `--task_name` names (see [`crate::data::train_set`]). Records skipped while
/// indexing are logged as warnings.
fn open_data(args: &PretrainArgs, image_size: usize, shard: ShardSpec) -> Result<TrainData> {
    match args.task_name.as_deref() {
        None | Some("synthetic") => {
            let set = SyntheticCaptions::new(args.seed, SYNTHETIC_TRAIN_LEN, image_size as u32);
            Ok(TrainData {
                source: Arc::new(SyntheticSource { set }),
                synthetic: true,
                per_rank: false,
                description: "the built-in synthetic captioning set".to_string(),
            })
        }
        Some(name) => {
            // The seed's default set is fetched when missing, here: under `coca-launch` this
            // runs first in the launcher's `check-args`, once per node, before any worker.
            if let DataSpec::CocoKarpathy { root } = classify(name, args.data_root.as_deref())? {
                let hub = Hub::from_env();
                coco::ensure_karpathy(&root, &hub, &coco::Archive::seed(&hub))?;
            }
            let set = open_train_set(
                name,
                args.data_root.as_deref(),
                image_size,
                args.seed,
                shard,
            )?;
            for reason in &set.skipped {
                tracing::warn!("skipped {reason}");
            }
            if !set.skipped.is_empty() {
                eprintln!(
                    "{} record(s) skipped while reading the data set (see the warnings)",
                    set.skipped.len()
                );
            }
            Ok(TrainData {
                source: set.source,
                synthetic: false,
                per_rank: set.per_rank,
                description: set.description,
            })
        }
    }
}
