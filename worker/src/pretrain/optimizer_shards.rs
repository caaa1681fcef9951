//! ZeRO checkpoints: each sharding rank writes its block of the AdamW moments
//! (`optimizer-shard-<k>-of-<S>.safetensors`, 1-D `exp_avg` / `exp_avg_sq` over flat elements
//! `k·block .. min((k+1)·block, total)`), and rank 0 writes `optimizer.index.json` with the flat
//! layout (every parameter's name, shape and offset). Reading assembles named tensors
//! (`exp_avg.<param>`), so a checkpoint loads into any other layout — another stage, another
//! sharding degree, or one process.

use crate::checkpoint::{read_safetensors, write_safetensors_atomic};
use crate::train::flat::Segment;
use crate::train::moments::MOMENT_NAMES;
use crate::train::partition::Partition;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The index file of a sharded optimizer state.
pub const INDEX_FILE: &str = "optimizer.index.json";
const INDEX_FORMAT: &str = "coca-zero-optimizer-v1";

/// One parameter's place in the flat buffers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

/// `optimizer.index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub format: String,
    /// Flat elements in all.
    pub total: usize,
    /// Number of shard files.
    pub shards: usize,
    pub parameters: Vec<IndexEntry>,
}

/// The file of shard `index` of `count`.
pub fn shard_file(index: usize, count: usize) -> String {
    format!("optimizer-shard-{index:05}-of-{count:05}.safetensors")
}

impl ShardIndex {
    /// The index of `segments` split into `shards` blocks.
    pub fn new(segments: &[Segment], total: usize, shards: usize) -> Self {
        Self {
            format: INDEX_FORMAT.to_string(),
            total,
            shards,
            parameters: segments
                .iter()
                .map(|s| IndexEntry {
                    name: s.name.clone(),
                    shape: s.shape.clone(),
                    offset: s.offset,
                })
                .collect(),
        }
    }
}

/// Writes this rank's block (from [`crate::train::trainer::Trainer::optimizer_block`]).
pub fn write_shard(
    dir: &Path,
    index: usize,
    count: usize,
    block: &[(String, Tensor)],
) -> Result<()> {
    write_safetensors_atomic(block, &dir.join(shard_file(index, count)))
}

/// Writes the index (rank 0).
pub fn write_index(dir: &Path, index: &ShardIndex) -> Result<()> {
    let path = dir.join(INDEX_FILE);
    std::fs::write(&path, serde_json::to_vec_pretty(index)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a sharded optimizer state back as named tensors (`exp_avg.<param>`, ...).
pub fn read_sharded(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(INDEX_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let index: ShardIndex = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an optimizer index", path.display()))?;
    if index.format != INDEX_FORMAT {
        bail!("{}: unknown format {:?}", path.display(), index.format);
    }
    let mut flat: HashMap<&str, Vec<f32>> = MOMENT_NAMES
        .iter()
        .map(|&m| (m, Vec::with_capacity(index.total)))
        .collect();
    for k in 0..index.shards {
        let file = dir.join(shard_file(k, index.shards));
        let expected = Partition::new(index.total, k, index.shards).len();
        let tensors: HashMap<String, Tensor> = read_safetensors(&file)?.into_iter().collect();
        for &moment in &MOMENT_NAMES {
            let t = tensors
                .get(moment)
                .with_context(|| format!("{} has no {moment}", file.display()))?;
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            if values.len() != expected {
                bail!(
                    "{}: {moment} has {} elements, the index says {expected}",
                    file.display(),
                    values.len()
                );
            }
            flat.get_mut(moment)
                .context("moment buffer")?
                .extend_from_slice(&values);
        }
    }
    let mut out = HashMap::new();
    for (moment, values) in &flat {
        for p in &index.parameters {
            let len: usize = p.shape.iter().product();
            let Some(slice) = values.get(p.offset..p.offset + len) else {
                bail!(
                    "{}: {} lies outside the flat buffer",
                    path.display(),
                    p.name
                );
            };
            out.insert(
                format!("{moment}.{}", p.name),
                Tensor::from_slice(slice, p.shape.as_slice(), &Device::Cpu)?,
            );
        }
    }
    Ok(out)
}
