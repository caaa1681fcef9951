//! `coca-worker eval`: zero-shot classification, retrieval and captioning evaluations; each
//! prints one JSON line (accuracies and recalls in percent).

use super::caption::{caption_files, GenerateArgs};
use super::caption_metrics::{bleu4, cider, tokenize};
use super::karpathy::read_eval_split;
use super::model_args::ModelArgs;
use super::{classification, retrieval};
use crate::data::image_folder::ImageFolder;
use crate::distributed::context::RankContext;
use crate::distributed::share::{all_gather_strings, block};
use crate::hub::{Hub, HubEnv, NodeGate};
use anyhow::{bail, Context, Result};
use clap::Args;
use coca_common::collective::Collective;
use std::path::PathBuf;
use std::sync::Arc;

/// `coca-worker eval` flags.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// The model.
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
    /// Image↔text recall@1/5/10 on a Karpathy-format split (`[{"image", "caption"}]`).
    #[arg(long)]
    pub retrieval: Option<PathBuf>,
    /// Caption every image of a Karpathy-format split and score BLEU-4 and CIDEr against its
    /// captions.
    #[arg(long)]
    pub captioning: Option<PathBuf>,
    /// Where `--captioning` writes the generated captions (JSON lines `{"image", "caption"}`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Generation settings for `--captioning`.
    #[command(flatten)]
    pub generate: GenerateArgs,
    /// Folder the split's images are relative to. Default: the JSON file's folder.
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Images (or texts) per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

/// Runs the evaluations asked for and returns their JSON lines (on rank 0; other ranks of a
/// launched job share the work and return nothing).
pub fn run(args: &EvalArgs) -> Result<Vec<serde_json::Value>> {
    let ctx = RankContext::from_env(1, 1)?;
    let hub = Hub::new(HubEnv::from_env(), NodeGate::for_rank(&ctx)?);
    let lines = evaluate(args, &ctx.world, &hub)?;
    Ok(if ctx.is_main() { lines } else { Vec::new() })
}

/// The evaluations, each rank of `comm` taking one block of the images and texts.
fn evaluate(
    args: &EvalArgs,
    comm: &Arc<dyn Collective>,
    hub: &Hub,
) -> Result<Vec<serde_json::Value>> {
    if args.classification_eval.is_none() && args.retrieval.is_none() && args.captioning.is_none() {
        bail!(
            "nothing to evaluate: pass --classification_eval DIR, --retrieval FILE.json or \
             --captioning FILE.json"
        );
    }
    let loaded = args.model.load_with(hub)?;
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
        // The key only names cached classifiers; without a cache the file is not hashed.
        let key = match cache {
            Some(_) => loaded.weights_key()?,
            None => String::new(),
        };
        let result = classification::evaluate(
            &loaded.model,
            &key,
            &folder,
            cache.as_deref(),
            args.batch_size,
            comm,
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
    if let Some(json) = &args.retrieval {
        let split = read_eval_split(json, args.data_root.as_deref())?;
        let r = retrieval::evaluate(&loaded.model, &split, args.batch_size, comm)?;
        let mut line = serde_json::json!({
            "eval": "retrieval",
            "file": json.display().to_string(),
            "images": r.images,
            "texts": r.texts,
        });
        for (i, k) in retrieval::KS.iter().enumerate() {
            line[format!("image_to_text_R@{k}")] = r.image_to_text[i].into();
            line[format!("text_to_image_R@{k}")] = r.text_to_image[i].into();
        }
        lines.push(line);
    }
    if let Some(json) = &args.captioning {
        let split = read_eval_split(json, args.data_root.as_deref())?;
        let opts = args.generate.options(&loaded.model);
        let paths: Vec<PathBuf> = split.iter().map(|i| i.path.clone()).collect();
        let mine = block(paths.len(), comm.rank(), comm.size());
        let captions = caption_files(&loaded.model, &paths[mine], &opts, args.batch_size)?;
        let captions = all_gather_strings(comm.as_ref(), &captions)?;
        if let (Some(out), 0) = (&args.out, comm.rank()) {
            let mut text = String::new();
            for (image, caption) in split.iter().zip(&captions) {
                text.push_str(
                    &serde_json::json!({"image": image.name, "caption": caption}).to_string(),
                );
                text.push('\n');
            }
            std::fs::write(out, text)
                .with_context(|| format!("cannot write --out {}", out.display()))?;
        }
        let hyps: Vec<Vec<String>> = captions.iter().map(|c| tokenize(c)).collect();
        let refs: Vec<Vec<Vec<String>>> = split
            .iter()
            .map(|i| i.captions.iter().map(|c| tokenize(c)).collect())
            .collect();
        lines.push(serde_json::json!({
            "eval": "captioning",
            "file": json.display().to_string(),
            "images": split.len(),
            "BLEU-4": bleu4(&hyps, &refs),
            "CIDEr": cider(&hyps, &refs),
        }));
    }
    Ok(lines)
}
