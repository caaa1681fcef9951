//! Zero-shot classification: a classifier from class names and prompt templates.

use crate::data::tokenizer::ClipTokenizer;
use crate::model::coca::l2_normalize;
use crate::model::CoCa;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, D};

/// `[embed_dim, classes]`: per class, the mean over templates of the normalised text
/// embeddings, renormalised (open_clip's `build_zero_shot_classifier`).
pub fn zero_shot_classifier(
    model: &CoCa,
    tokenizer: &ClipTokenizer,
    classnames: &[String],
    templates: &[String],
    device: &Device,
) -> Result<Tensor> {
    ensure!(
        !classnames.is_empty() && !templates.is_empty(),
        "no class names or no templates"
    );
    let ctx = model.config.text_cfg.context_length;
    let mut columns = Vec::with_capacity(classnames.len());
    for name in classnames {
        let ids: Vec<u32> = templates
            .iter()
            .flat_map(|t| tokenizer.tokenize(&t.replace("{}", name), ctx))
            .collect();
        let ids = Tensor::from_vec(ids, (templates.len(), ctx), device)?;
        let (features, _) = model.encode_text(&ids)?;
        let mean = features.mean(0)?;
        columns.push(l2_normalize(&mean.unsqueeze(0)?)?.squeeze(0)?);
    }
    Ok(Tensor::stack(&columns, 1)?)
}

/// `100 · image_features · classifier`, `[B, classes]`.
pub fn zero_shot_logits(image_features: &Tensor, classifier: &Tensor) -> Result<Tensor> {
    Ok((image_features.matmul(classifier)? * 100.0)?)
}

/// Top-1 and top-k accuracy (fractions) of `logits` `[B, C]` against `labels`.
pub fn top_k_accuracy(logits: &Tensor, labels: &[usize], k: usize) -> Result<(f64, f64)> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    ensure!(
        rows.len() == labels.len(),
        "{} logits rows for {} labels",
        rows.len(),
        labels.len()
    );
    let (mut top1, mut topk) = (0usize, 0usize);
    for (row, &label) in rows.iter().zip(labels) {
        let better = row.iter().filter(|&&v| v > row[label]).count();
        top1 += usize::from(better == 0);
        topk += usize::from(better < k);
    }
    let n = labels.len().max(1) as f64;
    Ok((top1 as f64 / n, topk as f64 / n))
}

/// Index of the largest logit per row.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<usize>> {
    Ok(logits
        .argmax(D::Minus1)?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|i| i as usize)
        .collect())
}
