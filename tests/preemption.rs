//! Preemption: the checkpoint signal (to the launcher, or to every worker directly as SLURM
//! delivers it) and a SIGTERM make every rank save one checkpoint at the same step and stop with
//! exit code 76; the job resumed from it ends where an uninterrupted run ends.

mod common;

use common::jobs::{alive, descendants, kill, Job};
use common::training::{
    assert_same_losses, assert_same_weights, launcher_flags, pretrain_flags, run_alone,
    run_launcher, wait_for_steps, with, JOB_LIMIT, TP2_SHARDING2,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The launchers' and workers' "preempted" exit code.
const EXIT_PREEMPTED: i32 = 76;
/// How long a preempted job may take from the signal to its last process's exit.
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// A launched training job of `nproc` workers writing into `tmp/<name>`, past its third step.
struct Run {
    job: Job,
    out: PathBuf,
    logs: PathBuf,
    worker: Vec<String>,
    nproc: usize,
    /// The worker processes.
    workers: Vec<u32>,
}

impl Run {
    /// Starts `nproc` workers of 4 samples each on `steps` steps of the tiny model, with
    /// `extra` worker flags and `launcher_extra` launcher flags, and waits for step 3.
    fn start(
        tmp: &Path,
        name: &str,
        nproc: usize,
        steps: usize,
        extra: &[&str],
        launcher_extra: &[&str],
    ) -> Run {
        let config = common::tiny_config(tmp);
        let out = tmp.join(name);
        let logs = tmp.join(format!("{name}-logs"));
        let worker = with(pretrain_flags(&config, &out, 4, steps), extra);
        let job = Job::start(
            "coca-launch",
            &launcher_flags(&with(launcher(nproc, &logs), launcher_extra), &worker),
        );
        wait_for_steps(&out, 3, JOB_LIMIT);
        let workers = descendants(job.pid());
        assert_eq!(workers.len(), nproc, "{nproc} workers");
        Run {
            job,
            out,
            logs,
            worker,
            nproc,
            workers,
        }
    }

    /// Waits for the job's end after a signal sent at `signalled`: exit code 76, every rank's
    /// log naming the same step, one checkpoint of that step, no process left. Returns the step.
    fn assert_preempted(&mut self, signalled: Instant, total: usize) -> u64 {
        let (code, out, err) = self.job.finish(STOP_LIMIT);
        let took = signalled.elapsed();
        assert_eq!(code, EXIT_PREEMPTED, "{out}\n{err}");
        let step = preempted_step(&err, "coca-launch: preempted at step ")
            .unwrap_or_else(|| panic!("no summary line: {err}"));
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
        assert_eq!(
            checkpoint_entries(&self.out),
            [format!("checkpoint-{step}")],
            "one whole checkpoint"
        );
        let state = self
            .out
            .join(format!("checkpoint-{step}/trainer_state.json"));
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
        assert_eq!(state["global_step"], step);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.workers.iter().any(|&p| alive(p)) {
            assert!(
                Instant::now() < deadline,
                "workers left: {:?}",
                self.workers
            );
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

/// Names in `out` that are checkpoints or their staging directories.
fn checkpoint_entries(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("checkpoint"))
        .collect()
}

/// N of `<prefix>N, checkpoint DIR` in `text`.
fn preempted_step(text: &str, prefix: &str) -> Option<u64> {
    let rest = text.split(prefix).nth(1)?;
    rest.split(',').next()?.parse().ok()
}

/// Preempts a job of `nproc` workers (global batch 8, `extra` flags) with `send` after step 3,
/// checks the stop, runs it again from the checkpoint, and compares it with one uninterrupted
/// process: the same final parameters, and every step's loss logged once.
fn preempt_and_resume(name: &str, nproc: usize, extra: &[&str], send: impl FnOnce(&Run)) {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 40;
    let single = tmp.path().join("single");
    run_alone(&pretrain_flags(
        &common::tiny_config(tmp.path()),
        &single,
        8,
        steps,
    ));
    let mut run = Run::start(tmp.path(), name, nproc, steps, extra, &[]);
    let signalled = Instant::now();
    send(&run);
    run.assert_preempted(signalled, steps);
    run.resume();
    let last = format!("checkpoint-{steps}/model.safetensors");
    assert_same_weights(&single.join(&last), &run.out.join(&last), 1e-5, name);
    assert_same_losses(&single, &run.out, name);
}

#[test]
fn usr1_to_the_launcher_checkpoints_every_rank_at_one_step_and_the_requeued_run_ends_alike() {
    preempt_and_resume("dp2", 2, &[], |run| run.job.signal("-USR1"));
}

#[test]
fn usr1_to_every_worker_under_tensor_parallelism_and_zero_makes_one_checkpoint() {
    // As SLURM delivers it: to every process of the job, the workers one after another (each
    // runs in a process group of its own), a few milliseconds apart, then the launcher.
    preempt_and_resume("tp2-zero2", 4, &TP2_SHARDING2, |run| {
        for &pid in &run.workers {
            kill(pid, "-USR1");
            std::thread::sleep(Duration::from_millis(30));
        }
        run.job.signal("-USR1");
    });
}

#[test]
fn sigterm_checkpoints_like_usr1_and_alone_too() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 100_000;
    let mut run = Run::start(tmp.path(), "term", 2, steps, &[], &[]);
    let signalled = Instant::now();
    run.job.signal("-TERM");
    run.assert_preempted(signalled, steps);

    // A worker started by hand: SIGUSR1 checkpoints and stops it with the same code.
    let alone = tmp.path().join("alone");
    let flags = pretrain_flags(&common::tiny_config(tmp.path()), &alone, 8, steps);
    let mut job = Job::start("coca-worker", &flags);
    wait_for_steps(&alone, 2, JOB_LIMIT);
    job.signal("-USR1");
    let (code, out, err) = job.finish(STOP_LIMIT);
    assert_eq!(code, EXIT_PREEMPTED, "{out}\n{err}");
    let step =
        preempted_step(&err, "rank 0: preempted at step ").unwrap_or_else(|| panic!("{err}"));
    assert!(alone
        .join(format!("checkpoint-{step}/model.safetensors"))
        .is_file());
}
#[test]
fn a_sigterm_whose_checkpoint_cannot_be_taken_in_time_stops_the_job_after_term_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let launcher_extra = ["--term-timeout", "2", "--grace-period", "1"];
    let mut run = Run::start(tmp.path(), "stuck", 2, 100_000, &[], &launcher_extra);
    // A frozen rank never announces its step, so no step can be agreed.
    kill(run.workers[1], "-STOP");
    let signalled = Instant::now();
    run.job.signal("-TERM");
    let (code, out, err) = run.job.finish(STOP_LIMIT);
    let took = signalled.elapsed();
    assert_eq!(code, 128 + 15, "{out}\n{err}");
    assert!(
        err.contains("took no checkpoint within --term-timeout 2 s"),
        "{err}"
    );
    // The timeout, the grace period, and the launcher's own shutdown.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(run.workers.iter().all(|&p| !alive(p)), "workers left");
    let left = checkpoint_entries(&run.out);
    assert!(
        !left.iter().any(|n| n.starts_with("checkpoint-")),
        "no checkpoint was written: {left:?}"
    );
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
