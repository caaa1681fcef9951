//! What a `--model` value names: a built-in config, a PaddleMIX release name, a config file, or a
//! directory holding `config.json` and weights. Shared by training and the inference commands.

use super::{paddlemix, HubEnv};
use crate::model::CocaConfig;
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

/// Resolves `--model` to a config and a directory its weights may sit in, with the process's
/// cache settings.
pub fn resolve_config(model: &str) -> Result<(CocaConfig, Option<PathBuf>)> {
    resolve_config_in(model, &HubEnv::from_env())
}

/// [`resolve_config`] with the given cache settings. A PaddleMIX release name
/// (`paddlemix/CoCa/<name>`) takes the `config.json` of its cache folder when one is there and
/// reads as a CoCa config, else the built-in config of that release; its weights are found by
/// [`crate::hub::weights`], not in a directory.
pub fn resolve_config_in(model: &str, env: &HubEnv) -> Result<(CocaConfig, Option<PathBuf>)> {
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
    if let Some(release) = paddlemix::release(model)? {
        let cached = release.cache_dir_in(env).join("config.json");
        if let Ok(config) = CocaConfig::from_file(&cached) {
            return Ok((config, None));
        }
        return Ok((CocaConfig::named(release.config)?, None));
    }
    Ok((
        CocaConfig::named(model).with_context(|| format!("--model {model}"))?,
        None,
    ))
}
