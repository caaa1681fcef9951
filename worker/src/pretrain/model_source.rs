//! What `--model` and `--pretrained` name: a config, and optionally the weights to start from.

use super::args::{parse_bool, PretrainArgs};
use crate::checkpoint::load_for_model;
use crate::model::source::{resolve_config, WEIGHT_FILES};
use crate::model::CocaConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// The built-in config used when `--model` is absent.
pub const DEMO_MODEL: &str = "coca_demo";

/// A model config and the weights to start from (none: initialise from the seed).
pub struct ResolvedModel {
    pub config: CocaConfig,
    pub weights: Option<HashMap<String, Tensor>>,
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
