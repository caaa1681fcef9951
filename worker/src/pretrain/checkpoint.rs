//! Training checkpoints: `output_dir/checkpoint-<step>/` with the model (open_clip-named
//! safetensors), the optimizer moments, and `trainer_state.json` (steps, data-loader position,
//! the resolved configuration).
//!
//! With ZeRO sharding the optimizer moments are one file per sharding rank plus an index (see
//! [`super::optimizer_shards`]), all written into the same staging directory.
//!
//! A checkpoint is written into a temporary directory and renamed into place, so a crash
//! mid-write leaves the previous checkpoint whole; older ones beyond `--save_total_limit` are
//! removed only after the new one is in place.

use super::elastic::LoaderLayout;
use super::optimizer_shards::{self, ShardIndex};
use crate::checkpoint::{read_safetensors, write_safetensors_atomic};
use crate::data::loader::LoaderPosition;
use crate::model::CocaConfig;
use crate::train::loss_scaler::LossScaler;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Version of the checkpoint layout; bumped when it changes incompatibly.
const FORMAT_VERSION: u32 = 1;
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

/// Everything in `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub format_version: u32,
    /// Optimizer steps taken (the schedule's position).
    pub global_step: u64,
    /// AdamW updates applied (its bias-correction step; differs when steps were skipped).
    pub adam_step: u64,
    /// Where the data loader continues.
    pub loader_position: LoaderPosition,
    /// What one loader batch of `loader_position` was (absent in older checkpoints): a run in
    /// another layout converts the position (`super::elastic::resume_position`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader_layout: Option<LoaderLayout>,
    /// The model this checkpoint belongs to.
    pub model_config: CocaConfig,
    /// The run's resolved settings, for the record.
    pub run: serde_json::Value,
    /// The float16 loss scaler (`--fp16 True`), restored on resume; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
}

/// A checkpoint read back.
pub struct LoadedCheckpoint {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub weights: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

/// The directory name of the checkpoint after `step` optimizer steps.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Checkpoints in `output_dir`, oldest first.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", output_dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

fn sync_dir(dir: &Path) {
    // Best effort: makes the rename durable on file systems that support it.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The optimizer state of a checkpoint as rank 0 writes it.
pub enum OptimizerState<'a> {
    /// Moments by parameter name (`optimizer.safetensors`).
    Named(&'a [(String, Tensor)]),
    /// Moments in shard files the sharding ranks have already written into the staging
    /// directory; rank 0 adds the index.
    Sharded(&'a ShardIndex),
}

/// The directory a checkpoint is assembled in before it is renamed into place. Its name is
/// the same in every rank, so sharding ranks can write their blocks into it.
pub fn staging_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!(".checkpoint-{step}.tmp"))
}

/// Creates an empty staging directory for `step` (rank 0, before the others write into it).
pub fn begin(output_dir: &Path, step: u64) -> Result<PathBuf> {
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("cannot create {}", output_dir.display()))?;
    let tmp = staging_dir(output_dir, step);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove the stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok(tmp)
}

/// Writes a checkpoint atomically and prunes old ones beyond `keep` (one process).
pub fn save(
    output_dir: &Path,
    state: &TrainerState,
    weights: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    keep: Option<usize>,
) -> Result<PathBuf> {
    begin(output_dir, state.global_step)?;
    finish(
        output_dir,
        state,
        weights,
        OptimizerState::Named(optimizer),
        keep,
    )
}

/// Completes the staging directory of `state.global_step` (model, optimizer, state), renames
/// it into place and prunes old checkpoints beyond `keep` (rank 0).
pub fn finish(
    output_dir: &Path,
    state: &TrainerState,
    weights: &[(String, Tensor)],
    optimizer: OptimizerState,
    keep: Option<usize>,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output_dir, state.global_step);
    let tmp = staging_dir(output_dir, state.global_step);
    write_safetensors_atomic(weights, &tmp.join(MODEL_FILE))?;
    match optimizer {
        OptimizerState::Named(tensors) => {
            write_safetensors_atomic(tensors, &tmp.join(OPTIMIZER_FILE))?
        }
        OptimizerState::Sharded(index) => optimizer_shards::write_index(&tmp, index)?,
    }
    let json = serde_json::to_vec_pretty(state)?;
    let state_path = tmp.join(STATE_FILE);
    std::fs::write(&state_path, json)
        .with_context(|| format!("cannot write {}", state_path.display()))?;
    std::fs::File::open(&state_path)?.sync_all()?;
    sync_dir(&tmp);
    if final_dir.exists() {
        // Re-saving the same step (e.g. after a restart): replace it only once the new one is
        // complete.
        let old = output_dir.join(format!(".checkpoint-{}.old", state.global_step));
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(&final_dir, &old)?;
        std::fs::rename(&tmp, &final_dir)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, &final_dir).with_context(|| {
            format!("cannot rename {} to {}", tmp.display(), final_dir.display())
        })?;
    }
    sync_dir(output_dir);
    if let Some(keep) = keep {
        let all = list_checkpoints(output_dir)?;
        let excess = all.len().saturating_sub(keep.max(1));
        for (_, dir) in all.into_iter().take(excess) {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
        }
    }
    Ok(final_dir)
}

/// Which checkpoint `--resume_from_checkpoint VALUE` names: a directory, or `true` for the
/// newest in `output_dir`.
pub fn resolve_resume(value: &str, output_dir: &Path) -> Result<Option<PathBuf>> {
    match crate::cli::parse_bool(value) {
        Ok(false) => Ok(None),
        Ok(true) => match list_checkpoints(output_dir)?.pop() {
            Some((_, dir)) => Ok(Some(dir)),
            None => bail!(
                "--resume_from_checkpoint True: no checkpoint-* directory with a {STATE_FILE} in {}",
                output_dir.display()
            ),
        },
        Err(_) => Ok(Some(PathBuf::from(value))),
    }
}

/// Reads a checkpoint and checks that it belongs to `config`.
pub fn load(dir: &Path, config: &CocaConfig) -> Result<LoadedCheckpoint> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid trainer state", state_path.display()))?;
    if state.format_version != FORMAT_VERSION {
        bail!(
            "{}: checkpoint format {} is not supported (this build reads {FORMAT_VERSION})",
            state_path.display(),
            state.format_version
        );
    }
    if &state.model_config != config {
        bail!(
            "checkpoint {} was trained with another model config than this run's:\n  \
             checkpoint: {}\n  this run:   {}",
            dir.display(),
            serde_json::to_string(&state.model_config)?,
            serde_json::to_string(config)?
        );
    }
    let weights: Vec<(String, Tensor)> = read_safetensors(&dir.join(MODEL_FILE))?;
    crate::checkpoint::check_against_model(&weights, config)
        .with_context(|| format!("checkpoint {}", dir.display()))?;
    let optimizer = if dir.join(optimizer_shards::INDEX_FILE).is_file() {
        optimizer_shards::read_sharded(dir)?
    } else {
        read_safetensors(&dir.join(OPTIMIZER_FILE))?
            .into_iter()
            .collect()
    };
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        state,
        weights: weights.into_iter().collect(),
        optimizer,
    })
}
