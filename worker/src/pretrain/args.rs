//! `coca-worker pretrain` flags: the seed's (PaddleMIX `run_pretrain_dist.py`, HF-style
//! `TrainingArguments`) spelled as the seed spells them.
//!
//! Flags are accepted with underscores (`--per_device_train_batch_size`, the seed's spelling) or
//! dashes; boolean flags take `True`/`False`/`true`/`1`/... or no value. Unknown flags are errors
//! with a suggestion (clap's). A flag this build cannot honour is an error from
//! [`PretrainArgs::validate`], never silently ignored.

use crate::cli::parse_bool;
use crate::cli::precision::PrecisionArgs;
use crate::train::trainer::ZeroStage;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

/// The training flags. Names and meanings follow the seed; defaults follow the seed where it has
/// one and otherwise suit the built-in demo.
#[derive(Debug, Clone, Args, serde::Serialize, serde::Deserialize)]
pub struct PretrainArgs {
    /// A built-in config (`coca_ViT-B-32`, `coca_ViT-L-14`, `coca_demo`), a PaddleMIX name such as
    /// `paddlemix/CoCa/CoCa-ViT-B-32-laion2B-s13B-b90k`, or a directory/file holding a config
    /// (and optionally weights). Default: the CPU-sized demo model.
    #[arg(long)]
    pub model: Option<String>,
    /// The starting weights: a checkpoint file, an open_clip tag of a built-in config
    /// (`laion2b_s13b_b90k`, `mscoco_finetuned_laion2b_s13b_b90k`), `True` (a PaddleMIX name's
    /// release, the weights in a `--model` directory) or `False` (random); see `hub::weights`.
    /// Default: a PaddleMIX name's release, else random.
    #[arg(long)]
    pub pretrained: Option<String>,
    /// Start from random (seeded) weights whatever `--model` names (as `--pretrained False`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    #[serde(default)]
    pub from_scratch: bool,
    /// The data set: `synthetic` (the default: the built-in synthetic captioning set),
    /// `coco_karpathy`, a Karpathy-format `.json` file, a LAION file list, or webdataset shards
    /// (`shards-{000..009}.tar`, a folder of `.tar` files, or a list of them); see
    /// `data::train_set`.
    #[arg(long)]
    pub task_name: Option<String>,
    /// Root folder that data-set image paths are relative to (`coco_karpathy`: default
    /// `~/.paddlemix/datasets/coco`; a `.json` file: default its own folder).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    #[arg(long)]
    pub per_device_train_batch_size: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    /// Loader threads (decoding and augmentation).
    #[arg(long, default_value_t = 2)]
    pub dataloader_num_workers: usize,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// Global-norm clipping threshold; 0 disables clipping.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Total optimizer steps; overrides `--num_train_epochs` when positive.
    #[arg(long, allow_negative_numbers = true)]
    pub max_steps: Option<i64>,
    #[arg(long, default_value = "output")]
    pub output_dir: PathBuf,
    #[arg(long, default_value_t = 10)]
    pub logging_steps: u64,
    /// Save a checkpoint every N optimizer steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_steps: u64,
    /// Keep only the newest K checkpoints.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "true", value_parser = parse_bool)]
    pub do_train: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// `--bf16` / `--fp16`: only `False` (float32) in this build.
    #[command(flatten)]
    #[serde(flatten)]
    pub precision: PrecisionArgs,
    #[command(flatten)]
    #[serde(default)]
    pub device: crate::device::DeviceArgs,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// open_clip's `--grad-checkpointing`: recompute each transformer block's activations in
    /// the backward pass instead of keeping them (less memory, about one more forward pass).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    #[serde(default)]
    pub grad_checkpointing: bool,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub local_loss: bool,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub gather_with_grad: bool,
    #[arg(long, default_value_t = 2.0)]
    pub coca_caption_loss_weight: f64,
    #[arg(long, default_value_t = 1.0)]
    pub coca_contrastive_loss_weight: f64,
    #[arg(long)]
    pub visual_lr: Option<f64>,
    #[arg(long)]
    pub text_lr: Option<f64>,
    #[arg(long)]
    pub visual_wd: Option<f64>,
    #[arg(long)]
    pub text_wd: Option<f64>,
    /// An ImageFolder to evaluate zero-shot classification on, every `--eval_steps` and at the
    /// end, with the current weights (the classifier is rebuilt each time).
    #[arg(long)]
    pub classification_eval: Option<PathBuf>,
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// As in PaddleMIX, names the zero-shot classifier file: each `--classification_eval`
    /// writes the classifier it used to `output_dir/{NAME}_{basename(DIR)}_classifier.safetensors`
    /// (never read back: the weights change every step).
    #[arg(long)]
    pub pretrained_text_model: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_degree: usize,
    #[arg(long, default_value_t = 1)]
    pub sharding_parallel_degree: usize,
    /// `stage1`, `stage2` (ZeRO) or empty.
    #[arg(long, default_value = "")]
    pub sharding: String,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub disable_tqdm: bool,
    /// A checkpoint directory, or `True` for the newest in `--output_dir`.
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
}

impl PretrainArgs {
    /// The ZeRO stage `--sharding` asks for (`None` without sharding or with a sharding degree
    /// of 1, where there is nothing to partition).
    pub fn zero_stage(&self) -> Result<Option<ZeroStage>> {
        let stage = match self.sharding.trim().to_ascii_lowercase().as_str() {
            "" => None,
            "stage1" => Some(ZeroStage::One),
            "stage2" => Some(ZeroStage::Two),
            "stage3" => bail!(
                "--sharding stage3 (parameters partitioned too) is not available; use stage1 or \
                 stage2"
            ),
            other => bail!("--sharding {other:?}: expected stage1 or stage2"),
        };
        match (stage, self.sharding_parallel_degree) {
            (None, d) if d > 1 => {
                bail!("--sharding_parallel_degree {d} needs --sharding stage1 or --sharding stage2")
            }
            (_, 1) => Ok(None),
            (stage, _) => Ok(stage),
        }
    }

    /// Rejects what this build cannot honour, naming the flag.
    pub fn validate(&self) -> Result<()> {
        self.zero_stage()?;
        self.precision.check()?;
        if self.eval_steps.is_some() && self.classification_eval.is_none() {
            bail!("--eval_steps needs --classification_eval DIR (the evaluation it schedules)");
        }
        if self.eval_steps == Some(0) {
            bail!("--eval_steps must be at least 1");
        }
        if !self.do_train {
            bail!("--do_train False: pretrain only trains; use `coca-worker eval` for evaluation");
        }
        if self.gradient_accumulation_steps == 0 {
            bail!("--gradient_accumulation_steps must be at least 1");
        }
        if self.per_device_train_batch_size == Some(0) {
            bail!("--per_device_train_batch_size must be at least 1");
        }
        Ok(())
    }
}
