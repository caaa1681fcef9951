//! Elastic restart across hosts (`coca-launch --nnodes MIN:MAX`, `common::hosts`): 3 hosts ×
//! 1 worker train data-parallel, host 2 is unplugged after step 3, and the job restarts on the
//! 2 hosts left, each rank taking a larger share of every micro-batch so that the global batch
//! is unchanged. Host 2 comes back and its launcher is started again: it waits, and joins at the
//! next restart (a worker killed on host 1), so the job ends on 3 hosts again — with the
//! uninterrupted one-process run's parameters and losses. The time from the unplug to the job
//! training again on 2 hosts is printed (README, restarts).

mod common;

use common::host_jobs::{assert_no_process_left, start_launcher, start_launchers, wait_for_stderr};
use common::hosts::Hosts;
use common::jobs::{kill, wait_for_path, worker_pid};
use common::training::{losses_by_step, pretrain_flags, with, Reference, JOB_LIMIT};
use std::time::{Duration, Instant};

const HEARTBEAT_TIMEOUT_S: u64 = 4;
const GRACE_PERIOD_S: u64 = 2;

#[test]
fn a_job_that_loses_a_host_continues_on_the_others_and_takes_it_back_with_the_same_trajectory() {
    let Some(hosts) = Hosts::new(3) else { return };
    let tmp = tempfile::tempdir().unwrap();
    // dp 3 × batch 2 × accumulation 2 = 12 per step; on 2 hosts dp 2 × batch 3 × 2. The
    // reference takes each micro-batch of 6 whole, as one process.
    let (steps, accumulation) = (30, ["--gradient_accumulation_steps", "2"]);
    let reference = Reference::train_with(tmp.path(), 6, steps, &accumulation);
    let out_dir = tmp.path().join("elastic");
    let worker = with(
        pretrain_flags(&reference.config, &out_dir, 2, steps),
        &[&accumulation[..], &["--save_steps", "1"]].concat(),
    );
    let (hb, grace) = (HEARTBEAT_TIMEOUT_S.to_string(), GRACE_PERIOD_S.to_string());
    let extra = [
        "--nnodes",
        "2:3",
        "--max-restarts",
        "2",
        "--heartbeat-timeout",
        &hb,
        "--grace-period",
        &grace,
    ];
    let mut jobs = start_launchers(&hosts, 1, &tmp.path().join("logs"), &extra, &worker);
    wait_for_path(&out_dir.join("checkpoint-3"), JOB_LIMIT);
    hosts.unplug(2);
    let unplugged = Instant::now();

    let new_layout = "generation 1: 2 nodes, dp 2, per-device batch 3 × gradient accumulation \
                      2 (global batch 12 unchanged; 2 of 3 nodes)";
    let limit = Duration::from_secs(HEARTBEAT_TIMEOUT_S + GRACE_PERIOD_S + 30);
    let restarted = wait_for_stderr(&mut jobs[0], new_layout, limit);
    // Training again: rank 0 (echoed by node 0) logs a step after resuming from its checkpoint.
    let stepping = {
        let deadline = Instant::now() + limit;
        let stepped = |out: &str| {
            out.find("resuming from")
                .is_some_and(|at| out[at..].contains("] step "))
        };
        while Instant::now() < deadline && !stepped(&jobs[0].output().0) {
            std::thread::sleep(Duration::from_millis(20));
        }
        Instant::now()
    };
    // Host 2's launcher gave up on node 0 (exit 3); the host comes back and its launcher is
    // started again: it waits while generation 1 runs, and joins at the next restart.
    let code = jobs[2].wait(limit);
    assert_eq!(code, Some(3), "node 2: {:?}", jobs[2].output());
    hosts.replug(2);
    let logs = tmp.path().join("logs-back");
    let mut back = start_launcher(&hosts, 2, 1, &logs, &extra, &worker);
    let joining = "node 2: joining the job's rendezvous";
    assert!(
        wait_for_stderr(&mut back, joining, limit).is_some(),
        "{:?}",
        back.output()
    );
    let at_step = losses_by_step(&out_dir).len();
    eprintln!("host 2's launcher is waiting at step {at_step} of {steps}: killing rank 1");
    kill(worker_pid(jobs[1].pid(), 1, limit), "-9");
    let full_layout = "generation 2: 3 nodes, dp 3, per-device batch 2 × gradient accumulation 2 \
                       (global batch 12)";
    let grown = wait_for_stderr(&mut jobs[0], full_layout, limit);
    assert!(grown.is_some(), "{:?}", jobs[0].output());
    let (code, out, err) = back.finish(JOB_LIMIT);
    assert_eq!(code, 0, "node 2, back\n{out}\n{err}");
    assert!(err.contains(full_layout), "{err}");
    // The restart it waited for is no reason to stop the workers it then started.
    assert!(!err.contains("restarting every worker"), "{err}");
    let mut stderr = Vec::new();
    for (node, job) in jobs.iter_mut().enumerate() {
        let (code, out, err) = job.finish(JOB_LIMIT);
        let err = format!("{err}{out}");
        let expected = if node == 2 { 3 } else { 0 };
        assert_eq!(code, expected, "node {node}\n{out}\n{err}");
        stderr.push(err);
    }
    let restarted = restarted
        .unwrap_or_else(|| panic!("no {new_layout:?} from node 0: {}", stderr[0]))
        .duration_since(unplugged);
    assert!(stderr[2].contains("lost node 0"), "node 2: {}", stderr[2]);
    // Node 0's summary names the lost node and each generation's layout; rank 0's start-up
    // block of generation 1 (echoed by node 0) shows the same.
    for needle in [
        "node 2 unreachable",
        "restarting every worker",
        "generation 0: 3 nodes, dp 3, per-device batch 2",
        "global 12 = 3 per device x 2 data ranks x 2 accumulation",
    ] {
        assert!(stderr[0].contains(needle), "{needle:?}: {}", stderr[0]);
    }
    reference.assert_same_restarted_run(&out_dir, "3 hosts, then 2");
    eprintln!(
        "host 2 unplugged after step 3 (heartbeat timeout {HEARTBEAT_TIMEOUT_S} s, grace \
         {GRACE_PERIOD_S} s): generation 1 on 2 hosts after {:.1} s, its first step done after \
         {:.1} s",
        restarted.as_secs_f64(),
        stepping.duration_since(unplugged).as_secs_f64()
    );
    assert_no_process_left(&hosts);
}
