//! `--model` and `--pretrained` for the inference commands (`caption`, `eval`, `embed`), and a
//! key identifying the weights (for caches built from them).

use crate::checkpoint::load_for_model;
use crate::model::source::{resolve_config, WEIGHT_FILES};
use crate::model::{CoCa, CocaConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use clap::Args;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Which model to run.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A built-in config (`coca_ViT-B-32`, `coca_ViT-L-14`, `coca_demo`), a config JSON file, or
    /// a directory holding `config.json` (and weights such as `weights.safetensors`).
    #[arg(long)]
    pub model: String,
    /// The weights: a checkpoint (safetensors, torch .bin/.pt, paddle .pdparams). Default: the
    /// weights in the `--model` directory.
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
}

/// A model ready for inference, and where it came from.
pub struct LoadedModel {
    /// The model, float32 on the CPU.
    pub model: CoCa,
    /// The weight file loaded.
    pub weights_path: PathBuf,
    /// The config as JSON (part of the weights key).
    config_json: String,
}

impl LoadedModel {
    /// Hex digest of the config and the weight file's bytes: equal keys, equal model. Computed
    /// on demand (it reads the whole file): only cached results need it.
    pub fn weights_key(&self) -> Result<String> {
        weights_key(&self.weights_path, self.config_json.as_bytes())
    }
}

impl ModelArgs {
    /// Resolves the config and the weight file and loads them.
    pub fn load(&self) -> Result<LoadedModel> {
        let (config, weights_path) = self.locate()?;
        let weights = load_for_model(&weights_path, &config, DType::F32, &Device::Cpu)?;
        let model = CoCa::new(
            &config,
            VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        )
        .with_context(|| format!("building the model from {}", weights_path.display()))?;
        Ok(LoadedModel {
            model,
            weights_path,
            config_json: serde_json::to_string(&config)?,
        })
    }

    /// The config and the weight file, checked to exist, without reading the weights: what can
    /// be checked before the model is built.
    pub fn locate(&self) -> Result<(CocaConfig, PathBuf)> {
        let (config, dir) = resolve_config(&self.model)?;
        // Weights are looked for only in a `--model` directory, never beside a config file.
        let dir = dir.filter(|_| Path::new(&self.model).is_dir());
        let weights_path = match (&self.pretrained, &dir) {
            (Some(p), _) => p.clone(),
            (None, Some(dir)) => WEIGHT_FILES
                .iter()
                .map(|f| dir.join(f))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "--model {}: none of {} there; pass --pretrained FILE",
                        self.model,
                        WEIGHT_FILES.join(", ")
                    )
                })?,
            (None, None) => bail!(
                "--model {} has no weights beside it: pass --pretrained FILE",
                self.model
            ),
        };
        if !weights_path.is_file() {
            bail!("--pretrained {}: no such file", weights_path.display());
        }
        Ok((config, weights_path))
    }
}

/// A 128-bit hex digest (two independent 64-bit FNV-1a-style streams) of `extra` and the file's
/// bytes.
pub fn weights_key(path: &Path, extra: &[u8]) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = [0xCBF2_9CE4_8422_2325u64, 0x6C62_272E_07BB_0142u64];
    let mut mix = |bytes: &[u8]| {
        for &b in bytes {
            h[0] = (h[0] ^ b as u64).wrapping_mul(0x0100_0000_01B3);
            h[1] = (h[1] ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3 ^ 0x1F);
        }
    };
    mix(extra);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        mix(&buf[..n]);
    }
    Ok(format!("{:016x}{:016x}", h[0], h[1]))
}
