//! The sections checked against `extras.json` / `extras.safetensors`: `tokenizer`,
//! `preprocess`, `zeroshot` and `generate`.

use super::{finish, not_checked, Reference, SectionReport, FORWARD_TOL};
use crate::compare::{Comparison, Tolerance};
use crate::data::preprocess::open_image;
use crate::data::tokenizer::{ClipTokenizer, PAD};
use crate::eval::generate::{generate, greedy, GenerateOptions, GenerationType};
use crate::eval::zeroshot::{zero_shot_classifier, zero_shot_logits};
use crate::model::{CoCa, CocaConfig};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::Path;

/// Mean absolute pixel difference allowed (bicubic resamplers round differently).
const PREPROCESS_TOL: Tolerance = Tolerance::MeanAbs { abs: 0.01 };

/// The reference folder's extras.
pub(crate) struct Extras {
    json: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

impl Extras {
    /// `None` when the folder has no extras.
    pub(crate) fn open(dir: &Path, device: &Device) -> Result<Option<Self>> {
        let (json_path, st_path) = (dir.join("extras.json"), dir.join("extras.safetensors"));
        if !json_path.exists() || !st_path.exists() {
            return Ok(None);
        }
        let json = serde_json::from_str(
            &std::fs::read_to_string(&json_path)
                .with_context(|| format!("cannot read {}", json_path.display()))?,
        )
        .with_context(|| format!("{} is not JSON", json_path.display()))?;
        let tensors = candle_core::safetensors::load(&st_path, device)
            .with_context(|| format!("cannot read {}", st_path.display()))?;
        Ok(Some(Self { json, tensors }))
    }

    fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .with_context(|| format!("extras.safetensors has no tensor {name}"))
    }

    fn strings(&self, pointer: &str) -> Result<Vec<String>> {
        let values = self
            .json
            .pointer(pointer)
            .and_then(|v| v.as_array())
            .with_context(|| format!("extras.json has no list at {pointer}"))?;
        values
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("extras.json {pointer} holds a non-string"))
            })
            .collect()
    }

    fn number(&self, pointer: &str) -> Result<usize> {
        self.json
            .pointer(pointer)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .with_context(|| format!("extras.json has no number at {pointer}"))
    }

    /// The sizes `S` of every `preprocess.<S>` tensor, ascending.
    fn preprocess_sizes(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix("preprocess.")?.parse().ok())
            .collect();
        sizes.sort_unstable();
        sizes
    }

    /// The preprocessed images at the model's own size, the input of `zeroshot` and `generate`.
    fn images_for(&self, config: &CocaConfig) -> Result<&Tensor> {
        let size = config.vision_cfg.image_size;
        self.tensor(&format!("preprocess.{size}")).with_context(|| {
            format!(
                "the model's image size is {size}; the reference has preprocess.<S> for S in {:?}",
                self.preprocess_sizes()
            )
        })
    }
}

/// Token ids of every string, at context 77 and at the model's context, exactly.
pub(crate) fn tokenizer_section(reference: &Reference, extras: &Extras) -> SectionReport {
    let outcome = (|| -> Result<Comparison> {
        let tokenizer = ClipTokenizer::new()?;
        let strings = extras.strings("/tokenizer_strings")?;
        let mut comparison = Comparison::default();
        for (name, ctx) in [
            ("tokenizer.ids_77", 77),
            (
                "tokenizer.ids_model_ctx",
                reference.config.text_cfg.context_length,
            ),
        ] {
            let ids: Vec<i64> = strings
                .iter()
                .flat_map(|s| tokenizer.tokenize(s, ctx))
                .map(i64::from)
                .collect();
            let ours = Tensor::from_vec(ids, (strings.len(), ctx), &Device::Cpu)?;
            comparison.check(name, &ours, extras.tensor(name)?, Tolerance::Exact)?;
        }
        Ok(comparison)
    })();
    finish("tokenizer", Tolerance::Exact.to_string(), outcome)
}

/// open_clip's eval transform of every image at each size `S` of a `preprocess.<S>` tensor.
pub(crate) fn preprocess_section(reference: &Reference, extras: &Extras) -> SectionReport {
    let images_dir = reference.dir.join("images");
    if !images_dir.is_dir() {
        return not_checked("preprocess", "no images/ folder");
    }
    let sizes = extras.preprocess_sizes();
    if sizes.is_empty() {
        return not_checked(
            "preprocess",
            "no preprocess.<S> tensor in extras.safetensors",
        );
    }
    let outcome = (|| -> Result<Comparison> {
        let names = extras.strings("/images")?;
        let mut comparison = Comparison::default();
        for size in sizes {
            let expected = extras.tensor(&format!("preprocess.{size}"))?;
            for (i, name) in names.iter().enumerate() {
                let pixels = open_image(&images_dir.join(name))?.eval_transform(size);
                let ours = Tensor::from_vec(pixels, (3, size, size), &Device::Cpu)?;
                comparison.check(
                    &format!("{name}@{size}"),
                    &ours,
                    &expected.get(i)?,
                    PREPROCESS_TOL,
                )?;
            }
        }
        Ok(comparison)
    })();
    finish("preprocess", PREPROCESS_TOL.to_string(), outcome)
}

/// The model on the reference weights, for inference.
fn reference_model(reference: &Reference) -> Result<CoCa> {
    let vb = VarBuilder::from_tensors(reference.weights.clone(), DType::F32, &reference.device);
    Ok(CoCa::new(&reference.config, vb)?)
}

/// The zero-shot classifier from the class names and templates, and the logits of the
/// reference's images preprocessed at the model's image size.
pub(crate) fn zeroshot_section(reference: &Reference, extras: &Extras) -> SectionReport {
    let outcome = (|| -> Result<Comparison> {
        let model = reference_model(reference)?;
        let tokenizer = ClipTokenizer::new()?;
        let classnames = extras.strings("/zeroshot/classnames")?;
        let templates = extras.strings("/zeroshot/templates")?;
        let classifier =
            zero_shot_classifier(&model, &tokenizer, &classnames, &templates, model.device())?;
        let mut comparison = Comparison::default();
        comparison.check(
            "zeroshot.classifier",
            &classifier,
            extras.tensor("zeroshot.classifier")?,
            FORWARD_TOL,
        )?;
        let features = model.image_features(extras.images_for(&reference.config)?)?;
        let logits = zero_shot_logits(&features, &classifier)?;
        comparison.check(
            "zeroshot.logits",
            &logits,
            extras.tensor("zeroshot.logits")?,
            FORWARD_TOL,
        )?;
        Ok(comparison)
    })();
    finish("zeroshot", FORWARD_TOL.to_string(), outcome)
}

/// Rows of ids as an `[rows, width]` int64 tensor, cut or padded with `PAD` to `width`.
fn id_rows(seqs: &[Vec<u32>], width: usize) -> Result<Tensor> {
    let ids: Vec<i64> = seqs
        .iter()
        .flat_map(|s| {
            let mut s = s.clone();
            s.resize(width.max(s.len()), PAD);
            s.truncate(width);
            s.into_iter().map(i64::from)
        })
        .collect();
    Ok(Tensor::from_vec(ids, (seqs.len(), width), &Device::Cpu)?)
}

/// Greedy captions and diverse beam-search captions (6 beams in 3 groups) of the reference's
/// images preprocessed at the model's image size, token for token.
pub(crate) fn generate_section(reference: &Reference, extras: &Extras) -> SectionReport {
    let outcome = (|| -> Result<Comparison> {
        let model = reference_model(reference)?;
        let seq_len = extras.number("/generate/seq_len")?;
        let min_len = extras.number("/generate/min_seq_len")?;
        let images = extras.images_for(&reference.config)?;
        let mut comparison = Comparison::default();
        let expected = extras.tensor("generate.greedy")?;
        let seqs = greedy(&model, images, seq_len, min_len)?;
        let ours = id_rows(&seqs, expected.dim(1)?)?;
        comparison.check("generate.greedy", &ours, expected, Tolerance::Exact)?;
        let expected = extras.tensor("generate.beam")?;
        let opts = GenerateOptions {
            generation_type: GenerationType::BeamSearch,
            seq_len,
            min_seq_len: min_len,
            num_beams: 6,
            num_beam_groups: 3,
            ..GenerateOptions::default()
        };
        let seqs = generate(&model, images, &opts)?;
        let ours = id_rows(&seqs, expected.dim(1)?)?;
        comparison.check("generate.beam", &ours, expected, Tolerance::Exact)?;
        Ok(comparison)
    })();
    finish("generate", Tolerance::Exact.to_string(), outcome)
}
