//! The two command lines of PaddleMIX's CoCa README (`paddlemix/examples/coca/README.md`),
//! pasted token for token: training under `coca-launch --nproc_per_node 8 --` in place of
//! `python -m paddle.distributed.launch --nproc_per_node 8 run_pretrain_dist.py`, and
//! evaluation with `coca-worker eval` in place of `python .../run_zero_shot_eval.py`, alone and
//! launched. Only the model (a fixture-sized one), the ImageNet folder (a test folder) and the
//! data (a small local set, `--task_name` and `--max_steps` added) are swapped. Also: the
//! output is plain text (no terminal colour codes) in the launcher's output and every worker
//! log.

mod common;

use std::path::Path;

/// `$TEXT_MODEL_NAME` of the README.
const TEXT_MODEL_NAME: &str = "CoCa-ViT-L-14-laion2B-s13B-b90k";

/// The README's training command after `run_pretrain_dist.py`, verbatim (shell quotes removed
/// as the shell removes them), with `MODEL` and `IN_1K_DIR` to fill in.
const TRAIN: &[&str] = &[
    "--dataloader_num_workers=2",
    "--per_device_train_batch_size",
    "16",
    "--per_device_eval_batch_size",
    "8",
    "--model",
    "MODEL",
    "--warmup_steps",
    "2000",
    "--learning_rate",
    "5e-4",
    "--weight_decay",
    "0.05",
    "--adam_beta1",
    "0.9",
    "--adam_beta2",
    "0.999",
    "--adam_epsilon",
    "1e-8",
    "--max_grad_norm",
    "5.0",
    "--num_train_epochs",
    "200",
    "--tensor_parallel_degree",
    "1",
    "--sharding_parallel_degree",
    "8",
    "--sharding",
    "stage2",
    "--bf16",
    "False",
    "--output_dir",
    "./output",
    "--logging_steps",
    "1",
    "--do_train",
    "--disable_tqdm",
    "True",
    "--save_steps",
    "50000",
    "--local_loss",
    "true",
    "--gather_with_grad",
    "true",
    "--pretrained_text_model",
    TEXT_MODEL_NAME,
    "--classification_eval",
    "IN_1K_DIR",
];

/// The README's evaluation command after `run_zero_shot_eval.py`, verbatim.
const EVAL: &[&str] = &[
    "--per_device_eval_batch_size",
    "32",
    "--dataloader_num_workers=2",
    "--model",
    "MODEL",
    "--fp16",
    "False",
    "--pretrained_text_model",
    TEXT_MODEL_NAME,
    "--classification_eval",
    "IN_1K_DIR",
    "--output_dir",
    "output",
    "--disable_tqdm",
    "False",
];

/// `tokens` with `MODEL` and `IN_1K_DIR` replaced.
fn filled(tokens: &[&str], model: &str, in1k: &str) -> Vec<String> {
    tokens
        .iter()
        .map(|t| match *t {
            "MODEL" => model.to_string(),
            "IN_1K_DIR" => in1k.to_string(),
            t => t.to_string(),
        })
        .collect()
}

/// Whether `text` holds an ESC byte (the start of a terminal colour code).
fn has_escape(text: &str) -> bool {
    text.contains('\u{1b}')
}

/// A coco_karpathy-format training set of `n` records over the fixture's images.
fn write_train_set(dir: &Path, fixture: &Path, n: usize) -> String {
    let images = [
        "astronaut.png",
        "chelsea.jpg",
        "coffee_rgba.png",
        "camera_gray.png",
    ];
    for name in images {
        std::fs::copy(fixture.join("images").join(name), dir.join(name)).unwrap();
    }
    let records: Vec<_> = (0..n)
        .map(|i| {
            serde_json::json!({
                "caption": format!("picture number {} of a thing", i % 7),
                "image": images[i % images.len()],
                "image_id": format!("coco_{i}"),
            })
        })
        .collect();
    let path = dir.join("train.json");
    std::fs::write(&path, serde_json::to_string(&records).unwrap()).unwrap();
    path.display().to_string()
}

#[test]
fn the_readme_training_command_runs_under_the_launcher() {
    let Some(fixture) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let in1k = tmp.path().join("in1k");
    common::images::write_folder(&in1k);
    let train = write_train_set(tmp.path(), &fixture, 256);
    let mut command = vec!["--nproc_per_node", "8", "--", "pretrain"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    command.extend(filled(
        TRAIN,
        fixture.to_str().unwrap(),
        in1k.to_str().unwrap(),
    ));
    command.extend([
        "--task_name".into(),
        train,
        "--max_steps".into(),
        "2".into(),
    ]);
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let (code, out, err) = common::run_in(Some(tmp.path()), "coca-launch", &args, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let output = tmp.path().join("output");
    assert!(
        output.join("checkpoint-2/model.safetensors").is_file(),
        "{out}"
    );
    let metrics = std::fs::read_to_string(output.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.contains("\"step\":2") && metrics.contains("zeroshot_top1"),
        "{metrics}"
    );
    // --pretrained_text_model names the classifier file, as in PaddleMIX.
    let classifier = output.join(format!("{TEXT_MODEL_NAME}_in1k_classifier.safetensors"));
    assert!(classifier.is_file(), "{} is missing", classifier.display());
    // The start-up block, once, from rank 0, with the layout of the command.
    assert_eq!(out.matches("pretrain:").count(), 1, "{out}");
    assert!(
        out.contains("world 8 = dp 1 x sharding 8 (stage2) x tp 1")
            && out.contains("global 128 = 16 per device x 8 data ranks")
            && out.contains("fp32"),
        "{out}"
    );
    // Plain text everywhere: the launcher's output and every worker's log.
    assert!(!has_escape(&out) && !has_escape(&err), "{out}\n{err}");
    for rank in 0..8 {
        let log =
            std::fs::read_to_string(tmp.path().join(format!("log/workerlog.{rank}"))).unwrap();
        assert!(!has_escape(&log), "workerlog.{rank}: {log}");
    }
}

#[test]
fn the_readme_evaluation_command_runs_alone_and_launched() {
    let Some(fixture) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let in1k = tmp.path().join("in1k");
    common::images::write_folder(&in1k);
    let mut command = vec!["eval".to_string()];
    command.extend(filled(
        EVAL,
        fixture.to_str().unwrap(),
        in1k.to_str().unwrap(),
    ));
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let (code, out, err) = common::run_in(Some(tmp.path()), "coca-worker", &args, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!has_escape(&out) && !has_escape(&err), "{out}\n{err}");
    let printed: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let file = tmp.path().join("output/eval_results.json");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(
        written["results"][0], printed,
        "the file holds what was printed"
    );
    assert_eq!(printed["eval"], "classification");
    assert_eq!(printed["images"], 12);
    assert!(printed["top1"].as_f64().is_some());
    let settings = &written["settings"];
    assert_eq!(settings["per_device_eval_batch_size"], 32);
    assert_eq!(settings["dataloader_num_workers"], 2);
    assert_eq!(settings["pretrained_text_model"], TEXT_MODEL_NAME);
    assert_eq!(settings["precision"], "fp32");
    // The classifier cache has PaddleMIX's name, beside the data.
    let cache = in1k.join(format!("{TEXT_MODEL_NAME}_in1k_classifier.safetensors"));
    assert!(cache.is_file(), "{}", cache.display());
    assert_eq!(printed["classifier_cached"], false);

    // Launched on 2 workers: the same numbers, from the cache this time.
    std::fs::remove_file(&file).unwrap();
    let mut launched = vec!["--nproc_per_node".to_string(), "2".into(), "--".into()];
    launched.extend(command);
    let args: Vec<&str> = launched.iter().map(String::as_str).collect();
    let (code, out, err) = common::run_in(Some(tmp.path()), "coca-launch", &args, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(written["results"][0]["top1"], printed["top1"]);
    assert_eq!(written["results"][0]["classifier_cached"], true);
    assert_eq!(written["settings"]["world_size"], 2);
    assert!(!has_escape(&out) && !has_escape(&err), "{out}\n{err}");

    // --fp16 True with --bf16 True is refused, naming the flags, before any model is built.
    let mut fp16 = args[3..].to_vec();
    let at = fp16.iter().position(|a| *a == "False").unwrap();
    fp16[at] = "True";
    fp16.extend(["--bf16", "True"]);
    let (code, _, err) = common::run_in(Some(tmp.path()), "coca-worker", &fp16, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--fp16 True"), "{err}");
}
