//! What `--model` and `--pretrained` name: a config, and optionally the weights to start from.

use super::args::{parse_bool, PretrainArgs};
use crate::checkpoint::load_for_model;
use crate::model::CocaConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The built-in config used when `--model` is absent.
pub const DEMO_MODEL: &str = "coca_demo";

/// Weight file names looked for in a `--model` directory, in order.
const WEIGHT_FILES: &[&str] = &[
    "model.safetensors",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model_state.pdparams",
];

/// A model config and the weights to start from (none: initialise from the seed).
pub struct ResolvedModel {
    pub config: CocaConfig,
    pub weights: Option<HashMap<String, Tensor>>,
}

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
fn resolve_config(model: &str) -> Result<(CocaConfig, Option<PathBuf>)> {
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

/// Resolves `--model` and `--pretrained`.
pub fn resolve_model(args: &PretrainArgs) -> Result<ResolvedModel> {
    let model = args.model.as_deref().unwrap_or(DEMO_MODEL);
    let (config, dir) = resolve_config(model)?;
    let weights_path = match args.pretrained.as_deref() {
        None => None,
        Some(v) => match parse_bool(v) {
            Ok(false) => None,
            Ok(true) => {
                let Some(dir) = &dir else {
                    bail!(
                        "--pretrained True: --model {model} names no local directory to load \
                         weights from, and this build downloads nothing; pass --pretrained FILE"
                    );
                };
                let found = WEIGHT_FILES
                    .iter()
                    .map(|f| dir.join(f))
                    .find(|p| p.is_file());
                Some(found.with_context(|| {
                    format!(
                        "--pretrained True: none of {} in {}",
                        WEIGHT_FILES.join(", "),
                        dir.display()
                    )
                })?)
            }
            Err(_) => Some(PathBuf::from(v)),
        },
    };
    let weights = match weights_path {
        Some(p) => Some(load_for_model(&p, &config, DType::F32, &Device::Cpu)?),
        None => None,
    };
    Ok(ResolvedModel { config, weights })
}
