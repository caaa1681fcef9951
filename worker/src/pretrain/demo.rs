//! The end of the demo: zero-shot accuracy on held-out synthetic images over the set's class
//! names, and greedy captions beside the true ones.

use crate::atomic_file::write_bytes_atomically;
use crate::cli::stdout::print_line;
use crate::data::synthetic::{SyntheticCaptions, POSITIONS};
use crate::data::synthetic_source::normalize_rgb;
use crate::data::tokenizer::ClipTokenizer;
use crate::eval::generate::greedy;
use crate::eval::zeroshot::{top_k_accuracy, zero_shot_classifier, zero_shot_logits};
use crate::model::{CoCa, CocaConfig};
use anyhow::{Context, Result};
use candle_core::Tensor;
use std::path::Path;

/// Held-out images evaluated.
pub const HELD_OUT: usize = 500;
/// Captions printed.
const CAPTIONS_SHOWN: usize = 8;
/// Held-out images captioned for the per-attribute accuracy.
const CAPTIONED: usize = 100;

/// The demo's results, also written to `output_dir/demo_results.json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoResults {
    pub zero_shot_top1: f64,
    pub zero_shot_top5: f64,
    pub chance: f64,
    pub classes: usize,
    pub held_out_images: usize,
    /// Exact-match rate of greedy captions over the captioned held-out images.
    pub captions_exact: f64,
    /// Per attribute (count, colour, shape, position, background): the fraction of captions
    /// that state it correctly.
    pub caption_attribute_accuracy: Vec<(String, f64)>,
    pub captions: Vec<(String, String)>,
}

/// Evaluates the trained model and prints the results.
pub fn report(
    model: &CoCa,
    tokenizer: &ClipTokenizer,
    seed: u64,
    config: &CocaConfig,
    output_dir: &Path,
) -> Result<DemoResults> {
    let device = model.device().clone();
    let size = config.vision_cfg.image_size;
    let held_out = SyntheticCaptions::new(seed, HELD_OUT, size as u32).held_out(HELD_OUT);
    let classnames = SyntheticCaptions::class_names();
    let classifier = zero_shot_classifier(
        model,
        tokenizer,
        &classnames,
        &SyntheticCaptions::templates(),
        &device,
    )?;
    let mut labels = Vec::with_capacity(HELD_OUT);
    let mut logits = Vec::new();
    let mut captions = Vec::new();
    for start in (0..HELD_OUT).step_by(50) {
        let samples: Vec<_> = (start..(start + 50).min(HELD_OUT))
            .map(|i| held_out.get(i as u64))
            .collect();
        let pixels: Vec<f32> = samples
            .iter()
            .flat_map(|s| normalize_rgb(&s.image))
            .collect();
        let images = Tensor::from_vec(pixels, (samples.len(), 3, size, size), &device)?;
        let features = model.image_features(&images)?;
        logits.push(zero_shot_logits(&features, &classifier)?);
        labels.extend(samples.iter().map(|s| s.class_index));
        if start < CAPTIONED {
            let ids = greedy(model, &images, config.text_cfg.context_length, 2)?;
            for (seq, sample) in ids.iter().zip(&samples) {
                captions.push((
                    tokenizer.decode(seq).trim().to_string(),
                    sample.caption.clone(),
                ));
            }
        }
    }
    let logits = Tensor::cat(&logits, 0)?;
    let (top1, top5) = top_k_accuracy(&logits, &labels, 5)?;
    let exact =
        captions.iter().filter(|(a, b)| a == b).count() as f64 / captions.len().max(1) as f64;
    let attributes = attribute_accuracy(&captions);
    let results = DemoResults {
        zero_shot_top1: top1,
        zero_shot_top5: top5,
        chance: 1.0 / classnames.len() as f64,
        classes: classnames.len(),
        held_out_images: HELD_OUT,
        captions_exact: exact,
        caption_attribute_accuracy: attributes,
        captions,
    };
    // The results file first: the lines below may meet a closed output.
    let path = output_dir.join("demo_results.json");
    write_bytes_atomically(&path, &serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    print_line(format_args!(
        "zero-shot on {} held-out synthetic images over {} classes: top-1 {:.1}% top-5 {:.1}% (chance {:.1}%)",
        HELD_OUT,
        results.classes,
        100.0 * top1,
        100.0 * top5,
        100.0 * results.chance
    ))?;
    let parts: Vec<String> = results
        .caption_attribute_accuracy
        .iter()
        .map(|(name, acc)| format!("{name} {:.0}%", 100.0 * acc))
        .collect();
    print_line(format_args!(
        "greedy captions of {} held-out images: {:.0}% exactly right; attributes right: {}",
        results.captions.len(),
        100.0 * exact,
        parts.join(", ")
    ))?;
    print_line("some of them (generated | true):")?;
    for (generated, truth) in results.captions.iter().take(CAPTIONS_SHOWN) {
        print_line(format_args!("  {generated} | {truth}"))?;
    }
    Ok(results)
}

/// Whether a generated caption states one attribute as the true caption does.
type AttributeCheck = Box<dyn Fn(&str, &str) -> bool>;

/// Which attributes each generated caption states as the true caption does. The grammar is
/// `COUNT COLOUR SHAPE[s] [POSITION] on a|an BACKGROUND background`.
fn attribute_accuracy(captions: &[(String, String)]) -> Vec<(String, f64)> {
    let words = |c: &str| c.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let position = |c: &str| {
        POSITIONS
            .iter()
            .filter(|p| !p.is_empty())
            .find(|p| c.contains(*p))
            .copied()
            .unwrap_or("")
    };
    let checks: [(&str, AttributeCheck); 5] = [
        (
            "count",
            Box::new(move |g, t| words(g).first() == words(t).first()),
        ),
        (
            "colour",
            Box::new(move |g, t| words(g).get(1) == words(t).get(1)),
        ),
        (
            "shape",
            Box::new(move |g, t| {
                let shape = |c: &str| words(c).get(2).map(|w| w.trim_end_matches('s').to_string());
                shape(g) == shape(t)
            }),
        ),
        ("position", Box::new(move |g, t| position(g) == position(t))),
        (
            "background",
            Box::new(move |g, t| {
                let bg = |c: &str| words(c).iter().rev().nth(1).cloned();
                bg(g) == bg(t)
            }),
        ),
    ];
    let n = captions.len().max(1) as f64;
    checks
        .iter()
        .map(|(name, check)| {
            let right = captions.iter().filter(|(g, t)| check(g, t)).count();
            (name.to_string(), right as f64 / n)
        })
        .collect()
}
