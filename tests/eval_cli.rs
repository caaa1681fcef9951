//! `coca-worker eval` on small data sets the tests write, with the coca-tiny reference weights.

mod common;

use candle_core::{Device, Tensor};
use coca_worker::data::image_folder::ImageFolder;
use coca_worker::data::tokenizer::ClipTokenizer;
use coca_worker::eval::zeroshot::{zero_shot_classifier, zero_shot_logits};
use coca_worker::model::CoCa;
use std::collections::HashMap;
use std::path::Path;

/// Top-1 in percent computed directly: classifier, image features, logits.
fn direct_top1(model: &CoCa, dir: &Path) -> f64 {
    let folder = ImageFolder::open(dir).unwrap();
    let tokenizer = ClipTokenizer::new().unwrap();
    let classifier = zero_shot_classifier(
        model,
        &tokenizer,
        folder.classnames(),
        folder.templates(),
        &Device::Cpu,
    )
    .unwrap();
    let size = model.config.vision_cfg.image_size;
    let mut correct = 0;
    for i in 0..folder.len() {
        let (image, label) = folder.get(i).unwrap();
        let pixels =
            Tensor::from_vec(image.eval_transform(size), (1, 3, size, size), &Device::Cpu).unwrap();
        let (features, _) = model.encode_image(&pixels).unwrap();
        let logits = zero_shot_logits(&features, &classifier).unwrap();
        let row = logits.get(0).unwrap().to_vec1::<f32>().unwrap();
        if row.iter().all(|&v| v <= row[label]) {
            correct += 1;
        }
    }
    100.0 * correct as f64 / folder.len() as f64
}

fn eval_json(args: &[&str]) -> serde_json::Value {
    let mut full = vec!["eval"];
    full.extend(args);
    let (code, stdout, stderr) = common::run("coca-worker", &full);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(stdout.lines().next().expect("one JSON line")).unwrap()
}

#[test]
fn classification_matches_direct_logits_and_the_cache_follows_the_weights() {
    let Some(fixture) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("colours");
    common::images::write_folder(&data);
    let model_dir = fixture.display().to_string();
    let data_arg = data.display().to_string();
    let args = [
        "--model",
        &model_dir,
        "--classification_eval",
        &data_arg,
        "--batch_size",
        "5",
    ];
    let first = eval_json(&args);
    assert_eq!(first["classifier_cached"], false);
    assert_eq!(first["images"], 12);
    assert_eq!(first["classes"], 4);
    assert!(first["top5"].is_null(), "top-5 is absent below 5 classes");
    let model = common::model_from(
        &fixture.join("config.json"),
        &fixture.join("weights.safetensors"),
    );
    let expected = direct_top1(&model, &data);
    assert!((first["top1"].as_f64().unwrap() - expected).abs() < 1e-9);
    let second = eval_json(&args);
    assert_eq!(second["classifier_cached"], true);
    assert_eq!(second["top1"], first["top1"]);

    // Other weights: the cached classifier must not be used.
    let mut weights: HashMap<String, Tensor> = common::load(&fixture.join("weights.safetensors"));
    let proj = weights["text.text_projection"].clone();
    let flipped = proj.affine(-1.0, 0.0).unwrap();
    weights.insert("text.text_projection".into(), flipped);
    let changed = tmp.path().join("changed.safetensors");
    candle_core::safetensors::save(&weights, &changed).unwrap();
    let changed_arg = changed.display().to_string();
    let mut changed_args = args.to_vec();
    changed_args.extend(["--pretrained", &changed_arg]);
    let third = eval_json(&changed_args);
    assert_eq!(third["classifier_cached"], false);
    let model = common::model_from(&fixture.join("config.json"), &changed);
    let expected = direct_top1(&model, &data);
    assert!((third["top1"].as_f64().unwrap() - expected).abs() < 1e-9);
    let fourth = eval_json(&changed_args);
    assert_eq!(fourth["classifier_cached"], true);
    assert_eq!(fourth["top1"], third["top1"]);
}

#[test]
fn eval_errors_name_the_flag() {
    let Some(fixture) = common::fixture("coca-tiny") else {
        return;
    };
    let model_dir = fixture.display().to_string();
    let (code, _, stderr) = common::run(
        "coca-worker",
        &[
            "eval",
            "--model",
            &model_dir,
            "--classification_eval",
            "/nonexistent/dir",
        ],
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/dir"), "{stderr}");
    let (code, _, stderr) = common::run("coca-worker", &["eval", "--model", &model_dir]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--classification_eval"), "{stderr}");
}

#[test]
fn retrieval_recalls_match_the_library_on_a_tiny_split() {
    use coca_worker::eval::embed::{embed_images, embed_texts};
    use coca_worker::eval::image_batches::ImageBatches;
    use coca_worker::eval::retrieval::recall_at_k;
    let Some(fixture) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let images_dir = tmp.path().join("images");
    std::fs::create_dir_all(&images_dir).unwrap();
    let names = ["astronaut.png", "chelsea.jpg", "coffee_rgba.png"];
    for n in names {
        std::fs::copy(fixture.join("images").join(n), images_dir.join(n)).unwrap();
    }
    // Two records per image with list captions, one with a single string: 3 images, 12 texts.
    let captions = [
        [
            "an astronaut in a suit",
            "a woman in space",
            "a portrait",
            "nasa photo",
        ],
        [
            "a cat looking up",
            "an orange cat",
            "a tabby",
            "a kitten close up",
        ],
        [
            "a cup of coffee",
            "coffee on a saucer",
            "a drink",
            "a mug from above",
        ],
    ];
    let mut records = Vec::new();
    for (n, c) in names.iter().zip(&captions) {
        records.push(serde_json::json!({"image": n, "caption": [c[0], c[1], c[2]]}));
        records.push(serde_json::json!({"image": n, "caption": c[3]}));
    }
    let json = tmp.path().join("test.json");
    std::fs::write(&json, serde_json::to_string(&records).unwrap()).unwrap();
    let model_dir = fixture.display().to_string();
    let json_arg = json.display().to_string();
    let out = eval_json(&[
        "--model",
        &model_dir,
        "--retrieval",
        &json_arg,
        "--batch_size",
        "5",
    ]);
    assert_eq!(out["images"], 3);
    assert_eq!(out["texts"], 12);

    let model = common::model_from(
        &fixture.join("config.json"),
        &fixture.join("weights.safetensors"),
    );
    let paths: Vec<_> = names.iter().map(|n| images_dir.join(n)).collect();
    let texts: Vec<String> = captions.iter().flatten().map(|s| s.to_string()).collect();
    let img = embed_images(&model, &paths, &ImageBatches::serial(2)).unwrap();
    let txt = embed_texts(&model, &texts, 7).unwrap();
    let scores: Vec<Vec<f32>> = img.matmul(&txt.t().unwrap()).unwrap().to_vec2().unwrap();
    let t2i: Vec<Vec<f32>> = (0..texts.len())
        .map(|t| scores.iter().map(|row| row[t]).collect())
        .collect();
    let image_texts: Vec<Vec<usize>> = (0..3).map(|i| (i * 4..i * 4 + 4).collect()).collect();
    let text_images: Vec<Vec<usize>> = (0..12).map(|t| vec![t / 4]).collect();
    for k in [1usize, 5, 10] {
        let i2t = recall_at_k(&scores, &image_texts, k);
        let t2i = recall_at_k(&t2i, &text_images, k);
        assert!((out[format!("image_to_text_R@{k}")].as_f64().unwrap() - i2t).abs() < 1e-9);
        assert!((out[format!("text_to_image_R@{k}")].as_f64().unwrap() - t2i).abs() < 1e-9);
    }
    // With 3 images every text finds its image within the top 5.
    assert_eq!(out["text_to_image_R@5"], 100.0);
}

#[test]
fn captioning_writes_captions_and_scores_them() {
    use coca_worker::eval::caption::caption_files;
    use coca_worker::eval::caption_metrics::{bleu4, cider, tokenize};
    use coca_worker::eval::generate::{GenerateOptions, GenerationType};
    use coca_worker::eval::image_batches::ImageBatches;
    let Some(fixture) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let names = ["astronaut.png", "chelsea.jpg"];
    let refs = [
        vec!["an astronaut in a suit", "a woman in a space suit"],
        vec!["a cat looking up", "an orange tabby cat"],
    ];
    let records: Vec<_> = names
        .iter()
        .zip(&refs)
        .map(|(n, r)| serde_json::json!({"image": n, "caption": r}))
        .collect();
    let json = tmp.path().join("split.json");
    std::fs::write(&json, serde_json::to_string(&records).unwrap()).unwrap();
    let out = tmp.path().join("captions.jsonl");
    let (model_dir, json_arg, out_arg) = (
        fixture.display().to_string(),
        json.display().to_string(),
        out.display().to_string(),
    );
    let images_root = fixture.join("images").display().to_string();
    let line = eval_json(&[
        "--model",
        &model_dir,
        "--captioning",
        &json_arg,
        "--data_root",
        &images_root,
        "--out",
        &out_arg,
        "--generation_type",
        "greedy",
        "--seq_len",
        "12",
    ]);
    let written: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(written.len(), 2);
    assert_eq!(written[0]["image"], names[0]);

    let model = common::model_from(
        &fixture.join("config.json"),
        &fixture.join("weights.safetensors"),
    );
    let paths: Vec<_> = names
        .iter()
        .map(|n| fixture.join("images").join(n))
        .collect();
    let opts = GenerateOptions {
        generation_type: GenerationType::Greedy,
        seq_len: 12,
        ..GenerateOptions::default()
    };
    let captions = caption_files(&model, &paths, &opts, &ImageBatches::serial(8)).unwrap();
    for (w, c) in written.iter().zip(&captions) {
        assert_eq!(w["caption"].as_str().unwrap(), c);
    }
    let hyps: Vec<Vec<String>> = captions.iter().map(|c| tokenize(c)).collect();
    let refs: Vec<Vec<Vec<String>>> = refs
        .iter()
        .map(|r| r.iter().map(|c| tokenize(c)).collect())
        .collect();
    assert_eq!(line["BLEU-4"].as_f64().unwrap(), bleu4(&hyps, &refs));
    assert_eq!(line["CIDEr"].as_f64().unwrap(), cider(&hyps, &refs));
}

#[test]
fn evaluations_under_the_launcher_give_the_numbers_of_one_process() {
    let Some(fixture) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let inputs = common::eval_inputs::write(tmp.path(), &fixture);
    let eval = inputs.eval_all();
    let (code, alone, err) = common::run("coca-worker", &eval);
    assert_eq!(code, 0, "{err}");
    let log_dir = tmp.path().join("logs").display().to_string();
    // Five ranks for four classes and three split images: the last rank has no class to
    // embed, no image and no caption, and still takes part in every gather.
    let mut launched = vec!["--nproc-per-node", "5", "--log-dir", &log_dir, "--"];
    launched.extend(eval.iter().copied());
    let (code, out, err) = common::run("coca-launch", &launched);
    assert_eq!(code, 0, "{out}\n{err}");
    let parse = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .filter_map(|l| serde_json::from_str(l.trim_start_matches("[rank 0] ")).ok())
            .collect()
    };
    let (alone, launched) = (parse(&alone), parse(&out));
    assert_eq!(alone.len(), 3, "three evaluations");
    assert_eq!(alone, launched, "the same numbers on 1 and 5 ranks");
}

/// A rank that fails on its own (a corrupt image in its block) is the one the launcher's summary
/// names, with its error, whatever the order the processes end in: its neighbour, if its
/// collective finds the connection closed before the launcher stops it, exits with the "peer
/// failed" code (75) and is reported only as a consequence.
#[test]
fn the_rank_with_a_corrupt_image_is_the_failure_the_launcher_names() {
    let Some(fixture) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("colours");
    common::images::write_folder(&data);
    // The last image in sorted order: in rank 1's block of two.
    std::fs::write(
        data.join("images/white/9.jpg"),
        b"\xff\xd8\xff\xe0 not a JPEG",
    )
    .unwrap();
    let (model_arg, data_arg) = (fixture.display().to_string(), data.display().to_string());
    let logs = tmp.path().join("logs");
    let log_arg = logs.display().to_string();
    for _ in 0..2 {
        let (code, out, err) = common::run(
            "coca-launch",
            &[
                "--nproc-per-node",
                "2",
                "--log-dir",
                &log_arg,
                "--",
                "eval",
                "--classification_eval",
                &data_arg,
                "--model",
                &model_arg,
                "--per_device_eval_batch_size",
                "2",
            ],
        );
        assert_eq!(code, 2, "{out}\n{err}");
        let summary = &err[err.find("first failure").expect("a summary")..];
        assert!(
            summary.contains("cause: rank 1 on node 0") && summary.contains("9.jpg"),
            "{summary}"
        );
        // Rank 0 is stopped by the launcher, or first fails in a collective that lost rank 1.
        let rank0 = std::fs::read_to_string(logs.join("workerlog.0")).unwrap();
        assert!(
            !rank0.contains("error") || rank0.contains("stopped or failed"),
            "rank 0: {rank0}"
        );
    }
}
