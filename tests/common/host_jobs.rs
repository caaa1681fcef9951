//! One `coca-launch` per test host (`hosts.rs`), node `i` on host `i`, node 0's host name as
//! `--master-addr`: a multi-node job as it runs on a cluster.

use super::hosts::Hosts;
use super::jobs::Job;
use super::training::{launcher_flags, TOKEN};
use std::path::Path;
use std::time::{Duration, Instant};

/// The launchers of one job: node `i` on host `i`, `nproc` workers each, `extra` launcher flags
/// (an `--nnodes` there replaces the host count).
pub fn start_launchers(
    hosts: &Hosts,
    nproc: usize,
    log_dir: &Path,
    extra: &[&str],
    worker: &[String],
) -> Vec<Job> {
    (0..hosts.len())
        .map(|node| start_launcher(hosts, node, nproc, log_dir, extra, worker))
        .collect()
}

/// The launcher of node `node` on host `node` (logs in `log_dir/node<node>`), as
/// [`start_launchers`] starts each.
pub fn start_launcher(
    hosts: &Hosts,
    node: usize,
    nproc: usize,
    log_dir: &Path,
    extra: &[&str],
    worker: &[String],
) -> Job {
    let (nnodes, nproc, node_s) = (hosts.len().to_string(), nproc.to_string(), node.to_string());
    let log_dir = log_dir.join(format!("node{node}"));
    let mut flags = vec![
        "--node-rank",
        &node_s,
        "--nproc-per-node",
        &nproc,
        "--master-addr",
        "host0",
        "--rdzv-token",
        TOKEN,
        "--rdzv-timeout",
        "60",
        "--log-dir",
        log_dir.to_str().expect("utf-8 path"),
    ];
    if !extra.contains(&"--nnodes") {
        flags.extend(["--nnodes", &nnodes]);
    }
    flags.extend_from_slice(extra);
    hosts.start(node, "coca-launch", &launcher_flags(&flags, worker), &[])
}

/// Waits for every launcher (bounded by `limit` in all) and asserts that each exits 0; returns
/// their stderr, joined, and how long the job took.
pub fn finish_all(jobs: &mut [Job], limit: Duration, what: &str) -> (String, Duration) {
    let start = Instant::now();
    let mut stderr = String::new();
    for (node, job) in jobs.iter_mut().enumerate() {
        let left = limit.saturating_sub(start.elapsed());
        let (code, out, err) = job.finish(left);
        assert_eq!(code, 0, "{what}: node {node}\n{out}\n{err}");
        stderr.push_str(&err);
    }
    (stderr, start.elapsed())
}

/// Asserts that no process is left on any host, waiting up to 5 s for the last to go.
pub fn assert_no_process_left(hosts: &Hosts) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<(usize, Vec<u32>)> = (0..hosts.len())
            .map(|i| (i, hosts.pids(i)))
            .filter(|(_, pids)| !pids.is_empty())
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes left on hosts: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `job` until its stderr contains `needle` or it ends; when it appeared.
pub fn wait_for_stderr(job: &mut Job, needle: &str, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if job.output().1.contains(needle) {
            return Some(Instant::now());
        }
        if job.wait(Duration::from_millis(50)).is_some() {
            return job.output().1.contains(needle).then(Instant::now);
        }
    }
    None
}
