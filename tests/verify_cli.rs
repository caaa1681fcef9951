//! `coca-worker verify`, `selftest` and `convert` end to end, on the fixtures and on bad input.

mod common;

fn verify(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    common::run("coca-worker", &all)
}

/// `verify` of the fixture against itself on the test device (`COCA_TEST_DEVICE`), under the
/// environment `env`: every section passes.
fn assert_verify_passes_on_the_reference(env: &[(&str, &str)]) {
    let (Some(dir), Some((device, _))) = (common::fixture("coca-tiny"), common::test_device())
    else {
        return;
    };
    let device = device.to_string();
    let args = [
        "verify",
        "--reference",
        dir.to_str().unwrap(),
        "--device",
        &device,
    ];
    let (code, out, err) = common::run_with_env("coca-worker", &args, env);
    assert_eq!(code, 0, "{env:?}\n{out}\n{err}");
    for section in ["forward", "loss", "grads", "train", "zeroshot", "generate"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{section} pass "))),
            "{env:?}: {section} did not pass:\n{out}"
        );
    }
    assert!(out.contains("weights not-checked"), "{out}");
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with("verify: ") && last.ends_with(" 0 failed"),
        "{out}"
    );
}

#[test]
fn verify_passes_on_the_reference_itself() {
    assert_verify_passes_on_the_reference(&[]);
}

/// The whole verification (forward, gradients, a training trajectory, zero-shot, captions) on
/// the portable ops: the math the GPU runs.
#[test]
fn verify_passes_on_the_portable_ops() {
    assert_verify_passes_on_the_reference(&[("COCA_PORTABLE_OPS", "1")]);
}

/// The GPU's code path on the CPU: the compositions, and the trainer's flat buffers as device
/// tensors (the gradient norm summed in rows, clipping and AdamW as tensor ops): the 6-step
/// trajectory's losses, norms and parameters still equal open_clip's.
#[test]
fn verify_passes_on_the_gpu_code_path() {
    assert_verify_passes_on_the_reference(&[
        ("COCA_PORTABLE_OPS", "1"),
        ("COCA_FLAT_BUFFERS", "tensors"),
    ]);
}

#[test]
fn selftest_passes_on_the_test_device_with_one_json_line() {
    let Some((device, _)) = common::test_device() else {
        return;
    };
    let device = device.to_string();
    let (code, out, err) = common::run("coca-worker", &["selftest", "--device", &device]);
    assert_eq!(code, 0, "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["ok"], true, "{out}");
    let checks = report["checks"].as_array().unwrap();
    // Twelve ops in three dtypes (attention's recomputed core and the residual sum of a
    // branch among them) and the embedding in float32, each fused path against its
    // composition.
    assert_eq!(checks.len(), 37, "{out}");
    assert!(checks
        .iter()
        .any(|c| c["op"] == "attention_recomputed" && c["dtype"] == "bf16"));
    for op in ["layer_norm_to", "add_widened"] {
        assert!(checks
            .iter()
            .any(|c| c["op"] == op && c["dtype"] == "bf16" && c["fused"] == true));
    }
    for op in [
        "layer_norm",
        "layer_norm_to",
        "masked_softmax",
        "attention_probs",
        "biased_product",
        "cross_entropy_rows",
        "cross_entropy_stats",
        "embedding_slice",
        "add_bias",
    ] {
        assert!(checks
            .iter()
            .any(|c| c["op"] == op && c["dtype"] == "f32" && c["fused"] == true));
    }
}

#[test]
fn verify_passes_with_each_paddle_checkpoint() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    for file in [
        "paddle_model_state.pdparams",
        "paddle_model_state_bf16.pdparams",
    ] {
        let ckpt = dir.join(file);
        let (code, out, err) = verify(&[
            "--reference",
            dir.to_str().unwrap(),
            "--checkpoint",
            ckpt.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{file}:\n{out}\n{err}");
        for section in ["weights", "forward", "loss", "grads"] {
            assert!(
                out.lines()
                    .any(|l| l.starts_with(&format!("{section} pass "))),
                "{file}: {section} did not pass:\n{out}"
            );
        }
    }
}

#[test]
fn verify_fails_on_a_corrupt_checkpoint_and_reports_why() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(dir.join("paddle_model_state.pdparams")).unwrap();
    let truncated = tmp.path().join("truncated.pdparams");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (code, out, _) = verify(&[
        "--reference",
        dir.to_str().unwrap(),
        "--checkpoint",
        truncated.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("weights FAIL"), "{out}");
    assert!(out.lines().last().unwrap().ends_with(", 1 failed"), "{out}");
    assert!(
        out.contains("truncated"),
        "the reason must be shown:\n{out}"
    );
}

#[test]
fn convert_paddle_to_safetensors_round_trips() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("converted.safetensors");
    let ckpt = dir.join("paddle_model_state.pdparams");
    let config = dir.join("config.json");
    let (code, out, err) = common::run(
        "coca-worker",
        &[
            "convert",
            ckpt.to_str().unwrap(),
            out_path.to_str().unwrap(),
            "--model",
            config.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let converted = common::load(&out_path);
    let reference = common::load(&dir.join("weights.safetensors"));
    assert_eq!(converted.len(), reference.len());
    for (name, t) in &reference {
        assert_eq!(common::max_abs_diff(&converted[name], t), 0.0, "{name}");
    }
    // The converted file is itself a valid checkpoint for verify.
    let (code, out, _) = verify(&[
        "--reference",
        dir.to_str().unwrap(),
        "--checkpoint",
        out_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn convert_names_every_mismatch() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("x.safetensors");
    let ckpt = dir.join("weights.safetensors");
    let (code, _, err) = common::run(
        "coca-worker",
        &[
            "convert",
            ckpt.to_str().unwrap(),
            out_path.to_str().unwrap(),
            "--model",
            "coca_ViT-B-32",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("wrong shapes"), "{err}");
    assert!(
        err.contains("text.cls_emb: shape [32], expected [512]"),
        "{err}"
    );
    assert!(err.contains("missing keys"), "{err}");
    assert!(
        !out_path.exists(),
        "nothing may be written for a bad checkpoint"
    );
}

/// A reference folder built from the fixture whose `extras.safetensors` is rewritten by `edit`
/// (`io.safetensors` left out: the model sections are not the point).
fn edited_reference(
    tmp: &std::path::Path,
    fixture: &std::path::Path,
    edit: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) -> std::path::PathBuf {
    let dir = tmp.join("reference");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    for f in ["config.json", "weights.safetensors", "extras.json"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    for image in std::fs::read_dir(fixture.join("images")).unwrap() {
        let image = image.unwrap().path();
        std::fs::copy(&image, dir.join("images").join(image.file_name().unwrap())).unwrap();
    }
    let mut extras = common::load(&fixture.join("extras.safetensors"));
    edit(&mut extras);
    candle_core::safetensors::save(&extras, dir.join("extras.safetensors")).unwrap();
    dir
}

fn section<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} line in\n{out}"))
}

#[test]
fn verify_checks_every_preprocess_size_and_runs_the_model_at_its_own() {
    let Some(fixture) = common::fixture("coca-tiny") else {
        return;
    };
    // Exported without the 224 px images: only preprocess.32 (the model's size) is there.
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_reference(tmp.path(), &fixture, |t| {
        t.remove("preprocess.224").unwrap();
    });
    let (code, out, err) = verify(&["--reference", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    for name in ["preprocess", "zeroshot", "generate"] {
        assert!(section(&out, name).contains(" pass "), "{name}:\n{out}");
    }
    // A size no transform produced: preprocess checks it (and fails, naming it); zeroshot and
    // generate still run on preprocess.32.
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_reference(tmp.path(), &fixture, |t| {
        let zeros = candle_core::Tensor::zeros(
            (5, 3, 40, 40),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        t.insert("preprocess.40".into(), zeros);
    });
    let (code, out, _) = verify(&["--reference", dir.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let line = section(&out, "preprocess");
    assert!(line.contains("FAIL") && line.contains("@40"), "{out}");
    for name in ["zeroshot", "generate"] {
        assert!(section(&out, name).contains(" pass "), "{name}:\n{out}");
    }
    // Without the model's size, zeroshot says which sizes there are.
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_reference(tmp.path(), &fixture, |t| {
        let images = t.remove("preprocess.32").unwrap();
        t.insert("preprocess.48".into(), images);
    });
    let (code, out, _) = verify(&["--reference", dir.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let line = section(&out, "zeroshot");
    assert!(
        line.contains("FAIL") && line.contains("image size is 32") && line.contains("48"),
        "{out}"
    );
}
