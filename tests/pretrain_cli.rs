//! `coca-worker pretrain` end to end: flags, checkpoints, exact resume, and that the demo learns.

mod common;

use std::path::Path;

fn pretrain(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["pretrain", "--disable_tqdm", "True"];
    all.extend_from_slice(args);
    common::run("coca-worker", &all)
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn resumed_run_matches_an_uninterrupted_one_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let common_flags = [
        "--model",
        &config,
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "2",
        "--logging_steps",
        "1",
        "--save_total_limit",
        "5",
        "--seed",
        "3",
    ];
    let mut first: Vec<&str> = common_flags.to_vec();
    first.extend(["--output_dir", a.to_str().unwrap(), "--save_steps", "3"]);
    let (code, out, err) = pretrain(&first);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(a.join("checkpoint-3/model.safetensors").is_file());
    assert!(a.join("checkpoint-6/optimizer.safetensors").is_file());
    assert!(a.join("loss_curve.png").is_file());

    let ckpt = a.join("checkpoint-3");
    let mut second: Vec<&str> = common_flags.to_vec();
    second.extend([
        "--output_dir",
        b.to_str().unwrap(),
        "--resume_from_checkpoint",
        ckpt.to_str().unwrap(),
    ]);
    let (code, out, err) = pretrain(&second);
    assert_eq!(code, 0, "{out}\n{err}");
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(ma.len(), 6);
    assert_eq!(mb.len(), 3, "the resumed run logs steps 4..6");
    for (x, y) in ma[3..].iter().zip(&mb) {
        assert_eq!(x["step"], y["step"]);
        for key in [
            "loss",
            "contrastive_loss",
            "caption_loss",
            "grad_norm",
            "learning_rate",
        ] {
            assert_eq!(
                x[key], y[key],
                "{key} at step {} differs after resuming",
                x["step"]
            );
        }
    }
    let fa = std::fs::read(a.join("checkpoint-6/model.safetensors")).unwrap();
    let fb = std::fs::read(b.join("checkpoint-6/model.safetensors")).unwrap();
    assert!(fa == fb, "final weights differ after resuming");
}

#[test]
fn corrupt_or_foreign_checkpoints_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let out_dir = tmp.path().join("run");
    let base = [
        "--model",
        &config,
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--output_dir",
        out_dir.to_str().unwrap(),
    ];
    let (code, out, err) = pretrain(&base);
    assert_eq!(code, 0, "{out}\n{err}");
    // Another model config.
    let (code, _, err) = pretrain(&[
        "--max_steps",
        "3",
        "--output_dir",
        out_dir.to_str().unwrap(),
        "--resume_from_checkpoint",
        "True",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("another model config"), "{err}");
    // A truncated weights file.
    let weights = out_dir.join("checkpoint-2/model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 3]).unwrap();
    let mut resume = base.to_vec();
    resume.extend(["--resume_from_checkpoint", "true"]);
    let (code, _, err) = pretrain(&resume);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("model.safetensors"),
        "the error must name the file: {err}"
    );
}

#[test]
fn flags_are_checked() {
    let (code, _, err) = pretrain(&["--per_device_train_batch_sise", "4"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("per-device-train-batch-size"),
        "a suggestion is expected: {err}"
    );
    // One process cannot hold two tensor-parallel ranks: the error shows the arithmetic.
    let (code, _, err) = pretrain(&["--tensor_parallel_degree", "2"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("tensor_parallel_degree 2") && err.contains("1 / 2"),
        "{err}"
    );
    let (code, _, err) = pretrain(&["--sharding", "stage3", "--sharding_parallel_degree", "2"]);
    assert_eq!(code, 2);
    assert!(err.contains("stage3"), "{err}");
    let (code, _, err) = pretrain(&["--bf16", "True", "--fp16", "True"]);
    assert_eq!(code, 2);
    assert!(err.contains("--bf16") && err.contains("--fp16"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (code, _, err) = pretrain(&["--fp16", "True", "--fp16_opt_level", "O3"]);
    assert_eq!(code, 2);
    assert!(err.contains("--fp16_opt_level \"O3\""), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A missing coco_karpathy under a root not named `coco`: an error, nothing downloaded.
    let tmp = tempfile::tempdir().unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    let (code, _, err) = pretrain(&[
        "--task_name",
        "coco_karpathy",
        "--data_root",
        elsewhere.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("coco_karpathy_train.json") && err.contains("elsewhere"),
        "{err}"
    );
    // Under PaddleMIX's data folder it would be downloaded; offline, the error says where the
    // archive comes from and where it goes, and nothing is requested.
    let out = std::process::Command::new(common::binary("coca-worker"))
        .args(["pretrain", "--task_name", "coco_karpathy"])
        .env("PPMIX_HOME", tmp.path())
        .env("COCA_OFFLINE", "1")
        .env("COCA_PADDLEMIX_DATA_URL", "http://127.0.0.1:9/datasets")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("offline") && err.contains("http://127.0.0.1:9/datasets/coco.tar"),
        "{err}"
    );
    assert!(
        err.contains(&tmp.path().join("datasets").display().to_string()),
        "{err}"
    );
    let (code, _, err) = pretrain(&["--do-train", "maybe"]);
    assert_eq!(code, 2);
    assert!(err.contains("True or False"), "{err}");
}

/// A shorter version of the README's demo must learn: a regression in any gradient shows up
/// here as a loss that stops falling.
#[test]
fn the_demo_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("demo");
    let (code, out, err) = pretrain(&[
        "--max_steps",
        "60",
        "--logging_steps",
        "10",
        "--output_dir",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let m = metrics(&out_dir);
    let (first, last) = (
        m[0]["loss"].as_f64().unwrap(),
        m[m.len() - 1]["loss"].as_f64().unwrap(),
    );
    assert!(last * 2.5 < first, "loss fell only from {first} to {last}");
    assert!(out.contains("zero-shot on 500 held-out"), "{out}");
    assert!(out_dir.join("demo_results.json").is_file());
}

/// The TensorBoard event file under `dir/runs/`.
fn event_file(dir: &Path) -> std::path::PathBuf {
    let runs: Vec<_> = std::fs::read_dir(dir.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let files: Vec<_> = std::fs::read_dir(&runs[0])
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("events.out.tfevents."))
        })
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

/// With stderr a pipe and `--disable_tqdm False` there is no bar, but a metrics line every
/// `--logging_steps`; the start-up block comes first; the TensorBoard events hold what
/// `metrics.jsonl` holds.
#[test]
fn startup_block_metric_lines_off_a_terminal_and_tensorboard_events() {
    use coca_worker::pretrain::tensorboard::read_scalars;
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let folder = tmp.path().join("colours");
    common::images::write_folder(&folder);
    let out_dir = tmp.path().join("run");
    let (code, out, err) = common::run(
        "coca-worker",
        &[
            "pretrain",
            "--disable_tqdm",
            "False",
            "--model",
            &config,
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--logging_steps",
            "2",
            "--classification_eval",
            folder.to_str().unwrap(),
            "--eval_steps",
            "2",
            "--output_dir",
            out_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!err.contains('\u{1b}'), "{err}");
    let block = err.find("pretrain:").expect("the start-up block");
    let first_step = err.find("step 2 epoch").expect("a metrics line at step 2");
    assert!(block < first_step, "{err}");
    let parameters = coca_worker::model::manifest::parameter_count(
        &coca_worker::model::CocaConfig::from_file(Path::new(&config)).unwrap(),
    )
    .unwrap();
    assert_eq!(parameters, 3_227_105);
    for needle in [
        "tiny.json (3,227,105 parameters)",
        "random initialisation (seed 42)",
        "data        the built-in synthetic captioning set\n  samples     20,000\n",
        "world 1 = dp 1 x sharding 1 x tp 1",
        "global 4 = 4 per device x 1 data ranks x 1 accumulation",
        "steps       4",
        "precision   fp32",
    ] {
        assert!(err.contains(needle), "{needle:?} missing:\n{err}");
    }
    assert!(err.contains("step 4 epoch"), "{err}");
    assert!(
        !err.contains("step 1 epoch"),
        "only every --logging_steps: {err}"
    );

    let scalars = read_scalars(&event_file(&out_dir)).unwrap();
    let lines = metrics(&out_dir);
    let mut compared = 0;
    for line in &lines {
        let step = line["step"].as_i64().unwrap();
        let pairs = [
            ("train/loss", "loss"),
            ("train/contrastive_loss", "contrastive_loss"),
            ("train/caption_loss", "caption_loss"),
            ("train/learning_rate", "learning_rate"),
            ("train/grad_norm", "grad_norm"),
            ("train/samples_per_s", "samples_per_s"),
            ("eval/zeroshot_top1", "zeroshot_top1"),
            ("eval/zeroshot_top5", "zeroshot_top5"),
        ];
        for (tag, key) in pairs {
            let Some(expected) = line[key].as_f64() else {
                continue;
            };
            let got = scalars
                .iter()
                .find(|(s, t, _)| *s == step && t == tag)
                .unwrap_or_else(|| panic!("{tag} at step {step} missing: {scalars:?}"));
            assert_eq!(got.2, expected as f32, "{tag} at step {step}");
            compared += 1;
        }
    }
    // Steps 2 and 4: six training scalars each, and two zero-shot evaluations (top-1 only:
    // four classes have no top-5).
    assert_eq!(compared, 2 * 6 + 2, "{lines:?}");
    assert_eq!(scalars.len(), compared);
}
