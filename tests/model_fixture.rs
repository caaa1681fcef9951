//! The model against open_clip's outputs on the `coca-tiny` fixture.

mod common;

use candle_core::{DType, Device};
use coca_worker::model::{coca_loss, CocaConfig, CocaLossConfig};

#[test]
fn forward_matches_open_clip() {
    let (Some(dir), Some(_)) = (
        common::fixture("coca-tiny"),
        common::fixture("coca-tiny/io.safetensors"),
    ) else {
        return;
    };
    let io = common::load(&dir.join("io.safetensors"));
    let model = common::fixture_model(&dir);
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
        let d = common::max_abs_diff(ours, &io[name]);
        eprintln!("{name}: max abs diff {d:e}");
        assert!(d < 1e-4, "{name} differs by {d}");
    }
    let loss = coca_loss(&out, &CocaLossConfig::default()).unwrap();
    for (name, ours) in [
        ("loss.contrastive", &loss.contrastive),
        ("loss.caption", &loss.caption),
        ("loss.total", &loss.total),
    ] {
        let ours = ours.to_scalar::<f32>().unwrap();
        let theirs = io[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        eprintln!("{name}: ours {ours} reference {theirs}");
        assert!(
            ((ours - theirs) / theirs).abs() < 1e-4,
            "{name}: {ours} vs {theirs}"
        );
    }
}

#[test]
fn every_gradient_matches_open_clip() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let config = CocaConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = common::load(&dir.join("weights.safetensors"));
    let io = common::load(&dir.join("io.safetensors"));
    let names: Vec<String> = weights.keys().cloned().collect();
    let (model, vars) = coca_worker::model::trainable::trainable_model(
        &config,
        Some(weights),
        0,
        DType::F32,
        &Device::Cpu,
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
        let scale = common::max_abs(reference).max(1e-12);
        let rel = common::max_abs_diff(ours, reference) / scale;
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
