//! Where downloads come from and go: the cache folders of PaddleMIX and the Hugging Face hub,
//! the base URLs (overridable for mirrors) and the offline switches, read from the environment
//! once so that everything downstream takes them as a value (and tests can set their own).

use std::path::PathBuf;

/// `~` or `~/...` with `$HOME` put in; anything else unchanged.
pub fn expand_home(path: &str) -> PathBuf {
    let home = std::env::var_os("HOME");
    match (path, home) {
        ("~", Some(h)) => PathBuf::from(h),
        (p, Some(h)) if p.starts_with("~/") => PathBuf::from(h).join(&p[2..]),
        (p, _) => PathBuf::from(p),
    }
}

/// PaddleMIX's model host (`https://bj.bcebos.com/v1/paddlenlp/models/community`, as its CoCa
/// README links the weights); override with `COCA_PADDLEMIX_BASE_URL`.
pub const PADDLEMIX_MODELS_URL: &str = "https://bj.bcebos.com/v1/paddlenlp/models/community";
/// PaddleMIX's data-set host (`coco.tar` is under it); override with `COCA_PADDLEMIX_DATA_URL`.
pub const PADDLEMIX_DATA_URL: &str = "https://bj.bcebos.com/v1/paddlenlp/datasets/paddlemix";
/// The Hugging Face hub; override with `HF_ENDPOINT`, as `huggingface_hub` does.
pub const HF_ENDPOINT: &str = "https://huggingface.co";

/// The download settings of this process.
#[derive(Debug, Clone)]
pub struct HubEnv {
    /// `COCA_OFFLINE` or `HF_HUB_OFFLINE` is set to a true value: nothing is requested.
    pub offline: bool,
    /// PaddleMIX's `PPMIX_HOME` (default `~/.paddlemix`): `models/` and `datasets/` below it.
    pub ppmix_home: PathBuf,
    /// The Hugging Face hub cache (`HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`,
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`).
    pub hf_cache: PathBuf,
    /// The hub's base URL, without a trailing slash.
    pub hf_endpoint: String,
    /// PaddleMIX's model base URL, without a trailing slash.
    pub paddlemix_models_url: String,
    /// PaddleMIX's data-set base URL, without a trailing slash.
    pub paddlemix_data_url: String,
}

impl HubEnv {
    /// Reads the environment.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `get` (the environment, or a test's map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let truthy = |name: &str| {
            var(name).is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
        };
        let url = |name: &str, default: &str| {
            var(name)
                .unwrap_or_else(|| default.to_string())
                .trim_end_matches('/')
                .to_string()
        };
        let hf_cache = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(|p| expand_home(&p))
            .or_else(|| var("HF_HOME").map(|h| expand_home(&h).join("hub")))
            .or_else(|| var("XDG_CACHE_HOME").map(|c| expand_home(&c).join("huggingface/hub")))
            .unwrap_or_else(|| expand_home("~/.cache/huggingface/hub"));
        Self {
            offline: truthy("COCA_OFFLINE") || truthy("HF_HUB_OFFLINE"),
            ppmix_home: expand_home(&var("PPMIX_HOME").unwrap_or_else(|| "~/.paddlemix".into())),
            hf_cache,
            hf_endpoint: url("HF_ENDPOINT", HF_ENDPOINT),
            paddlemix_models_url: url("COCA_PADDLEMIX_BASE_URL", PADDLEMIX_MODELS_URL),
            paddlemix_data_url: url("COCA_PADDLEMIX_DATA_URL", PADDLEMIX_DATA_URL),
        }
    }

    /// PaddleMIX's `MODEL_HOME` (`$PPMIX_HOME/models`).
    pub fn paddlemix_model_home(&self) -> PathBuf {
        self.ppmix_home.join("models")
    }

    /// PaddleMIX's `DATA_HOME` (`$PPMIX_HOME/datasets`).
    pub fn paddlemix_data_home(&self) -> PathBuf {
        self.ppmix_home.join("datasets")
    }
}
