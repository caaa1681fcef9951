//! Reading and atomically writing safetensors files.

use crate::atomic_file::write_atomically;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// Every tensor of a safetensors file, in the file's dtypes, in name order.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// Writes `tensors` to `path` whole or not at all ([`write_atomically`]).
pub fn write_safetensors_atomic(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    write_atomically(path, |tmp| {
        Ok(candle_core::safetensors::save(
            &contiguous
                .iter()
                .map(|(n, t)| (n.as_str(), t.clone()))
                .collect(),
            tmp,
        )?)
    })
}
