//! What `--model`, `--pretrained` and `--from_scratch` name: a config, and optionally the
//! weights to start from (released weights are fetched, one rank per node; see `hub::weights`).

use super::args::PretrainArgs;
use crate::checkpoint::load_for_model;
use crate::hub::weights::{self, Request, Weights};
use crate::hub::Hub;
use crate::model::CocaConfig;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// The built-in config used when `--model` is absent.
pub const DEMO_MODEL: &str = "coca_demo";

/// A model config and the weights to start from (none: initialise from the seed).
pub struct ResolvedModel {
    pub config: CocaConfig,
    pub weights: Option<HashMap<String, Tensor>>,
    /// Which weights, from where (for the start-up log).
    pub origin: String,
}

/// Resolves `--model`, `--pretrained` and `--from_scratch`, fetching released weights through
/// `hub`, and says on stderr which weights it loads.
pub fn resolve_model(args: &PretrainArgs, hub: &Hub) -> Result<ResolvedModel> {
    let model = args.model.as_deref().unwrap_or(DEMO_MODEL);
    let request = Request {
        model,
        pretrained: args.pretrained.as_deref(),
        from_scratch: args.from_scratch,
        dir_weights_by_default: false,
    };
    let (config, chosen) = weights::resolve(request, hub)?;
    let origin = chosen.describe();
    tracing::info!("model: {model}; weights: {origin}");
    let weights = match chosen {
        Weights::File { path, .. } => {
            Some(load_for_model(&path, &config, DType::F32, &Device::Cpu)?)
        }
        Weights::Random => None,
    };
    Ok(ResolvedModel {
        config,
        weights,
        origin,
    })
}
