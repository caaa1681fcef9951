//! What a `--model` value names: a built-in config, a PaddleMIX release name, a config file, or a
//! directory holding `config.json` and weights. Shared by training and the inference commands.

use super::CocaConfig;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Weight file names looked for in a `--model` directory, in order.
pub const WEIGHT_FILES: &[&str] = &[
    "weights.safetensors",
    "model.safetensors",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model_state.pdparams",
];

/// PaddleMIX's released model names, mapped to the built-in configs.
fn paddlemix_alias(name: &str) -> Option<&'static str> {
    let base = name.rsplit('/').next().unwrap_or(name);
    if base.starts_with("CoCa-ViT-B-32") {
        Some("coca_ViT-B-32")
    } else if base.starts_with("CoCa-ViT-L-14") {
        Some("coca_ViT-L-14")
    } else {
        None
    }
}

/// Resolves `--model` to a config and a directory its weights may sit in.
pub fn resolve_config(model: &str) -> Result<(CocaConfig, Option<PathBuf>)> {
    let path = Path::new(model);
    if path.is_dir() {
        let config = CocaConfig::from_file(&path.join("config.json"))
            .with_context(|| format!("--model {model}: a model directory holds config.json"))?;
        return Ok((config, Some(path.to_path_buf())));
    }
    if path.is_file() {
        return Ok((
            CocaConfig::from_file(path)?,
            path.parent().map(Path::to_path_buf),
        ));
    }
    if let Some(alias) = paddlemix_alias(model) {
        return Ok((CocaConfig::named(alias)?, None));
    }
    Ok((
        CocaConfig::named(model).with_context(|| format!("--model {model}"))?,
        None,
    ))
}
