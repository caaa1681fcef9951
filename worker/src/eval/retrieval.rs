//! Image↔text retrieval recall@k on a Karpathy split, as clip_benchmark counts it: every
//! caption is a query and a candidate; an image query is right at k when any of its captions is
//! among the k best texts, a text query when its image is among the k best images.

use super::embed::{embed_images, embed_texts};
use super::host_gather::gather_rows_via_host;
use super::image_batches::ImageBatches;
use super::karpathy::EvalImage;
use crate::distributed::share::block;
use crate::model::CoCa;
use anyhow::{ensure, Result};
use coca_common::collective::Collective;
use std::sync::Arc;

/// The ks reported.
pub const KS: [usize; 3] = [1, 5, 10];

/// Recall@k per k in [`KS`], in percent, both directions.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RetrievalResult {
    /// Image queries, recall@k per k.
    pub image_to_text: Vec<f64>,
    /// Text queries, recall@k per k.
    pub text_to_image: Vec<f64>,
    /// Number of images.
    pub images: usize,
    /// Number of captions.
    pub texts: usize,
}

/// Percent of queries (rows of `scores`) with a positive among their `k` best candidates
/// (larger score first, lower index first on ties).
pub fn recall_at_k(scores: &[Vec<f32>], positives: &[Vec<usize>], k: usize) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    let hits = scores
        .iter()
        .zip(positives)
        .filter(|(row, pos)| {
            pos.iter().any(|&p| {
                // Rank of p: candidates strictly better, or equal with a lower index.
                let rank = row
                    .iter()
                    .enumerate()
                    .filter(|&(j, &v)| v > row[p] || (v == row[p] && j < p))
                    .count();
                rank < k
            })
        })
        .count();
    100.0 * hits as f64 / scores.len() as f64
}

/// Embeds every image and caption of `split` (each rank of `comm` one block of each, gathered
/// in order) and computes recall@1/5/10 both ways.
pub fn evaluate(
    model: &CoCa,
    split: &[EvalImage],
    batches: &ImageBatches,
    comm: &Arc<dyn Collective>,
) -> Result<RetrievalResult> {
    let paths: Vec<_> = split.iter().map(|i| i.path.clone()).collect();
    let mut texts = Vec::new();
    let mut text_image = Vec::new();
    for (i, image) in split.iter().enumerate() {
        for c in &image.captions {
            texts.push(c.clone());
            text_image.push(i);
        }
    }
    ensure!(
        !texts.is_empty(),
        "the retrieval split has {} images and no captions",
        split.len()
    );
    let (rank, world) = (comm.rank(), comm.size());
    let device = model.device();
    let image_emb = gather_rows_via_host(
        &embed_images(model, &paths[block(paths.len(), rank, world)], batches)?,
        comm,
        device,
    )?;
    let text_emb = gather_rows_via_host(
        &embed_texts(
            model,
            &texts[block(texts.len(), rank, world)],
            batches.batch_size,
        )?,
        comm,
        device,
    )?;
    let scores = image_emb.matmul(&text_emb.t()?)?;
    let i2t: Vec<Vec<f32>> = scores.to_vec2()?;
    let t2i: Vec<Vec<f32>> = scores.t()?.contiguous()?.to_vec2()?;
    let mut image_texts = vec![Vec::new(); split.len()];
    for (t, &i) in text_image.iter().enumerate() {
        image_texts[i].push(t);
    }
    let text_images: Vec<Vec<usize>> = text_image.iter().map(|&i| vec![i]).collect();
    Ok(RetrievalResult {
        image_to_text: KS
            .iter()
            .map(|&k| recall_at_k(&i2t, &image_texts, k))
            .collect(),
        text_to_image: KS
            .iter()
            .map(|&k| recall_at_k(&t2i, &text_images, k))
            .collect(),
        images: split.len(),
        texts: texts.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_counts_any_positive_in_the_top_k() {
        let scores = vec![vec![0.9, 0.1, 0.5], vec![0.2, 0.3, 0.8]];
        let positives = vec![vec![1, 2], vec![0]];
        // Query 0: ranks 0:0, 2:1, 1:2 → its best positive (2) is 2nd. Query 1: 0 is 3rd.
        assert_eq!(recall_at_k(&scores, &positives, 1), 0.0);
        assert_eq!(recall_at_k(&scores, &positives, 2), 50.0);
        assert_eq!(recall_at_k(&scores, &positives, 3), 100.0);
        // Ties: the lower index ranks first.
        let tied = vec![vec![0.5, 0.5]];
        assert_eq!(recall_at_k(&tied, &[vec![1]], 1), 0.0);
        assert_eq!(recall_at_k(&tied, &[vec![0]], 1), 100.0);
    }
}
