//! `pretrain --classification_eval DIR --eval_steps N`: zero-shot evaluation with the current
//! weights during training and at the end, logged beside the training metrics.

use std::path::Path;
use std::process::Command;

/// A small config the synthetic set (32×32) trains quickly.
const TINY_CONFIG: &str = include_str!("data/tiny_config.json");

/// An ImageFolder of plain-coloured images: 3 classes × 2 images.
fn image_folder(dir: &Path) {
    let colours = [
        ("red", [220u8, 30, 30]),
        ("green", [30, 200, 30]),
        ("blue", [30, 30, 220]),
    ];
    for (name, rgb) in colours {
        let class_dir = dir.join("images").join(name);
        std::fs::create_dir_all(&class_dir).unwrap();
        for i in 0..2 {
            image::RgbImage::from_pixel(40, 40, image::Rgb(rgb))
                .save(class_dir.join(format!("{i}.png")))
                .unwrap();
        }
    }
    std::fs::write(dir.join("labels.txt"), "red\ngreen\nblue\n").unwrap();
    std::fs::write(dir.join("templates.txt"), "a photo of {}.\n").unwrap();
}

#[test]
fn zero_shot_is_evaluated_every_eval_steps_and_at_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("folder");
    image_folder(&folder);
    let config = tmp.path().join("tiny.json");
    std::fs::write(&config, TINY_CONFIG).unwrap();
    let out = tmp.path().join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_coca-worker"))
        .args([
            "pretrain",
            "--disable_tqdm",
            "True",
            "--model",
            config.to_str().unwrap(),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--classification_eval",
            folder.to_str().unwrap(),
            "--eval_steps",
            "2",
            "--output_dir",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("zeroshot_top1").is_some())
        .collect();
    let steps: Vec<u64> = evals.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![2, 3], "{text}");
    for e in &evals {
        let top1 = e["zeroshot_top1"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&top1));
        assert_eq!(e["zeroshot_images"], 6);
        assert!(
            e["zeroshot_top5"].is_null(),
            "top-5 is absent below 5 classes"
        );
    }
    assert!(text.contains("zero-shot on 6 images, 3 classes"), "{text}");

    // --eval_steps alone names nothing to evaluate.
    let output = Command::new(env!("CARGO_BIN_EXE_coca-worker"))
        .args([
            "pretrain",
            "--eval_steps",
            "2",
            "--output_dir",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--classification_eval"));
}
