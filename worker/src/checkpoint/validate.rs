//! Checking a state dict against the model a config builds.

use super::read_state_dict;
use crate::model::manifest::parameter_shapes;
use crate::model::CocaConfig;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

/// How many problems of each kind an error lists before summarising the rest.
const LISTED: usize = 12;

/// Every mismatch between `tensors` and the model `config` builds — missing keys, unexpected
/// keys, wrong shapes, non-float dtypes — as one error listing them all.
pub fn check_against_model(tensors: &[(String, Tensor)], config: &CocaConfig) -> Result<()> {
    let expected: HashMap<String, Vec<usize>> = parameter_shapes(config)?.into_iter().collect();
    let found: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut missing: Vec<&str> = expected
        .keys()
        .map(String::as_str)
        .filter(|n| !found.contains_key(n))
        .collect();
    let mut unexpected: Vec<&str> = found
        .keys()
        .copied()
        .filter(|n| !expected.contains_key(*n))
        .collect();
    let mut wrong: Vec<String> = Vec::new();
    for (name, tensor) in &found {
        if let Some(shape) = expected.get(*name) {
            if tensor.dims() != shape.as_slice() {
                wrong.push(format!(
                    "{name}: shape {:?}, expected {shape:?}",
                    tensor.dims()
                ));
            } else if !tensor.dtype().is_float() {
                wrong.push(format!(
                    "{name}: dtype {:?} is not floating point",
                    tensor.dtype()
                ));
            }
        }
    }
    if missing.is_empty() && unexpected.is_empty() && wrong.is_empty() {
        return Ok(());
    }
    missing.sort_unstable();
    unexpected.sort_unstable();
    wrong.sort_unstable();
    let mut msg = String::from("the checkpoint does not fit the model:");
    for (what, items) in [
        (
            "missing keys",
            missing.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        ),
        (
            "unexpected keys",
            unexpected.iter().map(|s| s.to_string()).collect(),
        ),
        ("wrong shapes or dtypes", wrong),
    ] {
        if items.is_empty() {
            continue;
        }
        let _ = write!(msg, "\n  {} {what}:", items.len());
        for item in items.iter().take(LISTED) {
            let _ = write!(msg, "\n    {item}");
        }
        if items.len() > LISTED {
            let _ = write!(msg, "\n    ... and {} more", items.len() - LISTED);
        }
    }
    bail!(msg)
}

/// Reads a checkpoint, checks it against the model, and converts it to `dtype` on `device`.
pub fn load_for_model(
    path: &Path,
    config: &CocaConfig,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let tensors = read_state_dict(path)?;
    check_against_model(&tensors, config)
        .map_err(|e| e.context(format!("checkpoint {}", path.display())))?;
    tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?.to_device(device)?)))
        .collect()
}
