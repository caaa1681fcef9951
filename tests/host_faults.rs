//! Faults on the wire between hosts (`common::hosts`): an unplugged host stops every launcher
//! within the heartbeat timeout plus the grace period, named "node 1 unreachable" or, seen from
//! the other nodes, "lost node 0" (exit 3), with no process left on any host; a 100 Mbit/s link
//! still carries the ring's all-reduce near its rate; 5 % packet loss each way slows a job down
//! but it ends with the same parameters. The measured figures are printed (README, multi-node).
//! The tests take turns: their timings must not depend on each other's load.

mod common;

use common::host_jobs::{assert_no_process_left, finish_all, start_launchers, wait_for_stderr};
use common::hosts::{skip_without, Hosts};
use common::jobs::wait_for_path;
use common::training::{median_samples_per_s, pretrain_flags, Reference};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const JOB_LIMIT: Duration = Duration::from_secs(300);
const HEARTBEAT_TIMEOUT_S: u64 = 4;
const GRACE_PERIOD_S: u64 = 2;
/// Beyond heartbeat timeout + grace: the last heartbeat's age, the abort's delivery, reaping.
const SLACK: Duration = Duration::from_secs(3);

/// One test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts a long 2-host × 2-worker run, waits until it is training, unplugs `victim`'s host and
/// checks how every launcher ends. Returns (seconds to the first verdict, seconds until every
/// launcher exited).
fn unplug_mid_run(victim: usize) -> (f64, f64) {
    let Some(hosts) = Hosts::new(2) else {
        return (0.0, 0.0);
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let out_dir = tmp.path().join("run");
    let worker = pretrain_flags(&config, &out_dir, 4, 100_000);
    let hb = HEARTBEAT_TIMEOUT_S.to_string();
    let grace = GRACE_PERIOD_S.to_string();
    let extra = ["--heartbeat-timeout", &hb, "--grace-period", &grace];
    let mut jobs = start_launchers(&hosts, 2, &tmp.path().join("logs"), &extra, &worker);
    wait_for_path(&out_dir.join("metrics.jsonl"), JOB_LIMIT);
    std::thread::sleep(Duration::from_millis(500)); // mid-step
    hosts.unplug(victim);
    let unplugged = Instant::now();
    let limit = Duration::from_secs(HEARTBEAT_TIMEOUT_S + GRACE_PERIOD_S) + SLACK;
    // Node 0's control plane names the node it no longer hears; the other node loses node 0.
    let (watched, needle) = if victim == 0 {
        (1, "lost node 0")
    } else {
        (0, "node 1 unreachable")
    };
    let noticed = wait_for_stderr(&mut jobs[watched], needle, limit);
    let mut stderr = Vec::new();
    for (node, job) in jobs.iter_mut().enumerate() {
        let left = limit.saturating_sub(unplugged.elapsed());
        let code = job.wait(left);
        let err = job.output().1;
        let expected = if node == 0 { 1 } else { 3 };
        assert_eq!(code, Some(expected), "node {node}\n{err}");
        stderr.push(err);
    }
    let all_stopped = unplugged.elapsed();
    let noticed = noticed
        .unwrap_or_else(|| panic!("{needle:?} never came: {stderr:?}"))
        .duration_since(unplugged);
    assert!(
        stderr[0].contains("node 1 unreachable") && !stderr[0].contains("killed"),
        "node 0's summary: {}",
        stderr[0]
    );
    assert!(
        stderr[1].contains("lost node 0 (host0"),
        "node 1: {}",
        stderr[1]
    );
    assert!(all_stopped <= limit, "took {all_stopped:?}");
    assert_no_process_left(&hosts);
    (noticed.as_secs_f64(), all_stopped.as_secs_f64())
}

#[test]
fn an_unplugged_host_stops_every_node_within_the_heartbeat_timeout_and_grace() {
    let _turn = serial();
    for victim in [1, 0] {
        let (noticed, stopped) = unplug_mid_run(victim);
        eprintln!(
            "host {victim} unplugged (heartbeat timeout {HEARTBEAT_TIMEOUT_S} s, grace \
             {GRACE_PERIOD_S} s): detected after {noticed:.1} s, every launcher exited after \
             {stopped:.1} s"
        );
    }
}

/// The bus bandwidth (GB/s) `bench-collectives` reports for one all-reduce of `bytes` between
/// one worker on each host.
fn bus_bandwidth(hosts: &Hosts, bytes: usize, tmp: &Path) -> f64 {
    let worker: Vec<String> = [
        "bench-collectives",
        "--bytes",
        &bytes.to_string(),
        "--warmup",
        "1",
        "--iters",
        "5",
    ]
    .map(String::from)
    .to_vec();
    let mut jobs = start_launchers(hosts, 1, &tmp.join("logs"), &[], &worker);
    let report = jobs[0].finish(JOB_LIMIT);
    finish_all(&mut jobs[1..], JOB_LIMIT, "bench-collectives, node 1");
    assert_eq!(report.0, 0, "{report:?}");
    let line = report
        .1
        .lines()
        .find_map(|l| l.strip_prefix("[rank 0] "))
        .unwrap_or_else(|| panic!("no report: {report:?}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["busbw_gb_s"].as_f64().unwrap()
}

#[test]
fn the_ring_all_reduce_runs_near_a_100_mbit_limit() {
    let _turn = serial();
    let Some(hosts) = Hosts::new(2) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let unlimited = bus_bandwidth(&hosts, 8 << 20, tmp.path());
    hosts.limit_bandwidth(1, 100);
    let limited = bus_bandwidth(&hosts, 8 << 20, tmp.path());
    let limit_gb_s = 100e6 / 8.0 / 1e9;
    eprintln!(
        "all-reduce of 8 MiB between 2 hosts: bus bandwidth {:.1} MB/s unlimited, {:.2} MB/s \
         at 100 Mbit/s ({:.0} % of the link's 12.5 MB/s)",
        unlimited * 1e3,
        limited * 1e3,
        100.0 * limited / limit_gb_s
    );
    assert!(
        (0.6 * limit_gb_s..=1.05 * limit_gb_s).contains(&limited),
        "bus bandwidth {limited} GB/s at a limit of {limit_gb_s} GB/s"
    );
}

#[test]
fn with_5_percent_packet_loss_each_way_a_job_ends_with_the_same_parameters() {
    let _turn = serial();
    if skip_without("nft") {
        return;
    }
    let Some(hosts) = Hosts::new(2) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (steps, batch) = (8, 8);
    let reference = Reference::train(tmp.path(), batch, steps);
    let mut speed = Vec::new();
    for loss in [0, 5] {
        if loss > 0 {
            hosts.drop_packets(1, loss);
        }
        let out_dir = tmp.path().join(format!("loss{loss}"));
        let worker = pretrain_flags(&reference.config, &out_dir, batch / 2, steps);
        let mut jobs = start_launchers(&hosts, 1, &tmp.path().join("logs"), &[], &worker);
        let what = format!("{loss} % loss");
        finish_all(&mut jobs, JOB_LIMIT, &what);
        speed.push(median_samples_per_s(&out_dir));
        reference.assert_same_run(&out_dir, &what);
    }
    eprintln!(
        "2 hosts × 1 worker, batch {batch}: {:.1} samples/s without loss, {:.1} samples/s with \
         5 % loss each way ({:.1}× slower)",
        speed[0],
        speed[1],
        speed[0] / speed[1]
    );
    assert_no_process_left(&hosts);
}
