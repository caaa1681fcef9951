//! PaddleMIX's released CoCa weights by name: `--model paddlemix/CoCa/<name>` loads
//! `model_state.pdparams` from PaddleMIX's model cache, `$PPMIX_HOME/models/paddlemix/CoCa/<name>/`
//! (PaddleMIX's `resolve_cache_dir` joins `MODEL_HOME` and the name), or downloads it from
//! PaddleMIX's host, `<base>/paddlemix/CoCa/<name>/model_state.pdparams`, into that folder.

use super::{Expected, Hub, HubEnv};
use anyhow::{bail, Result};
use std::path::PathBuf;

/// The prefix of PaddleMIX's CoCa names.
pub const PREFIX: &str = "paddlemix/CoCa/";
/// The weight file of a PaddleMIX model folder.
pub const WEIGHT_FILE: &str = "model_state.pdparams";

/// The released names, as PaddleMIX's CoCa model zoo lists them, with the built-in config of
/// each.
pub const RELEASES: &[(&str, &str)] = &[
    ("CoCa-ViT-B-32-laion2B-s13B-b90k", "coca_ViT-B-32"),
    ("CoCa-ViT-L-14-laion2B-s13B-b90k", "coca_ViT-L-14"),
    (
        "mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k",
        "coca_ViT-B-32",
    ),
    (
        "mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k",
        "coca_ViT-L-14",
    ),
];

/// A released model named by `--model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The name after [`PREFIX`].
    pub name: &'static str,
    /// The built-in config it uses.
    pub config: &'static str,
}

/// `Some` for `paddlemix/CoCa/<released name>`; an error for another name under the prefix
/// (listing the released ones); `None` for anything else.
pub fn release(model: &str) -> Result<Option<Release>> {
    let Some(name) = model.strip_prefix(PREFIX) else {
        return Ok(None);
    };
    match RELEASES.iter().find(|(n, _)| *n == name) {
        Some((name, config)) => Ok(Some(Release { name, config })),
        None => bail!(
            "--model {model}: PaddleMIX released no CoCa of that name; the released ones are {}",
            RELEASES
                .iter()
                .map(|(n, _)| format!("{PREFIX}{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

impl Release {
    /// PaddleMIX's cache folder of this model.
    pub fn cache_dir_in(&self, env: &HubEnv) -> PathBuf {
        env.paddlemix_model_home()
            .join(PREFIX.trim_end_matches('/'))
            .join(self.name)
    }

    /// Where PaddleMIX serves its weights.
    pub fn url(&self, hub: &Hub) -> String {
        format!(
            "{}/{PREFIX}{}/{WEIGHT_FILE}",
            hub.env.paddlemix_models_url, self.name
        )
    }

    /// The weight file: from the cache, else downloaded into it (one rank per node).
    pub fn weights(&self, hub: &Hub) -> Result<PathBuf> {
        let dest = self.cache_dir_in(&hub.env).join(WEIGHT_FILE);
        let url = self.url(hub);
        hub.gate.once(&url, |may_download| {
            hub.downloader(may_download)
                .fetch(&url, &dest, &Expected::default())?;
            Ok(dest.clone())
        })
    }
}
