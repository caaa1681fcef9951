//! `--model` and `--pretrained` for the inference commands (`caption`, `eval`, `embed`), and a
//! key identifying the weights (for caches built from them).

use crate::checkpoint::load_for_model;
use crate::device::DeviceArgs;
use crate::hub::source::resolve_config_in;
use crate::hub::weights::{self, Request, Weights};
use crate::hub::{hf, paddlemix, Hub, HubEnv};
use crate::model::autocast::Autocast;
use crate::model::tensor_parallel::TensorParallel;
use crate::model::CoCa;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use clap::Args;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Which model to run.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A built-in config (`coca_ViT-B-32`, `coca_ViT-L-14`, `coca_demo`), a PaddleMIX name
    /// (`paddlemix/CoCa/<name>`: its released weights, fetched when not cached), a config JSON
    /// file, or a directory holding `config.json` (and weights such as `weights.safetensors`).
    #[arg(long)]
    pub model: String,
    /// The weights: a checkpoint (safetensors, torch .bin/.pt, paddle .pdparams) or an open_clip
    /// tag of a built-in config (`laion2b_s13b_b90k`, `mscoco_finetuned_laion2b_s13b_b90k`).
    /// Default: a PaddleMIX name's release, or the weights in the `--model` directory.
    #[arg(long)]
    pub pretrained: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// A model ready for inference, and where it came from.
pub struct LoadedModel {
    /// The model, float32 on `device`.
    pub model: CoCa,
    /// Where the model computes (`--device`).
    pub device: Device,
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
    /// Resolves the config and the weight file (fetching released weights) and loads them.
    pub fn load(&self) -> Result<LoadedModel> {
        self.load_with(&Hub::from_env(), Autocast::off())
    }

    /// [`load`](Self::load) with released weights fetched through `hub` (one rank per node),
    /// the model computing its matrix products as `autocast` says (`--bf16`/`--fp16`).
    pub fn load_with(&self, hub: &Hub, autocast: Autocast) -> Result<LoadedModel> {
        let request = Request {
            model: &self.model,
            pretrained: self.pretrained.as_deref(),
            from_scratch: false,
            dir_weights_by_default: true,
        };
        let device = self.device.open()?;
        crate::cuda_setup::check_precision(&device, autocast.compute_dtype())?;
        let (config, weights) = weights::resolve(request, hub)?;
        let Weights::File { path, origin } = weights else {
            bail!(
                "--model {}: no weights to evaluate (random weights are for training); pass \
                 --pretrained FILE or a released model",
                self.model
            );
        };
        tracing::info!("weights: {origin}");
        let tensors = load_for_model(&path, &config, DType::F32, &device)?;
        let model = CoCa::new_parallel(
            &config,
            VarBuilder::from_tensors(tensors, DType::F32, &device),
            &TensorParallel::single().with_autocast(autocast),
        )
        .with_context(|| format!("building the model from {}", path.display()))?;
        Ok(LoadedModel {
            model,
            device,
            weights_path: path,
            config_json: serde_json::to_string(&config)?,
        })
    }

    /// What can be checked before the model is built (and before anything is downloaded): the
    /// config resolves, and `--pretrained` is a file, a flag or a released tag of the model.
    pub fn check(&self) -> Result<()> {
        self.device.check()?;
        resolve_config_in(&self.model, &HubEnv::from_env())?;
        let Some(pretrained) = self.pretrained.as_deref() else {
            return Ok(());
        };
        let is_flag = crate::cli::parse_bool(pretrained).is_ok();
        let config = paddlemix::release(&self.model)?.map_or(self.model.as_str(), |r| r.config);
        if !is_flag
            && hf::tag_repo(config, pretrained).is_none()
            && !Path::new(pretrained).is_file()
        {
            bail!(
                "--pretrained {pretrained}: no such file, and not a released tag of --model {}",
                self.model
            );
        }
        Ok(())
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
