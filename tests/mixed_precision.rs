//! `--bf16 True` and `--fp16 True` end to end: 6-step runs of the tiny model track the float32
//! trajectory, data parallelism equals the one-process mixed-precision run, and the float16
//! loss scaler follows GradScaler's rules (overflow skips the step and halves the scale, clean
//! steps double it, a resumed run keeps it).

mod common;

use common::jobs::Job;
use common::training::{
    assert_same_weights, launcher_flags, losses, metric, pretrain_flags, run_alone, with,
};
use std::path::Path;
use std::time::Duration;

const STEPS: usize = 6;
const BATCH: usize = 8;

fn weights(dir: &Path, step: usize) -> std::path::PathBuf {
    dir.join(format!("checkpoint-{step}/model.safetensors"))
}

fn state(dir: &Path, step: usize) -> serde_json::Value {
    let text =
        std::fs::read_to_string(dir.join(format!("checkpoint-{step}/trainer_state.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A 6-step run of the tiny model with `extra` flags in `tmp/name`.
fn train(tmp: &Path, config: &str, name: &str, extra: &[&str]) -> std::path::PathBuf {
    let dir = tmp.join(name);
    let flags = with(pretrain_flags(config, &dir, BATCH, STEPS), extra);
    run_alone(&with(flags, &["--save_steps", "3"]));
    dir
}

#[test]
fn bf16_and_fp16_track_float32_and_data_parallel_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let f32_dir = train(tmp.path(), &config, "f32", &[]);
    let reference = losses(&f32_dir);
    assert_eq!(reference.len(), STEPS);
    // fp16 starts from a scale that does not overflow at once, so every step is applied.
    let runs: [(&str, &[&str]); 2] = [
        ("bf16", &["--bf16", "True"]),
        ("fp16", &["--fp16", "True", "--fp16_init_scale", "1024"]),
    ];
    for (name, flags) in runs {
        let dir = train(tmp.path(), &config, name, flags);
        let got = losses(&dir);
        assert_eq!(got.len(), STEPS, "{name}: every step applied and logged");
        for (step, (a, b)) in reference.iter().zip(&got).enumerate() {
            let rel = (a - b).abs() / a.abs();
            assert!(
                rel <= 0.02,
                "{name} step {}: loss {b} vs float32 {a}",
                step + 1
            );
            // Not float32 by accident: half-precision products change the losses.
            if step > 0 {
                assert!(
                    a != b,
                    "{name} step {}: loss equals float32 exactly",
                    step + 1
                );
            }
        }
        assert_same_weights(&weights(&f32_dir, STEPS), &weights(&dir, STEPS), 1e-2, name);

        // Two data-parallel processes end like the one-process run in the same precision.
        let dp = tmp.path().join(format!("{name}-dp2"));
        let worker = with(pretrain_flags(&config, &dp, BATCH / 2, STEPS), flags);
        let logs = dp.join("logs");
        let mut job = Job::start(
            "coca-launch",
            &launcher_flags(
                &["--nproc-per-node", "2", "--log-dir", logs.to_str().unwrap()],
                &worker,
            ),
        );
        let (code, out, err) = job.finish(Duration::from_secs(240));
        assert_eq!(code, 0, "{name} dp 2\n{out}\n{err}");
        // Not bit for bit: a rank's half-precision weight gradient rounds its half of the
        // batch's sum, the one process rounds the whole sum (as DDP under autocast does).
        let single = losses(&dir);
        let two = losses(&dp);
        assert_eq!(single.len(), two.len(), "{name} dp 2");
        for (a, b) in single.iter().zip(&two) {
            assert!(
                (a - b).abs() <= 5e-4 * a.abs(),
                "{name} dp 2: loss {b} vs {a}"
            );
        }
        let what = format!("{name} dp 2");
        assert_same_weights(&weights(&dir, STEPS), &weights(&dp, STEPS), 5e-3, &what);
    }
}

#[test]
fn an_fp16_overflow_skips_that_step_and_halves_the_scale_and_clean_steps_double_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    // Growth every 2 clean steps; an overflow injected into the 4th step (index 3):
    // 1024 → (2 clean) 2048 → (1 clean, checkpoint 3) → overflow 1024 → (2 clean) 2048.
    let flags = [
        "--fp16",
        "True",
        "--fp16_init_scale",
        "1024",
        "--fp16_growth_interval",
        "2",
        "--fp16_inject_overflow_step",
        "3",
    ];
    let dir = train(tmp.path(), &config, "fp16", &flags);
    let norms = metric(&dir, "grad_norm");
    assert_eq!(metric(&dir, "loss").len(), STEPS);
    // A skipped step logs no finite gradient norm: exactly the 4th.
    assert_eq!(norms.len(), STEPS - 1, "{norms:?}");
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let skipped: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| !m["grad_norm"].is_f64())
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, [4]);
    let at3 = state(&dir, 3);
    assert_eq!(at3["loss_scaler"]["scale"], 2048.0);
    assert_eq!(at3["loss_scaler"]["growth_tracker"], 1);
    let end = state(&dir, STEPS);
    assert_eq!(end["loss_scaler"]["scale"], 2048.0);
    assert_eq!(end["loss_scaler"]["growth_tracker"], 0);
    assert_eq!(end["adam_step"], STEPS as u64 - 1, "one update skipped");

    // Resumed from step 3 it ends exactly where the uninterrupted run did: the scale (2048,
    // not the initial 1024) and its growth count come from the checkpoint.
    let resumed = tmp.path().join("resumed");
    let ckpt = dir.join("checkpoint-3");
    let mut worker = with(pretrain_flags(&config, &resumed, BATCH, STEPS), &flags);
    worker = with(
        worker,
        &["--resume_from_checkpoint", ckpt.to_str().unwrap()],
    );
    run_alone(&worker);
    assert_eq!(state(&resumed, STEPS)["loss_scaler"], end["loss_scaler"]);
    let a = std::fs::read(weights(&dir, STEPS)).unwrap();
    let b = std::fs::read(weights(&resumed, STEPS)).unwrap();
    assert!(a == b, "final weights differ after resuming");
}

#[test]
fn precision_flags_that_contradict_are_refused_before_the_model_is_built() {
    for args in [
        &["pretrain", "--bf16", "True", "--fp16", "True"][..],
        &["pretrain", "--fp16", "True", "--fp16_opt_level", "O3"],
        &["check-args", "pretrain", "--bf16", "--fp16"],
        &["check-args", "pretrain", "--fp16_opt_level", "O0"],
    ] {
        let (code, out, err) = common::run("coca-worker", args);
        assert_eq!(code, 2, "{args:?}\n{out}\n{err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains("--bf16") || err.contains("--fp16_opt_level"),
            "{err}"
        );
    }
}
