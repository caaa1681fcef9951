//! `coca-worker eval`: zero-shot classification, retrieval and captioning evaluations; each
//! prints one JSON line (accuracies and recalls in percent).

use super::caption::{caption_files, GenerateArgs};
use super::caption_metrics::{bleu4, cider, tokenize};
use super::image_batches::ImageBatches;
use super::karpathy::{read_eval_split, EvalImage};
use super::model_args::ModelArgs;
use super::{classification, retrieval};
use crate::atomic_file::write_bytes_atomically;
use crate::cli::parse_bool;
use crate::cli::precision::PrecisionArgs;
use crate::data::image_folder::ImageFolder;
use crate::distributed::context::RankContext;
use crate::distributed::share::{all_gather_strings, block};
use crate::hub::{Hub, HubEnv, NodeGate};
use crate::preflight::writable_dir;
use anyhow::{bail, Context, Result};
use clap::Args;
use coca_common::collective::Collective;
use std::path::{Path, PathBuf};
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
    /// Images (or texts) per forward pass (the seed's `--per_device_eval_batch_size`).
    #[arg(long, alias = "per-device-eval-batch-size", default_value_t = 32)]
    pub batch_size: usize,
    /// Threads decoding the images of every evaluation ahead of the model (0: the main
    /// thread, before each batch's forward pass).
    #[arg(long, default_value_t = 2)]
    pub dataloader_num_workers: usize,
    /// As in PaddleMIX, names the classifier cache:
    /// `DIR/{NAME}_{basename(DIR)}_classifier.safetensors` (unless `--classifier_cache`).
    #[arg(long)]
    pub pretrained_text_model: Option<String>,
    /// Also write the results and the settings to `DIR/eval_results.json`.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// No progress bar (there is none anyway when stderr is not a terminal).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub disable_tqdm: bool,
    /// The seed's precision flags: `--bf16 True`/`--fp16 True` compute the matrix products in
    /// half precision (autocast), everything else in float32.
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

/// Name of the results file `--output_dir` gets.
pub const RESULTS_FILE: &str = "eval_results.json";

/// What [`check`] found: the inputs, opened, and the model's files, not yet read.
pub struct CheckedInputs {
    folder: Option<ImageFolder>,
    retrieval: Option<Vec<EvalImage>>,
    captioning: Option<Vec<EvalImage>>,
}

/// Every check that does not need the model: flags, the model's config and weight file, the
/// data (folders listed, splits read), the output folder and file writable. Run before the
/// model is built (and by `coca-launch` once, before any worker starts).
pub fn check(args: &EvalArgs) -> Result<CheckedInputs> {
    if args.classification_eval.is_none() && args.retrieval.is_none() && args.captioning.is_none() {
        bail!(
            "nothing to evaluate: pass --classification_eval DIR, --retrieval FILE.json or \
             --captioning FILE.json"
        );
    }
    args.precision.check()?;
    if args.batch_size == 0 {
        bail!("--per_device_eval_batch_size must be at least 1");
    }
    args.model.check()?;
    let folder = match &args.classification_eval {
        Some(dir) => Some(
            ImageFolder::open(dir)
                .with_context(|| format!("--classification_eval {}", dir.display()))?,
        ),
        None => None,
    };
    let split = |flag: &str, json: &Option<PathBuf>| -> Result<Option<Vec<EvalImage>>> {
        json.as_ref()
            .map(|j| {
                read_eval_split(j, args.data_root.as_deref())
                    .with_context(|| format!("--{flag} {}", j.display()))
            })
            .transpose()
    };
    let retrieval = split("retrieval", &args.retrieval)?;
    let captioning = split("captioning", &args.captioning)?;
    if let Some(dir) = &args.output_dir {
        writable_dir(dir, "--output_dir")?;
    }
    if let Some(out) = &args.out {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        writable_dir(parent.unwrap_or(Path::new(".")), "--out's folder")?;
    }
    Ok(CheckedInputs {
        folder,
        retrieval,
        captioning,
    })
}

/// The classifier cache file: `--classifier_cache`, else PaddleMIX's name when
/// `--pretrained_text_model` is given, else `DIR/.coca_zeroshot_classifier.safetensors`.
fn classifier_cache_path(args: &EvalArgs, dir: &Path) -> Option<PathBuf> {
    if args.no_classifier_cache {
        return None;
    }
    if let Some(path) = &args.classifier_cache {
        return Some(path.clone());
    }
    Some(match &args.pretrained_text_model {
        Some(name) => dir.join(classification::paddlemix_classifier_file(name, dir)),
        None => dir.join(".coca_zeroshot_classifier.safetensors"),
    })
}

/// Runs the evaluations asked for and returns their JSON lines (on rank 0; other ranks of a
/// launched job share the work and return nothing). With `--output_dir`, rank 0 also writes
/// them, with the settings, to [`RESULTS_FILE`] there.
pub fn run(args: &EvalArgs) -> Result<Vec<serde_json::Value>> {
    let inputs = check(args)?;
    let ctx = RankContext::from_env(1, 1)?;
    let hub = Hub::new(HubEnv::from_env(), NodeGate::for_rank(&ctx)?);
    let lines = evaluate(args, inputs, &ctx.world, &hub)?;
    if !ctx.is_main() {
        return Ok(Vec::new());
    }
    if let Some(dir) = &args.output_dir {
        let path = dir.join(RESULTS_FILE);
        let record = serde_json::json!({
            "results": &lines,
            "settings": settings(args, ctx.world.size()),
        });
        write_bytes_atomically(
            &path,
            (serde_json::to_string_pretty(&record)? + "\n").as_bytes(),
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(lines)
}

/// The settings an evaluation ran with, as its results file records them.
fn settings(args: &EvalArgs, world: usize) -> serde_json::Value {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    serde_json::json!({
        "model": &args.model.model,
        "pretrained": &args.model.pretrained,
        "classification_eval": path(&args.classification_eval),
        "retrieval": path(&args.retrieval),
        "captioning": path(&args.captioning),
        "per_device_eval_batch_size": args.batch_size,
        "dataloader_num_workers": args.dataloader_num_workers,
        "pretrained_text_model": &args.pretrained_text_model,
        "classifier_cache": args
            .classification_eval
            .as_ref()
            .and_then(|d| classifier_cache_path(args, d))
            .map(|p| p.display().to_string()),
        "precision": args.precision.describe(),
        "world_size": world,
    })
}

/// The evaluations, each rank of `comm` taking one block of the images and texts.
fn evaluate(
    args: &EvalArgs,
    inputs: CheckedInputs,
    comm: &Arc<dyn Collective>,
    hub: &Hub,
) -> Result<Vec<serde_json::Value>> {
    let loaded = args.model.load_with(hub, args.precision.autocast())?;
    let batches = ImageBatches {
        batch_size: args.batch_size,
        decode_threads: args.dataloader_num_workers,
        progress: !args.disable_tqdm && comm.rank() == 0,
    };
    let mut lines = Vec::new();
    if let (Some(dir), Some(folder)) = (&args.classification_eval, &inputs.folder) {
        let cache = classifier_cache_path(args, dir);
        // The key only names cached classifiers; without a cache the file is not hashed.
        let key = match cache {
            Some(_) => loaded.weights_key()?,
            None => String::new(),
        };
        let result =
            classification::evaluate(&loaded.model, &key, folder, cache.as_deref(), batches, comm)?;
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
    if let (Some(json), Some(split)) = (&args.retrieval, &inputs.retrieval) {
        let r = retrieval::evaluate(&loaded.model, split, &batches, comm)?;
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
    if let (Some(json), Some(split)) = (&args.captioning, &inputs.captioning) {
        let opts = args.generate.options(&loaded.model);
        let paths: Vec<PathBuf> = split.iter().map(|i| i.path.clone()).collect();
        let mine = block(paths.len(), comm.rank(), comm.size());
        let captions = caption_files(&loaded.model, &paths[mine], &opts, &batches)?;
        let captions = all_gather_strings(comm.as_ref(), &captions)?;
        if let (Some(out), 0) = (&args.out, comm.rank()) {
            let mut text = String::new();
            for (image, caption) in split.iter().zip(&captions) {
                text.push_str(
                    &serde_json::json!({"image": image.name, "caption": caption}).to_string(),
                );
                text.push('\n');
            }
            write_bytes_atomically(out, text.as_bytes())
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
