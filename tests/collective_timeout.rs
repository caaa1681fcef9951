//! `--collective-timeout` end to end: a value that cannot be honoured is a usage error, and a
//! worker frozen (SIGSTOP) in the middle of a run of all-reduces makes its peer's collective
//! fail within the timeout, naming the group, the operation and the rank it waits on, so that
//! the launcher stops the job with that in its summary.

mod common;

use common::jobs::{alive, kill, worker_pid, Job};
use std::time::{Duration, Instant};

/// Whether `pid` runs the ring's sender thread, i.e. its world group has formed.
fn ring_formed(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "ring-send")
    })
}

#[test]
fn a_collective_timeout_that_cannot_be_honoured_is_a_usage_error() {
    for bad in ["0", "-5", "ten"] {
        let flag = format!("--collective-timeout={bad}");
        let (code, _, err) = common::run("coca-launch", &[&flag, "--", "--version"]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("--collective-timeout"), "{bad}: {err}");
        assert!(!err.contains("[rank 0]"), "{bad}: a worker started: {err}");
    }
}

#[test]
fn a_frozen_worker_stops_the_job_naming_the_group_operation_and_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let log_dir = tmp.path().display().to_string();
    let args = [
        "--standalone",
        "--nproc-per-node",
        "2",
        "--collective-timeout",
        "2",
        // The frozen worker's heartbeats stop too: the collective timeout must come first.
        "--heartbeat-timeout",
        "60",
        "--grace-period",
        "1",
        "--log-dir",
        &log_dir,
        "--",
        "bench-collectives",
        "--bytes",
        "4096",
        "--warmup",
        "0",
        "--iters",
        "100000000",
    ]
    .map(String::from);
    let mut job = Job::start("coca-launch", &args);
    let victim = worker_pid(job.pid(), 1, Duration::from_secs(30));
    let survivor = worker_pid(job.pid(), 0, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(ring_formed(victim) && ring_formed(survivor)) {
        assert!(Instant::now() < deadline, "the ring never formed");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300)); // all-reduces under way
    kill(victim, "-STOP");
    let frozen_at = Instant::now();
    let code = job.wait(Duration::from_secs(15));
    let took = frozen_at.elapsed();
    if alive(victim) {
        kill(victim, "-CONT");
    }
    let (_, err) = job.output();
    assert_eq!(
        code,
        Some(124),
        "a collective timeout has an exit code of its own\n{err}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "stopped {took:?} after the freeze\n{err}"
    );
    assert!(err.contains("rank 0"), "{err}");
    assert!(
        err.contains("ring \"gen0/world/0\": collective timeout"),
        "{err}"
    );
    assert!(
        err.contains("during all_reduce(Avg)") || err.contains("during barrier"),
        "{err}"
    );
    assert!(err.contains("waiting for rank 1 (global rank 1)"), "{err}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !alive(victim) && !alive(survivor),
        "a worker outlived the job"
    );
}
