//! Which parameters are split and how: the rules by open_clip name, slicing a full tensor into a
//! member's shard, and gathering the shards back.

use super::{check_degree, TensorParallel};
use crate::model::config::CocaConfig;
use crate::model::manifest::parameter_shapes_for;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use coca_common::collective::Collective;
use std::collections::HashMap;

/// How one parameter is laid out over a tensor-parallel group of `T` members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Every member holds the whole tensor.
    Replicated,
    /// Member `r` holds block `r` of `T` equal contiguous blocks along this dimension.
    Dim(usize),
    /// A packed q/k/v tensor (`in_proj_weight` `[3W, W]`, `in_proj_bias` `[3W]`): member `r`
    /// holds block `r` of each third along dim 0, stored as `[q_r; k_r; v_r]`.
    PackedQkv,
}

impl Split {
    /// Whether every member holds the whole tensor.
    pub fn is_replicated(&self) -> bool {
        matches!(self, Split::Replicated)
    }
}

/// The layout of the parameter named `name` (open_clip's `state_dict()` names).
///
/// Column-parallel (output rows split): q/k/v projections (by heads) and `mlp.c_fc`;
/// row-parallel (input columns split): `attn.out_proj.weight` and `mlp.c_proj.weight`, whose
/// biases are replicated; vocabulary-parallel: `text.token_embedding.weight` (rows) and
/// `text_decoder.text_projection` (columns). Everything else is replicated.
pub fn split_of(name: &str) -> Split {
    const RULES: &[(&str, Split)] = &[
        (".attn.in_proj_weight", Split::PackedQkv),
        (".attn.in_proj_bias", Split::PackedQkv),
        (".attn.q_proj_weight", Split::Dim(0)),
        (".attn.k_proj_weight", Split::Dim(0)),
        (".attn.v_proj_weight", Split::Dim(0)),
        (".attn.out_proj.weight", Split::Dim(1)),
        (".mlp.c_fc.weight", Split::Dim(0)),
        (".mlp.c_fc.bias", Split::Dim(0)),
        (".mlp.c_proj.weight", Split::Dim(1)),
    ];
    match name {
        "text.token_embedding.weight" => Split::Dim(0),
        "text_decoder.text_projection" => Split::Dim(1),
        _ => RULES
            .iter()
            .find(|(suffix, _)| name.ends_with(suffix))
            .map_or(Split::Replicated, |(_, split)| *split),
    }
}

/// The full shape of a parameter whose shard on one of `size` members has shape `local`.
pub fn full_shape(split: Split, local: &[usize], size: usize) -> Vec<usize> {
    let mut dims = local.to_vec();
    match split {
        Split::Replicated => {}
        Split::Dim(d) => dims[d] *= size,
        Split::PackedQkv => dims[0] *= size,
    }
    dims
}

/// The shard's shape of a parameter of shape `full` on one of `size` members.
fn local_shape(name: &str, split: Split, full: &[usize], size: usize) -> Result<Vec<usize>> {
    let mut dims = full.to_vec();
    let (d, parts) = match split {
        Split::Replicated => return Ok(dims),
        Split::Dim(d) => (d, size),
        Split::PackedQkv => (0, 3 * size),
    };
    ensure!(
        d < dims.len() && dims[d].is_multiple_of(parts),
        "{name} {full:?}: dimension {d} does not split into {parts} equal parts"
    );
    dims[d] /= size;
    Ok(dims)
}

/// Member `rank`'s shard of the parameter `name` (full shape) over `size` members: a copy that
/// does not keep the full tensor alive (a replicated parameter is returned as it is).
pub fn shard_tensor(name: &str, full: &Tensor, rank: usize, size: usize) -> Result<Tensor> {
    ensure!(rank < size, "member {rank} outside a group of {size}");
    let split = split_of(name);
    if size == 1 || split.is_replicated() {
        return Ok(full.clone());
    }
    local_shape(name, split, full.dims(), size)?;
    let shard = match split {
        Split::Replicated => unreachable!("handled above"),
        Split::Dim(d) => {
            let n = full.dim(d)? / size;
            full.narrow(d, rank * n, n)?.force_contiguous()?
        }
        Split::PackedQkv => {
            let w = full.dim(0)? / 3;
            let n = w / size;
            let parts = (0..3)
                .map(|i| full.narrow(0, i * w + rank * n, n))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?
        }
    };
    Ok(shard.detach())
}

/// Every member's local shard of `local` (parameter `name`) put back together: the full tensor,
/// on every member. Every member must call it for the same parameters in the same order.
pub fn gather_tensor(name: &str, local: &Tensor, group: &dyn Collective) -> Result<Tensor> {
    let size = group.size();
    let split = split_of(name);
    if size == 1 || split.is_replicated() {
        return Ok(local.clone());
    }
    let dtype = local.dtype();
    let data = local
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut all = vec![0f32; data.len() * size];
    group
        .all_gather(&data, &mut all)
        .with_context(|| format!("gathering the shards of {name}"))?;
    let mut dims = vec![size];
    dims.extend_from_slice(local.dims());
    let all = Tensor::from_vec(all, dims, local.device())?;
    let pieces = (0..size)
        .map(|r| all.get(r))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let full = match split {
        Split::Replicated => unreachable!("handled above"),
        Split::Dim(d) => Tensor::cat(&pieces, d)?,
        Split::PackedQkv => {
            let n = local.dim(0)?;
            ensure!(
                n.is_multiple_of(3),
                "{name}: a packed q/k/v shard of {n} rows"
            );
            let n = n / 3;
            let mut parts = Vec::with_capacity(3 * size);
            for i in 0..3 {
                for piece in &pieces {
                    parts.push(piece.narrow(0, i * n, n)?);
                }
            }
            Tensor::cat(&parts, 0)?
        }
    };
    Ok(full.to_dtype(dtype)?)
}

/// The full shape of every parameter of `config`, by name.
fn full_shapes(config: &CocaConfig) -> Result<HashMap<String, Vec<usize>>> {
    Ok(parameter_shapes_for(config, &TensorParallel::single())?
        .into_iter()
        .collect())
}

/// Member `rank`'s shards (standard names, local shapes) of a full state dict (open_clip names
/// and shapes, e.g. an open_clip checkpoint or a PaddleMIX one mapped to open_clip's layout)
/// for a tensor-parallel group of `size`. Every tensor must be a parameter of `config` with its
/// full shape; a subset is fine.
pub fn shard_state_dict(
    full: &HashMap<String, Tensor>,
    config: &CocaConfig,
    rank: usize,
    size: usize,
) -> Result<HashMap<String, Tensor>> {
    check_degree(config, size)?;
    ensure!(rank < size, "member {rank} outside a group of {size}");
    let shapes = full_shapes(config)?;
    let mut out = HashMap::with_capacity(full.len());
    for (name, tensor) in full {
        let Some(expected) = shapes.get(name) else {
            bail!("{name} is not a parameter of this model");
        };
        ensure!(
            tensor.dims() == expected.as_slice(),
            "{name} has shape {:?}, the model's is {expected:?}",
            tensor.dims()
        );
        out.insert(name.clone(), shard_tensor(name, tensor, rank, size)?);
    }
    Ok(out)
}

/// The full state dict (standard names and full shapes) from every member's shards `local`,
/// on every member of `group` (the tensor-parallel group). Every member must pass the same
/// names; works for anything keyed by parameter name (weights, gradients, optimizer moments).
pub fn gather_state_dict(
    local: &HashMap<String, Tensor>,
    config: &CocaConfig,
    group: &dyn Collective,
) -> Result<HashMap<String, Tensor>> {
    let size = group.size();
    check_degree(config, size)?;
    let shapes = full_shapes(config)?;
    // A fixed order: every member runs the same collectives in the same sequence.
    let mut names: Vec<&String> = local.keys().collect();
    names.sort();
    let mut out = HashMap::with_capacity(local.len());
    for name in names {
        let tensor = &local[name];
        let Some(expected) = shapes.get(name) else {
            bail!("{name} is not a parameter of this model");
        };
        let want = local_shape(name, split_of(name), expected, size)?;
        ensure!(
            tensor.dims() == want.as_slice(),
            "{name}: the shard has shape {:?}, a member of {size} holds {want:?}",
            tensor.dims()
        );
        out.insert(name.clone(), gather_tensor(name, tensor, group)?);
    }
    Ok(out)
}

/// Every parameter of member `rank` of a group of `size` with its local shape, in the order the
/// model asks for them (computed from the model code, nothing allocated).
pub fn local_parameter_shapes(
    config: &CocaConfig,
    rank: usize,
    size: usize,
) -> Result<Vec<(String, Vec<usize>)>> {
    check_degree(config, size)?;
    ensure!(rank < size, "member {rank} outside a group of {size}");
    Ok(parameter_shapes_for(
        config,
        &TensorParallel::layout_only(rank, size),
    )?)
}
