//! The model configuration: open_clip's model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`,
//! `multimodal_cfg`) with open_clip's defaults for absent keys.
//!
//! Unknown keys are rejected rather than ignored, and keys whose non-default values this
//! implementation does not support (LayerScale, patch dropout, other pooling types, ...) are
//! validated: a configuration we cannot honour is an error, never a silently different model.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Configs shipped inside the binary, addressable by name (open_clip's model names).
const NAMED_CONFIGS: &[(&str, &str)] = &[
    ("coca_ViT-B-32", include_str!("configs/coca_ViT-B-32.json")),
    ("coca_ViT-L-14", include_str!("configs/coca_ViT-L-14.json")),
    // Sized to learn the built-in synthetic set on a 2-core CPU in minutes.
    ("coca_demo", include_str!("configs/coca_demo.json")),
];

/// A whole CoCa model: the two towers, the multimodal decoder and the shared embedding width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CocaConfig {
    /// Width of the contrastive embedding and of the image tokens fed to the decoder.
    pub embed_dim: usize,
    pub vision_cfg: VisionConfig,
    pub text_cfg: TextConfig,
    pub multimodal_cfg: MultimodalConfig,
    /// open_clip's flag for its custom text tower; CoCa always uses it.
    #[serde(default)]
    pub custom_text: bool,
    /// `x · sigmoid(1.702 x)` instead of exact GELU (OpenAI's original CLIP weights).
    #[serde(default)]
    pub quick_gelu: bool,
}

/// The image tower: a ViT with an attentional pooler (open_clip's `CLIPVisionCfg`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VisionConfig {
    pub layers: usize,
    pub width: usize,
    pub head_width: usize,
    pub mlp_ratio: f64,
    pub patch_size: usize,
    pub image_size: usize,
    pub ls_init_value: Option<f64>,
    pub patch_dropout: f64,
    pub attentional_pool: bool,
    pub attn_pooler_queries: usize,
    pub attn_pooler_heads: usize,
    pub no_ln_pre: bool,
    pub pos_embed_type: String,
    pub final_ln_after_pool: bool,
    pub pool_type: String,
    pub output_tokens: bool,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            layers: 12,
            width: 768,
            head_width: 64,
            mlp_ratio: 4.0,
            patch_size: 16,
            image_size: 224,
            ls_init_value: None,
            patch_dropout: 0.0,
            attentional_pool: false,
            attn_pooler_queries: 256,
            attn_pooler_heads: 8,
            no_ln_pre: false,
            pos_embed_type: "learnable".into(),
            final_ln_after_pool: false,
            pool_type: "tok".into(),
            output_tokens: false,
        }
    }
}

/// The text tower (open_clip's `CLIPTextCfg`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextConfig {
    pub context_length: usize,
    pub vocab_size: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub mlp_ratio: f64,
    pub ls_init_value: Option<f64>,
    pub embed_cls: bool,
    pub pad_id: u32,
    pub no_causal_mask: bool,
    /// `false` keeps the legacy (off-by-one) cls/pad mask the released CoCa weights were
    /// trained with.
    pub correct_cls_mask: bool,
    pub pool_type: String,
    pub proj_type: String,
    pub proj_bias: bool,
    pub output_tokens: bool,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            context_length: 77,
            vocab_size: 49408,
            width: 512,
            heads: 8,
            layers: 12,
            mlp_ratio: 4.0,
            ls_init_value: None,
            embed_cls: false,
            pad_id: 0,
            no_causal_mask: false,
            correct_cls_mask: false,
            pool_type: "argmax".into(),
            proj_type: "linear".into(),
            proj_bias: false,
            output_tokens: false,
        }
    }
}

/// The multimodal text decoder (open_clip's `MultimodalCfg`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MultimodalConfig {
    pub context_length: usize,
    pub vocab_size: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub mlp_ratio: f64,
    pub ls_init_value: Option<f64>,
    pub dim_head: usize,
    pub n_queries: usize,
    /// Present in open_clip's configs; the pooler's heads come from `vision_cfg`.
    pub attn_pooler_heads: usize,
}

impl Default for MultimodalConfig {
    fn default() -> Self {
        Self {
            context_length: 77,
            vocab_size: 49408,
            width: 512,
            heads: 8,
            layers: 12,
            mlp_ratio: 4.0,
            ls_init_value: None,
            dim_head: 64,
            n_queries: 256,
            attn_pooler_heads: 8,
        }
    }
}

impl CocaConfig {
    /// The names of the configs built into the binary.
    pub fn named_configs() -> impl Iterator<Item = &'static str> {
        NAMED_CONFIGS.iter().map(|(name, _)| *name)
    }

    /// A config built into the binary, by open_clip's model name (`coca_ViT-B-32`, ...).
    pub fn named(name: &str) -> Result<Self> {
        let (_, json) = NAMED_CONFIGS
            .iter()
            .find(|(n, _)| *n == name)
            .with_context(|| {
                format!(
                    "no built-in model config named {name:?}; built-in: {}",
                    Self::named_configs().collect::<Vec<_>>().join(", ")
                )
            })?;
        Self::from_json(json).with_context(|| format!("built-in config {name}"))
    }

    /// Parses and validates an open_clip model-config JSON text.
    pub fn from_json(json: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(json).context("invalid model config JSON")?;
        config.validate()?;
        Ok(config)
    }

    /// Reads an open_clip model-config JSON file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("model config {}", path.display()))
    }

    /// A built-in name, or the path of a config JSON file.
    pub fn resolve(name_or_path: &str) -> Result<Self> {
        let path = Path::new(name_or_path);
        if path.is_file() {
            Self::from_file(path)
        } else {
            Self::named(name_or_path)
        }
    }

    /// Checks that every setting is one this implementation computes exactly as open_clip does.
    pub fn validate(&self) -> Result<()> {
        let v = &self.vision_cfg;
        let t = &self.text_cfg;
        let m = &self.multimodal_cfg;
        ensure!(self.embed_dim > 0, "embed_dim must be positive");
        ensure!(
            !self.quick_gelu,
            "quick_gelu is not supported (CoCa uses exact GELU)"
        );
        ensure!(
            v.attentional_pool,
            "vision_cfg.attentional_pool must be true: CoCa pools image tokens with attention"
        );
        for (what, ls) in [
            ("vision_cfg", v.ls_init_value),
            ("text_cfg", t.ls_init_value),
            ("multimodal_cfg", m.ls_init_value),
        ] {
            ensure!(
                ls.is_none(),
                "{what}.ls_init_value (LayerScale) is not supported"
            );
        }
        ensure!(
            v.patch_dropout == 0.0,
            "vision_cfg.patch_dropout is not supported"
        );
        ensure!(!v.no_ln_pre, "vision_cfg.no_ln_pre is not supported");
        ensure!(
            !v.final_ln_after_pool,
            "vision_cfg.final_ln_after_pool is not supported"
        );
        ensure!(
            v.pool_type == "tok",
            "vision_cfg.pool_type {:?} is not supported",
            v.pool_type
        );
        ensure!(
            v.pos_embed_type == "learnable",
            "vision_cfg.pos_embed_type {:?} is not supported",
            v.pos_embed_type
        );
        ensure!(
            v.patch_size > 0 && v.image_size.is_multiple_of(v.patch_size),
            "vision_cfg.image_size {} must be a multiple of patch_size {}",
            v.image_size,
            v.patch_size
        );
        ensure!(
            v.head_width > 0 && v.width.is_multiple_of(v.head_width),
            "vision_cfg.width {} must be a multiple of head_width {}",
            v.width,
            v.head_width
        );
        ensure!(
            v.attn_pooler_queries >= 2,
            "vision_cfg.attn_pooler_queries must be at least 2"
        );
        divides(
            "vision_cfg.attn_pooler_heads",
            v.attn_pooler_heads,
            "embed_dim",
            self.embed_dim,
        )?;
        ensure!(
            t.embed_cls,
            "text_cfg.embed_cls must be true: CoCa appends a cls token"
        );
        ensure!(
            !t.no_causal_mask,
            "text_cfg.no_causal_mask is not supported"
        );
        ensure!(
            t.proj_type == "linear" && !t.proj_bias,
            "text_cfg.proj_type {:?} with proj_bias {} is not supported",
            t.proj_type,
            t.proj_bias
        );
        divides("text_cfg.heads", t.heads, "text_cfg.width", t.width)?;
        divides(
            "multimodal_cfg.heads",
            m.heads,
            "multimodal_cfg.width",
            m.width,
        )?;
        ensure!(
            m.width == self.embed_dim,
            "multimodal_cfg.width {} must equal embed_dim {}: the decoder cross-attends to the \
             pooled image tokens",
            m.width,
            self.embed_dim
        );
        ensure!(
            t.width == m.width,
            "text_cfg.width {} must equal multimodal_cfg.width {}: the decoder reads the text \
             tower's tokens",
            t.width,
            m.width
        );
        ensure!(
            t.context_length <= m.context_length,
            "text_cfg.context_length {} exceeds multimodal_cfg.context_length {}",
            t.context_length,
            m.context_length
        );
        ensure!(
            t.vocab_size > 0 && m.vocab_size > 0,
            "vocab_size must be positive"
        );
        Ok(())
    }

    /// Number of attention heads in the image tower.
    pub fn vision_heads(&self) -> usize {
        self.vision_cfg.width / self.vision_cfg.head_width
    }
}

fn divides(what: &str, heads: usize, of: &str, width: usize) -> Result<()> {
    if heads == 0 || !width.is_multiple_of(heads) {
        bail!("{what} = {heads} must divide {of} = {width}");
    }
    Ok(())
}

/// Hidden width of an MLP block: `int(width · mlp_ratio)` as open_clip computes it.
pub fn mlp_width(width: usize, mlp_ratio: f64) -> usize {
    (width as f64 * mlp_ratio) as usize
}
