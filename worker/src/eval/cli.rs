//! `coca-worker eval`: zero-shot classification, retrieval and captioning evaluations; each
//! prints one JSON line.

use super::classification;
use super::model_args::ModelArgs;
use crate::data::image_folder::ImageFolder;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

/// `coca-worker eval` flags.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Zero-shot top-1/top-5 on an ImageFolder (`DIR/images/<class>/...`, optional
    /// `labels.txt` and `templates.txt`).
    #[arg(long)]
    pub classification_eval: Option<PathBuf>,
    /// Where the zero-shot classifier is cached (rebuilt when the weights, class names or
    /// templates change). Default: `DIR/.coca_zeroshot_classifier.safetensors`.
    #[arg(long)]
    pub classifier_cache: Option<PathBuf>,
    /// Do not read or write the classifier cache.
    #[arg(long)]
    pub no_classifier_cache: bool,
    /// Images (or texts) per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

/// Runs the evaluations asked for and returns their JSON lines.
pub fn run(args: &EvalArgs) -> Result<Vec<serde_json::Value>> {
    if args.classification_eval.is_none() {
        bail!("nothing to evaluate: pass --classification_eval DIR");
    }
    let loaded = args.model.load()?;
    let mut lines = Vec::new();
    if let Some(dir) = &args.classification_eval {
        let folder = ImageFolder::open(dir)?;
        let cache = if args.no_classifier_cache {
            None
        } else {
            Some(
                args.classifier_cache
                    .clone()
                    .unwrap_or_else(|| dir.join(".coca_zeroshot_classifier.safetensors")),
            )
        };
        let result = classification::evaluate(
            &loaded.model,
            &loaded.weights_key,
            &folder,
            cache.as_deref(),
            args.batch_size,
        )?;
        lines.push(serde_json::json!({
            "eval": "classification",
            "dir": dir.display().to_string(),
            "top1": result.top1,
            "top5": result.top5,
            "images": result.images,
            "classes": result.classes,
            "classifier_cached": result.classifier_cached,
        }));
    }
    Ok(lines)
}
