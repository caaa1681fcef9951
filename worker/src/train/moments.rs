//! Names of the AdamW moments in checkpoints (`exp_avg.<param>`, `exp_avg_sq.<param>`) and
//! their tensor-parallel shards: the optimizer's state split and gathered like its parameters.

use crate::model::tensor_parallel::{gather_tensor, shard_tensor, TensorParallel};
use anyhow::{Context, Result};
use candle_core::Tensor;
use coca_common::collective::Collective;
use std::collections::HashMap;

/// The moments' name prefixes in checkpoints, PyTorch AdamW's state keys.
pub const MOMENT_NAMES: [&str; 2] = ["exp_avg", "exp_avg_sq"];

/// The parameter an optimizer-state tensor belongs to: `exp_avg.visual.proj` → `visual.proj`.
fn moment_parameter(name: &str) -> Result<&str> {
    MOMENT_NAMES
        .iter()
        .find_map(|m| name.strip_prefix(m)?.strip_prefix('.'))
        .with_context(|| format!("optimizer state {name:?} names no moment of a parameter"))
}

/// This rank's shards of optimizer moments saved under full parameter names
/// (`exp_avg.<param>`), split like their parameters.
pub fn shard_moments(
    full: &HashMap<String, Tensor>,
    tp: &TensorParallel,
) -> Result<HashMap<String, Tensor>> {
    full.iter()
        .map(|(name, t)| {
            let param = moment_parameter(name)?;
            Ok((name.clone(), shard_tensor(param, t, tp.rank(), tp.size())?))
        })
        .collect()
}

/// Optimizer moments of every rank's shards put back under full shapes (on every member; all
/// must call it with the same names).
pub fn gather_moments(
    local: &[(String, Tensor)],
    group: &dyn Collective,
) -> Result<Vec<(String, Tensor)>> {
    let mut sorted: Vec<&(String, Tensor)> = local.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted
        .into_iter()
        .map(|(name, t)| {
            Ok((
                name.clone(),
                gather_tensor(moment_parameter(name)?, t, group)?,
            ))
        })
        .collect()
}
