//! Zero-shot classification of an ImageFolder (`eval --classification_eval DIR`), with the
//! text classifier cached in a file keyed by the weights, class names and templates.

use super::host_gather::gather_rows_via_host;
use super::image_batches::ImageBatches;
use super::zeroshot::{zero_shot_classifier, zero_shot_logits};
use crate::data::image_folder::ImageFolder;
use crate::data::tokenizer::ClipTokenizer;
use crate::distributed::share::block;
use crate::model::CoCa;
use crate::rng::hash_str;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use coca_common::collective::{Collective, ReduceOp};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Zero-shot accuracy in percent; `top5` is `None` below 5 classes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassificationResult {
    /// Top-1 accuracy, percent.
    pub top1: f64,
    /// Top-5 accuracy, percent (absent below 5 classes).
    pub top5: Option<f64>,
    /// Images evaluated.
    pub images: usize,
    /// Number of classes.
    pub classes: usize,
    /// Whether the classifier came from the cache file.
    pub classifier_cached: bool,
}

/// The cache key of a classifier: the weights' key, the class names and the templates.
pub fn classifier_key(weights_key: &str, classnames: &[String], templates: &[String]) -> String {
    let text = format!(
        "{weights_key}\u{1}{}\u{1}{}",
        classnames.join("\u{2}"),
        templates.join("\u{2}")
    );
    format!("{weights_key}-{:016x}", hash_str(&text))
}

/// PaddleMIX's name for the classifier of `pretrained_text_model` on the folder `dir`:
/// `{pretrained_text_model}_{basename(dir)}_classifier` (`.safetensors` here, not `.pdparams`).
pub fn paddlemix_classifier_file(pretrained_text_model: &str, dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let base = dir
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{pretrained_text_model}_{base}_classifier.safetensors")
}

/// The classifier stored at `path` when its key is `key`.
fn read_cached(path: &Path, key: &str) -> Option<Tensor> {
    let bytes = std::fs::read(path).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    if meta.metadata().as_ref()?.get("key")? != key {
        return None;
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).ok()?;
    tensors.get("classifier").cloned()
}

/// Writes the classifier with its key.
fn write_cached(path: &Path, key: &str, classifier: &Tensor) -> Result<()> {
    let (rows, cols) = classifier.dims2()?;
    let data: Vec<f32> = classifier.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, cols], &bytes)
            .context("classifier tensor")?;
    let meta = HashMap::from([("key".to_string(), key.to_string())]);
    let out = safetensors::serialize([("classifier", view)], Some(meta))
        .context("serialising the classifier")?;
    std::fs::write(path, out)
        .with_context(|| format!("cannot write the classifier cache {}", path.display()))
}

/// The classifier for `folder`: read from `cache` when its key matches, else built — each rank
/// of `comm` embedding one block of the classes — and written to `cache` by rank 0 when given
/// (a failed write is a warning). Returns it and whether it was cached.
pub fn folder_classifier(
    model: &CoCa,
    weights_key: &str,
    folder: &ImageFolder,
    cache: Option<&Path>,
    comm: &Arc<dyn Collective>,
) -> Result<(Tensor, bool)> {
    let key = classifier_key(weights_key, folder.classnames(), folder.templates());
    let cached = cache
        .and_then(|p| read_cached(p, &key))
        .and_then(|c| c.to_device(model.device()).ok())
        .filter(|c| c.dims2().ok() == Some((model.config.embed_dim, folder.classnames().len())));
    // Every rank must agree on whether to build it (building takes collectives).
    let mut found = [f32::from(u8::from(cached.is_some()))];
    comm.all_reduce(&mut found, ReduceOp::Sum)
        .context("agreeing on the classifier cache")?;
    if found[0] as usize == comm.size() {
        if let Some(c) = cached {
            return Ok((c, true));
        }
    }
    let tokenizer = ClipTokenizer::new()?;
    let names = &folder.classnames()[block(folder.classnames().len(), comm.rank(), comm.size())];
    // A rank with no class (fewer classes than ranks) sends an empty host tensor.
    let mine = if names.is_empty() {
        Tensor::zeros((0, model.config.embed_dim), DType::F32, &Device::Cpu)?
    } else {
        zero_shot_classifier(model, &tokenizer, names, folder.templates(), model.device())?
            .t()?
            .contiguous()?
    };
    let classifier = gather_rows_via_host(&mine, comm, model.device())?
        .t()?
        .contiguous()?;
    if let (Some(p), 0) = (cache, comm.rank()) {
        if let Err(e) = write_cached(p, &key, &classifier) {
            tracing::warn!("{e:#}; the classifier will be rebuilt next time");
        }
    }
    Ok((classifier, false))
}

/// Zero-shot top-1/top-5 of `model` on `folder`, read as `batches` says. Each rank of `comm`
/// classifies one block of the images and the hits are summed, so the result is the same for any
/// number of ranks.
pub fn evaluate(
    model: &CoCa,
    weights_key: &str,
    folder: &ImageFolder,
    cache: Option<&Path>,
    batches: ImageBatches,
    comm: &Arc<dyn Collective>,
) -> Result<ClassificationResult> {
    ensure!(
        batches.batch_size > 0,
        "--per_device_eval_batch_size must be positive"
    );
    ensure!(
        !folder.is_empty(),
        "{} holds no images",
        folder.root().display()
    );
    let (classifier, cached) = folder_classifier(model, weights_key, folder, cache, comm)?;
    let classes = folder.classnames().len();
    let size = model.config.vision_cfg.image_size;
    let mine = block(folder.len(), comm.rank(), comm.size());
    let (mut top1, mut top5) = (0usize, 0usize);
    let indices: Vec<usize> = mine.collect();
    let decode = |i: usize| -> Result<(Vec<f32>, usize)> {
        let (image, label) = folder.get(indices[i])?;
        Ok((image.eval_transform(size), label))
    };
    batches.for_each(
        "zero-shot",
        indices.len(),
        size,
        model.device(),
        decode,
        |_, images, labels| {
            let features = model.image_features(&images)?;
            let logits = zero_shot_logits(&features, &classifier)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (row, &label) in logits.iter().zip(&labels) {
                let better = row.iter().filter(|&&v| v > row[label]).count();
                top1 += usize::from(better == 0);
                top5 += usize::from(better < 5);
            }
            Ok(())
        },
    )?;
    let mut hits = [top1 as f32, top5 as f32];
    comm.all_reduce(&mut hits, ReduceOp::Sum)
        .context("summing zero-shot hits over the ranks")?;
    let (top1, top5) = (hits[0] as usize, hits[1] as usize);
    let n = folder.len() as f64;
    Ok(ClassificationResult {
        top1: 100.0 * top1 as f64 / n,
        top5: (classes >= 5).then(|| 100.0 * top5 as f64 / n),
        images: folder.len(),
        classes,
        classifier_cached: cached,
    })
}
