//! Training jobs in tests: a short `pretrain` on the synthetic set with the tiny model, its
//! one-process reference, and the comparison of the parameters and losses two runs ended with.

use super::jobs::Job;
use std::path::Path;
use std::time::Duration;

/// How long a training job of these tests may take.
pub const JOB_LIMIT: Duration = Duration::from_secs(240);

/// `pretrain` flags of a short run on the synthetic set with the tiny model.
pub fn pretrain_flags(
    config: &str,
    out: &Path,
    per_device_batch: usize,
    steps: usize,
) -> Vec<String> {
    [
        "pretrain",
        "--model",
        config,
        "--max_steps",
        &steps.to_string(),
        "--per_device_train_batch_size",
        &per_device_batch.to_string(),
        "--learning_rate",
        "1e-3",
        // open_clip's epsilon for ViT CoCa; with 1e-8, parameters whose true gradient is zero
        // (the key bias: softmax ignores it) move by Adam-normalised rounding noise.
        "--adam_epsilon",
        "1e-6",
        "--warmup_steps",
        "2",
        "--logging_steps",
        "1",
        "--seed",
        "5",
        "--disable_tqdm",
        "True",
        "--output_dir",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `list` (the launcher's flags), `--`, then the worker command.
pub fn launcher_flags<S: AsRef<str>>(list: &[S], worker: &[String]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.as_ref().to_string()).collect();
    v.push("--".into());
    v.extend_from_slice(worker);
    v
}

/// `pretrain` flags of tensor parallelism 2 × ZeRO stage-2 sharding 2 (4 workers).
pub const TP2_SHARDING2: [&str; 6] = [
    "--tensor_parallel_degree",
    "2",
    "--sharding_parallel_degree",
    "2",
    "--sharding",
    "stage2",
];

/// The secret of the simulated multi-node jobs.
pub const TOKEN: &str = "a-test-secret-of-enough-length";

/// Every tensor of `b` within `tol` of `a`, absolute or relative to the tensor's largest
/// magnitude (parameters that start at zero stay small for the first steps).
pub fn assert_same_weights(a: &Path, b: &Path, tol: f32, what: &str) {
    let (a, b) = (super::load(a), super::load(b));
    assert_eq!(a.len(), b.len(), "{what}: different tensor sets");
    let mut worst = (0f32, 0f32, String::new());
    for (name, ta) in &a {
        let tb = b
            .get(name)
            .unwrap_or_else(|| panic!("{what}: {name} is missing"));
        let diff = super::max_abs_diff(ta, tb);
        let rel = diff / super::max_abs(ta).max(1e-12);
        assert!(
            diff <= tol || rel <= tol,
            "{what}: {name} differs by {diff:.3e} ({rel:.3e} relative; tolerance {tol:.0e})"
        );
        if diff > worst.0 {
            worst = (diff, rel, name.clone());
        }
    }
    eprintln!(
        "{what}: largest difference {:.3e} ({:.3e} relative) in {}",
        worst.0, worst.1, worst.2
    );
}

/// The losses rank 0 logged.
pub fn losses(out: &Path) -> Vec<f64> {
    metric(out, "loss")
}

/// Every value of `name` rank 0 logged, in step order.
pub fn metric(out: &Path, name: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?[name].as_f64())
        .collect()
}

/// Waits until rank 0 logged `steps` steps into `out/metrics.jsonl` (at `--logging_steps 1`).
pub fn wait_for_steps(out: &Path, steps: usize, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let logged =
            std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
        if logged >= steps {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} logged {logged} of {steps} steps within {limit:?}",
            out.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The loss rank 0 logged for each step, the last one where a restart logged a step again.
pub fn losses_by_step(out: &Path) -> std::collections::BTreeMap<u64, f64> {
    let steps = metric(out, "step");
    steps
        .iter()
        .zip(losses(out))
        .map(|(&step, loss)| (step as u64, loss))
        .collect()
}

/// The median training speed after the first step (which warms up), in samples/s.
pub fn median_samples_per_s(out: &Path) -> f64 {
    let mut speeds = metric(out, "samples_per_s");
    speeds.remove(0);
    speeds.sort_by(f64::total_cmp);
    speeds[speeds.len() / 2]
}

/// Runs `coca-launch` with `flags`; it must succeed. Returns its standard output.
pub fn run_launcher(flags: Vec<String>) -> String {
    let mut job = Job::start("coca-launch", &flags);
    let (code, out, err) = job.finish(JOB_LIMIT);
    assert_eq!(code, 0, "coca-launch {flags:?}\n{out}\n{err}");
    out
}

/// Runs `pretrain` with `flags` under a one-node launcher of `nproc` workers.
pub fn launch_local(nproc: usize, worker: &[String], log_dir: &Path) {
    run_launcher(launcher_flags(
        &[
            "--nproc-per-node",
            &nproc.to_string(),
            "--log-dir",
            log_dir.to_str().unwrap(),
        ],
        worker,
    ));
}

/// Runs `coca-worker` with `flags` as a job of one; it must succeed. Returns what it printed
/// (standard output, then standard error).
pub fn run_alone(flags: &[String]) -> String {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (code, out, err) = super::run("coca-worker", &flags);
    assert_eq!(code, 0, "{out}\n{err}");
    out + &err
}

/// `flags` followed by `extra`.
pub fn with(mut flags: Vec<String>, extra: &[&str]) -> Vec<String> {
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

/// The losses rank 0 logged in `got` are `reference`'s, step for step (1e-5 relative).
pub fn assert_same_losses(reference: &Path, got: &Path, what: &str) {
    let (a, b) = (losses(reference), losses(got));
    assert_eq!(a.len(), b.len(), "{what}: {b:?} vs {a:?}");
    for (a, b) in a.iter().zip(&b) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{what}: loss {b} vs {a}");
    }
}

/// A one-process run of the tiny model that other layouts must end like.
pub struct Reference {
    /// The tiny model config, written beside the run.
    pub config: String,
    /// The run's `--output_dir`.
    pub dir: std::path::PathBuf,
    /// Its steps.
    pub steps: usize,
}

impl Reference {
    /// Trains `steps` steps of `global_batch` as one process in `tmp/single`.
    pub fn train(tmp: &Path, global_batch: usize, steps: usize) -> Reference {
        Self::train_with(tmp, global_batch, steps, &[])
    }

    /// [`Self::train`] with `extra` worker flags (which the runs compared with it pass too).
    pub fn train_with(tmp: &Path, global_batch: usize, steps: usize, extra: &[&str]) -> Reference {
        let config = super::tiny_config(tmp);
        let dir = tmp.join("single");
        run_alone(&with(
            pretrain_flags(&config, &dir, global_batch, steps),
            extra,
        ));
        Reference { config, dir, steps }
    }

    /// The last checkpoint's weights of the run in `dir`.
    pub fn final_weights(&self, dir: &Path) -> std::path::PathBuf {
        dir.join(format!("checkpoint-{}/model.safetensors", self.steps))
    }

    /// The run in `out_dir`, restarted along the way (steps after its checkpoint logged again),
    /// ended with this run's parameters, and its last loss of every step is this run's.
    pub fn assert_same_restarted_run(&self, out_dir: &Path, what: &str) {
        let (ours, theirs) = (self.final_weights(&self.dir), self.final_weights(out_dir));
        assert_same_weights(&ours, &theirs, 1e-5, what);
        let (got, expected) = (losses_by_step(out_dir), losses_by_step(&self.dir));
        assert_eq!(got.len(), self.steps, "{what}: {got:?}");
        for (step, loss) in &expected {
            let g = got[step];
            assert!(
                (g - loss).abs() <= 1e-5 * loss.abs(),
                "{what}: step {step}: {g} vs {loss}"
            );
        }
    }

    /// The run in `out_dir` logged every step and ended with this run's parameters and losses.
    pub fn assert_same_run(&self, out_dir: &Path, what: &str) {
        let (ours, theirs) = (self.final_weights(&self.dir), self.final_weights(out_dir));
        assert_same_weights(&ours, &theirs, 1e-5, what);
        assert_eq!(losses(out_dir).len(), self.steps, "{what}");
        assert_same_losses(&self.dir, out_dir, what);
    }
}
