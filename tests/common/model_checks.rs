//! The model and generation against open_clip's outputs on the `coca-tiny` fixture, shared by
//! the test binaries that run them on the fused CPU ops (`model_fixture`, `generate`) and on the
//! portable ops (`portable_ops`).

use candle_core::{DType, Device, Tensor};
use coca_worker::eval::generate::{generate, GenerateOptions, GenerationType};
use coca_worker::model::{coca_loss, CoCa, CocaConfig, CocaLossConfig};
use std::collections::HashMap;

/// Every output of the forward pass within 1e-4 and the three losses within 1e-4 relative, on
/// the test device (skipped, with a message, when the fixture or the device is absent).
pub fn assert_forward_matches() {
    let (Some(dir), Some(_), Some((_, device))) = (
        super::fixture("coca-tiny"),
        super::fixture("coca-tiny/io.safetensors"),
        super::test_device(),
    ) else {
        return;
    };
    let io = super::load_on(&dir.join("io.safetensors"), &device);
    let model = super::fixture_model_on(&dir, &device);
    let out = model
        .forward(&io["input.image"], &io["input.text"])
        .unwrap();
    for (name, ours) in [
        ("output.image_features", &out.image_features),
        ("output.image_embs", &out.image_embs),
        ("output.text_features", &out.text_features),
        ("output.token_embs", &out.token_embs),
        ("output.logits", &out.logits),
    ] {
        let d = super::max_abs_diff(ours, &io[name]);
        eprintln!("{name}: max abs diff {d:e}");
        assert!(d < 1e-4, "{name} differs by {d}");
    }
    // The embedding-only path (the pooler's first query alone) gives the same features.
    let alone = model.image_features(&io["input.image"]).unwrap();
    let d = super::max_abs_diff(&alone, &io["output.image_features"]);
    eprintln!("image_features alone: max abs diff {d:e}");
    assert!(d < 1e-4, "image_features alone differs by {d}");
    let loss = coca_loss(&out, &CocaLossConfig::default()).unwrap();
    for (name, ours) in [
        ("loss.contrastive", &loss.contrastive),
        ("loss.caption", &loss.caption),
        ("loss.total", &loss.total),
    ] {
        let ours = ours
            .to_device(&Device::Cpu)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let theirs = io[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        eprintln!("{name}: ours {ours} reference {theirs}");
        assert!(
            ((ours - theirs) / theirs).abs() < 1e-4,
            "{name}: {ours} vs {theirs}"
        );
    }
}

/// The gradient of the total loss for every weight within 1e-3 of its largest element, on the
/// test device (skipped, with a message, when the fixture or the device is absent).
pub fn assert_gradients_match() {
    let (Some(dir), Some((_, device))) = (super::fixture("coca-tiny"), super::test_device()) else {
        return;
    };
    let config = CocaConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = super::load_on(&dir.join("weights.safetensors"), &device);
    let io = super::load_on(&dir.join("io.safetensors"), &device);
    let names: Vec<String> = weights.keys().cloned().collect();
    let (model, vars) = coca_worker::train::trainable::trainable_model(
        &config,
        Some(weights),
        0,
        DType::F32,
        &device,
    )
    .unwrap();
    let out = model
        .forward(&io["input.image"], &io["input.text"])
        .unwrap();
    let loss = coca_loss(&out, &CocaLossConfig::default()).unwrap();
    let grads = loss.total.backward().unwrap();
    assert_eq!(
        vars.len(),
        names.len(),
        "the model must own exactly the fixture's weights"
    );
    let mut worst = (String::new(), 0f32);
    for name in &names {
        let reference = &io[&format!("grad.{name}")];
        let ours = grads
            .get(vars.get(name).unwrap().as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let scale = super::max_abs(reference).max(1e-12);
        let rel = super::max_abs_diff(ours, reference) / scale;
        if rel > worst.1 {
            worst = (name.clone(), rel);
        }
        assert!(
            rel < 1e-3,
            "gradient of {name} differs by {rel} of its largest element"
        );
    }
    eprintln!(
        "worst gradient: {} at {:e} of its largest element",
        worst.0, worst.1
    );
}

/// The fixture model and its images preprocessed at the model's size on the test device
/// ([`super::test_device`]), and the extras, or `None` (with a message) when the fixture or the
/// device is absent.
pub fn caption_fixture() -> Option<(CoCa, Tensor, HashMap<String, Tensor>)> {
    let dir = super::fixture("coca-tiny")?;
    super::fixture("coca-tiny/extras.safetensors")?;
    let (_, device) = super::test_device()?;
    let extras = super::load(&dir.join("extras.safetensors"));
    let model = super::fixture_model_on(&dir, &device);
    let images = extras["preprocess.32"].to_device(&device).unwrap();
    Some((model, images, extras))
}

/// Greedy and diverse beam-search captions (6 beams in 3 groups, the fixture's settings) on the
/// decoding [`generate`] chooses, token for token against open_clip's.
pub fn assert_captions_match(model: &CoCa, images: &Tensor, extras: &HashMap<String, Tensor>) {
    let mut captions = Vec::new();
    for (generation_type, name) in [
        (GenerationType::Greedy, "generate.greedy"),
        (GenerationType::BeamSearch, "generate.beam"),
    ] {
        let opts = GenerateOptions {
            generation_type,
            seq_len: 15,
            min_seq_len: 5,
            ..GenerateOptions::default()
        };
        let ours = generate(model, images, &opts).unwrap();
        let expected = extras[name].to_vec2::<i64>().unwrap();
        assert_eq!(ours.len(), expected.len(), "{name}: one caption per image");
        for (o, e) in ours.iter().zip(&expected) {
            let mut o: Vec<i64> = o.iter().map(|&t| t as i64).collect();
            o.resize(e.len(), 0);
            assert_eq!(&o, e, "{name}");
        }
        captions.push(expected);
    }
    assert_ne!(
        captions[0], captions[1],
        "the fixture's greedy and beam captions should differ"
    );
}
