//! Who writes what when a job of several ranks saves a checkpoint: rank 0 prepares the staging
//! directory; with ZeRO sharding, the ranks of the first data-parallel replica each write their
//! optimizer block into it; then rank 0 writes the model, the optimizer (named, or the shard
//! index) and the trainer state, and renames the directory into place. Barriers over the world
//! keep the steps in order; a job of one process just writes.
//!
//! Under tensor parallelism every rank gathers the full weights and moments (the shards of its
//! tensor-parallel group, the blocks of its sharding group) and rank 0 writes them under the
//! standard names, so the checkpoint loads into any layout.

use super::checkpoint::{self, OptimizerState, TrainerState};
use super::optimizer_shards::{self, ShardIndex};
use crate::distributed::context::RankContext;
use crate::model::tensor_parallel::{gather_state_dict, TensorParallel};
use crate::train::moments::gather_moments;
use crate::train::trainable::TrainableWeights;
use crate::train::trainer::Trainer;
use anyhow::{Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Saves `state` (its `global_step` names the checkpoint); every rank calls this.
pub fn save(
    ctx: &RankContext,
    tp: &TensorParallel,
    output_dir: &Path,
    state: &TrainerState,
    trainer: &Trainer,
    vars: &TrainableWeights,
    keep: Option<usize>,
) -> Result<()> {
    if !tp.is_single() {
        return save_gathered(ctx, tp, output_dir, state, trainer, vars, keep);
    }
    let partition = trainer.partition();
    let sharded = partition.count > 1;
    if ctx.is_main() {
        checkpoint::begin(output_dir, state.global_step)?;
    }
    if sharded {
        ctx.world
            .barrier()
            .context("waiting for rank 0 to prepare the checkpoint")?;
        // One copy of each block: the first data-parallel replica writes it.
        if ctx.replicas.rank() == 0 && ctx.tensor.rank() == 0 {
            optimizer_shards::write_shard(
                &checkpoint::staging_dir(output_dir, state.global_step),
                partition.index,
                partition.count,
                &trainer.optimizer_block()?,
            )
            .with_context(|| format!("rank {}: writing its optimizer shard", ctx.rank))?;
        }
        ctx.world
            .barrier()
            .context("waiting for every optimizer shard to be written")?;
    }
    if !ctx.is_main() {
        return Ok(());
    }
    let weights = vars.tensors();
    let index;
    let named;
    let optimizer = if sharded {
        index = ShardIndex::new(
            trainer.params().segments(),
            trainer.params().len(),
            partition.count,
        );
        OptimizerState::Sharded(&index)
    } else {
        named = trainer.optimizer_tensors()?;
        OptimizerState::Named(&named)
    };
    let dir = checkpoint::finish(output_dir, state, &weights, optimizer, keep)?;
    tracing::info!("saved {}", dir.display());
    Ok(())
}

/// The tensor-parallel case: everything gathered to full names, written by rank 0.
fn save_gathered(
    ctx: &RankContext,
    tp: &TensorParallel,
    output_dir: &Path,
    state: &TrainerState,
    trainer: &Trainer,
    vars: &TrainableWeights,
    keep: Option<usize>,
) -> Result<()> {
    let local: HashMap<String, Tensor> = vars.tensors().into_iter().collect();
    let full = gather_state_dict(&local, &state.model_config, tp.group().as_ref())
        .context("gathering the tensor-parallel weights")?;
    let moments = gather_moments(&trainer.gathered_optimizer_tensors()?, tp.group().as_ref())
        .context("gathering the tensor-parallel optimizer state")?;
    if !ctx.is_main() {
        return Ok(());
    }
    let mut weights: Vec<(String, Tensor)> = full.into_iter().collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    checkpoint::begin(output_dir, state.global_step)?;
    let dir = checkpoint::finish(
        output_dir,
        state,
        &weights,
        OptimizerState::Named(&moments),
        keep,
    )?;
    tracing::info!("saved {}", dir.display());
    Ok(())
}
