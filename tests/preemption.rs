//! Preemption: the checkpoint signal (to the launcher, or to every worker directly as SLURM
//! delivers it) and a SIGTERM make every rank save one checkpoint at the same step and stop with
//! exit code 76; the job resumed from it ends where an uninterrupted run ends.

mod common;

use common::jobs::{alive, descendants, kill, Job};
use common::training::{
    assert_same_losses, assert_same_weights, launcher_flags, pretrain_flags, run_alone,
    run_launcher, wait_for_steps, with, JOB_LIMIT,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The launchers' and workers' "preempted" exit code.
const EXIT_PREEMPTED: i32 = 76;
/// How long a preempted job may take from the signal to its last process's exit.
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// A launched training job of `nproc` workers writing into `tmp/<name>`.
struct Run {
    job: Job,
    out: PathBuf,
    logs: PathBuf,
    worker: Vec<String>,
    nproc: usize,
}

impl Run {
    fn start(tmp: &Path, name: &str, nproc: usize, worker: Vec<String>) -> Run {
        let logs = tmp.join(format!("{name}-logs"));
        let out = PathBuf::from(
            worker[worker.iter().position(|a| a == "--output_dir").unwrap() + 1].clone(),
        );
        let job = Job::start(
            "coca-launch",
            &launcher_flags(&launcher(nproc, &logs), &worker),
        );
        Run {
            job,
            out,
            logs,
            worker,
            nproc,
        }
    }

    /// Waits for the job's end after a signal: exit code 76, every rank's log naming the same
    /// step, one checkpoint of that step, no process left. Returns the step and the time the
    /// job took to stop after `signalled`.
    fn assert_preempted(&mut self, workers: &[u32], signalled: Instant, total: usize) -> u64 {
        let (code, out, err) = self.job.finish(STOP_LIMIT);
        let took = signalled.elapsed();
        assert_eq!(code, EXIT_PREEMPTED, "{out}\n{err}");
        let step = preempted_step(&err).unwrap_or_else(|| panic!("no summary line: {err}"));
        assert!(step < total as u64, "preempted at {step} of {total}");
        for rank in 0..self.nproc {
            let log = std::fs::read_to_string(self.logs.join(format!("workerlog.{rank}"))).unwrap();
            assert!(
                log.contains(&format!(
                    "rank {rank}: preempted at step {step}, checkpoint "
                )),
                "rank {rank} did not stop at step {step}:\n{log}"
            );
        }
        let dirs: Vec<String> = std::fs::read_dir(&self.out)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains("checkpoint"))
            .collect();
        assert_eq!(dirs, [format!("checkpoint-{step}")], "one whole checkpoint");
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                self.out
                    .join(format!("checkpoint-{step}/trainer_state.json")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(state["global_step"], step);
        let deadline = Instant::now() + Duration::from_secs(5);
        while workers.iter().any(|&p| alive(p)) {
            assert!(Instant::now() < deadline, "workers left: {workers:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "preempted at step {step}: {:.2} s from the signal to the launcher's exit",
            took.as_secs_f64()
        );
        step
    }

    /// Runs the job again as a requeued one would (`--resume_from_checkpoint True`); it must
    /// finish.
    fn resume(&self) {
        let worker = with(self.worker.clone(), &["--resume_from_checkpoint", "True"]);
        let out = run_launcher(launcher_flags(&launcher(self.nproc, &self.logs), &worker));
        assert!(out.contains("resuming from"), "{out}");
    }
}

fn launcher(nproc: usize, logs: &Path) -> Vec<String> {
    [
        "--nproc-per-node",
        &nproc.to_string(),
        "--log-dir",
        logs.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// N of the launcher's `preempted at step N, checkpoint DIR`.
fn preempted_step(stderr: &str) -> Option<u64> {
    let rest = stderr.split("coca-launch: preempted at step ").nth(1)?;
    rest.split(',').next()?.parse().ok()
}

/// Trains the uninterrupted reference: `steps` steps of a global batch of 8, as one process.
fn reference(tmp: &Path, config: &str, steps: usize) -> PathBuf {
    let dir = tmp.join("single");
    run_alone(&pretrain_flags(config, &dir, 8, steps));
    dir
}

fn final_weights(dir: &Path, steps: usize) -> PathBuf {
    dir.join(format!("checkpoint-{steps}/model.safetensors"))
}

#[test]
fn usr1_to_the_launcher_checkpoints_every_rank_at_one_step_and_the_requeued_run_ends_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let steps = 40;
    let single = reference(tmp.path(), &config, steps);

    let out = tmp.path().join("dp2");
    let mut run = Run::start(
        tmp.path(),
        "dp2",
        2,
        pretrain_flags(&config, &out, 4, steps),
    );
    wait_for_steps(&out, 3, JOB_LIMIT);
    let workers = descendants(run.job.pid());
    assert_eq!(workers.len(), 2, "two workers");
    let signalled = Instant::now();
    run.job.signal("-USR1");
    run.assert_preempted(&workers, signalled, steps);

    run.resume();
    assert_same_weights(
        &final_weights(&single, steps),
        &final_weights(&out, steps),
        1e-5,
        "dp 2 preempted and resumed",
    );
    // Every step logged once: the preempted run's, then the resumed run's.
    assert_same_losses(&single, &out, "dp 2 preempted and resumed");
}

#[test]
fn usr1_to_every_worker_under_tensor_parallelism_and_zero_makes_one_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let steps = 40;
    let single = reference(tmp.path(), &config, steps);

    // tp 2 × sharding 2 (stage 2): 4 workers, dp 1 × sharding 2 read 4 samples each.
    let out = tmp.path().join("tp2-zero2");
    let worker = with(
        pretrain_flags(&config, &out, 4, steps),
        &[
            "--tensor_parallel_degree",
            "2",
            "--sharding_parallel_degree",
            "2",
            "--sharding",
            "stage2",
        ],
    );
    let mut run = Run::start(tmp.path(), "tp2-zero2", 4, worker);
    wait_for_steps(&out, 3, JOB_LIMIT);
    let workers = descendants(run.job.pid());
    assert_eq!(workers.len(), 4, "four workers");
    // As SLURM delivers it: to every process of the job, the workers one after another (each
    // runs in a process group of its own), a few milliseconds apart, then the launcher.
    let signalled = Instant::now();
    for &pid in &workers {
        kill(pid, "-USR1");
        std::thread::sleep(Duration::from_millis(30));
    }
    run.job.signal("-USR1");
    run.assert_preempted(&workers, signalled, steps);

    run.resume();
    assert_same_weights(
        &final_weights(&single, steps),
        &final_weights(&out, steps),
        1e-5,
        "tp 2 × sharding 2 preempted and resumed",
    );
}

#[test]
fn sigterm_checkpoints_like_usr1_and_alone_too() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let steps = 100_000;

    let out = tmp.path().join("term");
    let mut run = Run::start(
        tmp.path(),
        "term",
        2,
        pretrain_flags(&config, &out, 4, steps),
    );
    wait_for_steps(&out, 2, JOB_LIMIT);
    let workers = descendants(run.job.pid());
    let signalled = Instant::now();
    run.job.signal("-TERM");
    run.assert_preempted(&workers, signalled, steps);

    // A worker started by hand: SIGUSR1 checkpoints and stops it with the same code.
    let alone = tmp.path().join("alone");
    let flags = pretrain_flags(&config, &alone, 8, steps);
    let mut job = Job::start("coca-worker", &flags);
    wait_for_steps(&alone, 2, JOB_LIMIT);
    job.signal("-USR1");
    let (code, out, err) = job.finish(STOP_LIMIT);
    assert_eq!(code, EXIT_PREEMPTED, "{out}\n{err}");
    let line = err
        .lines()
        .find(|l| l.contains("rank 0: preempted at step "))
        .unwrap_or_else(|| panic!("{err}"));
    let step: u64 = line
        .split("preempted at step ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(alone
        .join(format!("checkpoint-{step}/model.safetensors"))
        .is_file());
}

#[test]
fn an_unknown_checkpoint_signal_is_a_one_line_usage_error_before_any_worker_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    let (code, _, err) = common::run(
        "coca-launch",
        &[
            "--checkpoint-signal",
            "FOO",
            "--nproc-per-node",
            "2",
            "--log-dir",
            logs.to_str().unwrap(),
            "--",
            "pretrain",
        ],
    );
    assert_eq!(code, 2, "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(errors.len(), 1, "one line: {err}");
    assert!(
        errors[0].starts_with("coca-launch: error: --checkpoint-signal \"FOO\"")
            && errors[0].contains("USR1"),
        "{err}"
    );
    assert!(!logs.exists(), "no worker started");
}
