//! Caption generation: open_clip's greedy and beam-search captions on the `coca-tiny` fixture,
//! and both key/value caches (row kernels, tensors) against recomputing the prefix (fixture and
//! random model).

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use coca_worker::eval::generate::{
    generate_with, CachedDecoder, DecodePrecision, DecodeWeights, GenerateOptions, GenerationType,
    RecomputeDecoder, StepDecoder, TensorCacheDecoder,
};
use coca_worker::model::{CoCa, CocaConfig};
use coca_worker::train::trainable::trainable_model;
use std::collections::HashMap;

fn random_model() -> (CoCa, Tensor) {
    let config = CocaConfig::resolve("coca_demo").unwrap();
    let (_, vars) = trainable_model(&config, None, 11, DType::F32, &Device::Cpu).unwrap();
    let weights: HashMap<String, Tensor> = vars.tensors().into_iter().collect();
    let model = CoCa::new(
        &config,
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let s = config.vision_cfg.image_size;
    // Fixed pixels (candle's randn is not seeded): token equality below is then reproducible;
    // the cache and the recompute agree to ~1e-5 in the logits, so a near-tie could in
    // principle split them on other inputs.
    let n = 3 * 3 * s * s;
    let pixels: Vec<f32> = (0..n)
        .map(|i| ((i as f32) * 0.618_034).sin() * 1.5)
        .collect();
    let images = Tensor::from_vec(pixels, (3, 3, s, s), &Device::Cpu).unwrap();
    (model, images)
}

/// Which key/value cache a check runs.
#[derive(Debug, Clone, Copy)]
enum Cache {
    /// The CPU row kernels ([`CachedDecoder`]).
    Kernels,
    /// The model's layers on tensors ([`TensorCacheDecoder`]).
    Tensors,
}

/// Feeds the same token rows to `cache` and to the recompute decoder one position at a time and
/// compares every step's logits. Each image appears `copies` times (rows `i`, `i + b`, …);
/// midway the copies rotate histories, as beam search reorders beams of one image.
fn assert_cache_matches_recompute(
    model: &CoCa,
    images: &Tensor,
    steps: usize,
    copies: usize,
    cache: Cache,
) {
    let images = Tensor::cat(&vec![images; copies], 0).unwrap();
    let (_, image_embs) = model.encode_image(&images).unwrap();
    let rows = images.dim(0).unwrap();
    let weights = DecodeWeights::new(model, DecodePrecision::F32).unwrap();
    let fresh = || -> Box<dyn StepDecoder + '_> {
        match cache {
            Cache::Kernels => Box::new(CachedDecoder::new(&weights, &image_embs, 1).unwrap()),
            Cache::Tensors => Box::new(TensorCacheDecoder::new(model, &image_embs, 1).unwrap()),
        }
    };
    let mut cached = fresh();
    let mut recompute = RecomputeDecoder::new(model, image_embs.clone());
    let mut seqs: Vec<Vec<u32>> = vec![vec![49406]; rows];
    let mut worst = 0f32;
    for step in 0..steps {
        let a = cached.next_logits(&seqs).unwrap();
        let r = recompute.next_logits(&seqs).unwrap();
        for (x, y) in a.iter().zip(&r) {
            for (p, q) in x.iter().zip(y) {
                worst = worst.max((p - q).abs());
            }
        }
        for (i, seq) in seqs.iter_mut().enumerate() {
            seq.push(1000 + (step as u32 * 37 + i as u32 * 101) % 40000);
        }
        if step == 2 {
            let sources: Vec<usize> = (0..rows).map(|i| (i + rows / copies) % rows).collect();
            cached.reorder(&sources).unwrap();
            seqs = sources.iter().map(|&s| seqs[s].clone()).collect();
        }
    }
    // A whole prefix in one call runs its positions in turn (the last step's, which fits the
    // context).
    let prefix: Vec<Vec<u32>> = seqs.iter().map(|s| s[..s.len() - 1].to_vec()).collect();
    let a = fresh().next_logits(&prefix).unwrap();
    let r = recompute.next_logits(&prefix).unwrap();
    for (x, y) in a.iter().zip(&r) {
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs());
        }
    }
    eprintln!("{cache:?} cache vs recompute: max abs logit difference {worst:e}");
    assert!(worst < 1e-4, "cached logits differ by {worst}");
}

fn assert_same_tokens(model: &CoCa, images: &Tensor, opts: &GenerateOptions) {
    let a = generate_with(model, images, opts, true).unwrap();
    let b = generate_with(model, images, opts, false).unwrap();
    assert_eq!(a, b, "{:?}", opts.generation_type);
}

#[test]
fn captions_match_open_clip() {
    let Some((model, images, extras)) = common::model_checks::caption_fixture() else {
        return;
    };
    common::model_checks::assert_captions_match(&model, &images, &extras);
}

#[test]
fn cache_equals_recompute_on_the_fixture() {
    let Some((model, images, _)) = common::model_checks::caption_fixture() else {
        return;
    };
    assert_cache_matches_recompute(&model, &images, 15, 2, Cache::Kernels);
    assert_cache_matches_recompute(&model, &images, 15, 2, Cache::Tensors);
    for generation_type in [GenerationType::Greedy, GenerationType::BeamSearch] {
        let opts = GenerateOptions {
            generation_type,
            seq_len: 15,
            min_seq_len: 5,
            ..GenerateOptions::default()
        };
        assert_same_tokens(&model, &images, &opts);
    }
}

/// What a decoding step reads, counted from the fixture's tensor list: both text stacks'
/// blocks, except the image-side parts of cross-attention (`ln_1_kv`, the k/v thirds of
/// `in_proj`, which are computed once per image), then `ln_final` and the vocabulary projection.
fn step_bytes_from_the_weight_file() -> usize {
    let dir = common::fixture("coca-tiny").unwrap();
    let weights = common::load(&dir.join("weights.safetensors"));
    let elements: usize = weights
        .iter()
        .map(|(name, t)| {
            let n = t.elem_count();
            let block = name.starts_with("text.transformer.")
                || name.starts_with("text_decoder.resblocks.");
            let cross = name.starts_with("text_decoder.cross_attn.");
            match name.as_str() {
                "text_decoder.ln_final.weight"
                | "text_decoder.ln_final.bias"
                | "text_decoder.text_projection" => n,
                _ if block => n,
                _ if cross && name.contains(".ln_1_kv.") => 0,
                _ if cross && name.contains(".attn.in_proj_") => n / 3,
                _ if cross => n,
                _ => 0,
            }
        })
        .sum();
    elements * std::mem::size_of::<f32>()
}

/// bfloat16 decoding weights: half the bytes per step, and logits within bfloat16's rounding of
/// float32's (each logit is a long sum of weights × activations; 2⁻⁸ relative per weight).
#[test]
fn bf16_decoding_weights_stay_close_to_float32() {
    let Some((model, images, _)) = common::model_checks::caption_fixture() else {
        return;
    };
    let (_, image_embs) = model.encode_image(&images).unwrap();
    let f32_weights = DecodeWeights::new(&model, DecodePrecision::F32).unwrap();
    let bf16_weights = DecodeWeights::new(&model, DecodePrecision::Bf16).unwrap();
    let (full, half) = (f32_weights.bytes_per_step(), bf16_weights.bytes_per_step());
    assert_eq!(
        full,
        step_bytes_from_the_weight_file(),
        "float32 bytes per step"
    );
    assert!(
        half < full * 52 / 100,
        "bf16 reads {half} bytes per step, f32 {full}"
    );
    let mut exact = CachedDecoder::new(&f32_weights, &image_embs, 1).unwrap();
    let mut rounded = CachedDecoder::new(&bf16_weights, &image_embs, 1).unwrap();
    let rows = images.dim(0).unwrap();
    let mut seqs: Vec<Vec<u32>> = vec![vec![49406]; rows];
    for step in 0..8u32 {
        let a = exact.next_logits(&seqs).unwrap();
        let b = rounded.next_logits(&seqs).unwrap();
        for (x, y) in a.iter().zip(&b) {
            let range = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(worst > 0.0, "bf16 weights changed nothing");
            assert!(
                worst < 0.02 * range,
                "step {step}: logits differ by {worst} (range {range})"
            );
        }
        for (i, seq) in seqs.iter_mut().enumerate() {
            seq.push(1000 + step * 37 + i as u32 * 101);
        }
    }
}

#[test]
fn cache_equals_recompute_on_a_random_model() {
    let (model, images) = random_model();
    assert_cache_matches_recompute(&model, &images, 16, 2, Cache::Kernels);
    assert_cache_matches_recompute(&model, &images, 16, 2, Cache::Tensors);
    // 9 rows: more than the decoding kernels stream, so products go through candle's GEMM.
    assert_cache_matches_recompute(&model, &images, 6, 3, Cache::Kernels);
    assert_cache_matches_recompute(&model, &images, 6, 3, Cache::Tensors);
    for (generation_type, penalty) in [
        (GenerationType::Greedy, 1.0),
        (GenerationType::TopK, 1.3),
        (GenerationType::TopP, 1.0),
        (GenerationType::BeamSearch, 1.2),
    ] {
        let opts = GenerateOptions {
            generation_type,
            seq_len: 12,
            min_seq_len: 3,
            top_k: 5,
            top_p: 0.5,
            repetition_penalty: penalty,
            diversity_penalty: if generation_type == GenerationType::BeamSearch {
                0.5
            } else {
                0.0
            },
            seed: 3,
            ..GenerateOptions::default()
        };
        assert_same_tokens(&model, &images, &opts);
    }
}

#[test]
fn bad_options_are_errors() {
    let (model, images) = random_model();
    for opts in [
        GenerateOptions {
            seq_len: 5,
            min_seq_len: 5,
            ..GenerateOptions::default()
        },
        GenerateOptions {
            num_beams: 6,
            num_beam_groups: 4,
            ..GenerateOptions::default()
        },
        GenerateOptions {
            seq_len: 100,
            ..GenerateOptions::default()
        },
        GenerateOptions {
            generation_type: GenerationType::TopP,
            top_p: 0.0,
            ..GenerateOptions::default()
        },
    ] {
        assert!(generate_with(&model, &images, &opts, true).is_err());
    }
}

/// The row kernels' weights taken from a model under bf16 autocast, as `bench --bf16 True`
/// builds them to time captions: the model computes the image keys and values in bf16, and the
/// cached decoder reads them as float32 (it stopped with "unexpected dtype" before). Its greedy
/// captions begin as recomputing the prefix on the same model does.
#[test]
fn row_kernels_caption_a_bf16_autocast_model() {
    use coca_worker::eval::generate::{generate_using, Decoding};
    use coca_worker::model::autocast::Autocast;
    use coca_worker::model::tensor_parallel::TensorParallel;
    use coca_worker::train::trainable::trainable_model_parallel;
    let config = CocaConfig::resolve("coca_demo").unwrap();
    let tp = TensorParallel::single().with_autocast(Autocast::new(DType::BF16));
    let (model, _vars) =
        trainable_model_parallel(&config, None, 11, DType::F32, &Device::Cpu, &tp).unwrap();
    let (_, images) = random_model();
    let opts = GenerateOptions {
        generation_type: GenerationType::Greedy,
        seq_len: 8,
        min_seq_len: 7,
        ..GenerateOptions::default()
    };
    let kernels = Decoding::Kernels(Box::new(
        DecodeWeights::new(&model, DecodePrecision::F32).unwrap(),
    ));
    let cached = generate_using(&kernels, &images, &opts).unwrap();
    let recomputed = generate_with(&model, &images, &opts, false).unwrap();
    assert_eq!(cached.len(), 3);
    for (caption, other) in cached.iter().zip(&recomputed) {
        // End-of-text is forbidden before the last position: every caption is full length.
        assert_eq!(caption.len(), opts.seq_len, "{caption:?}");
        assert_eq!((caption[0], caption[opts.seq_len - 1]), (49406, 49407));
        // The first words agree; later ones may split on bf16 near-ties (the row kernels
        // compute the text in float32, the model in bf16).
        assert_eq!(caption[..3], other[..3], "{caption:?} vs {other:?}");
    }
}
