//! Elastic restart on one machine (`coca-launch --nnodes 1:2`, both nodes on loopback, so it
//! runs without the host harness): node 1's launcher is killed, the job goes on on node 0 alone
//! with each micro-batch whole on its one worker, node 1's launcher started again waits to join
//! at a restart that never comes and exits 0 when the job finishes, and the job ends with the
//! one-process parameters and losses.

mod common;

use common::host_jobs::wait_for_stderr;
use common::jobs::{free_udp_port, kill, loopback_node_flags, wait_for_path, Job};
use common::training::{launcher_flags, pretrain_flags, with, Reference, JOB_LIMIT, TOKEN};
use std::time::Duration;

#[test]
fn a_job_that_loses_node_1_ends_on_node_0_and_node_1_back_too_late_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 30;
    // Micro-batches of 4: 2 per worker on 2 nodes, 4 on node 0 alone.
    let reference = Reference::train(tmp.path(), 4, steps);
    let out_dir = tmp.path().join("elastic");
    let worker = with(
        pretrain_flags(&reference.config, &out_dir, 2, steps),
        &["--save_steps", "1"],
    );
    let port = free_udp_port().to_string();
    let extra = [
        "--max-restarts",
        "1",
        "--heartbeat-timeout",
        "3",
        "--grace-period",
        "1",
    ];
    let start = |node: usize, logs: &str| {
        let flags = loopback_node_flags("1:2", node, &port, TOKEN, &tmp.path().join(logs), &extra);
        Job::start("coca-launch", &launcher_flags(&flags, &worker))
    };
    let mut node0 = start(0, "logs");
    let node1 = start(1, "logs");
    wait_for_path(&out_dir.join("checkpoint-2"), JOB_LIMIT);
    kill(node1.pid(), "-9"); // its worker follows (parent-death signal)
    let alone = "generation 1: 1 node, dp 1, per-device batch 4 × gradient accumulation 1 \
                 (global batch 4 unchanged; 1 of 2 nodes)";
    let limit = Duration::from_secs(30);
    assert!(
        wait_for_stderr(&mut node0, alone, limit).is_some(),
        "{:?}",
        node0.output()
    );
    let mut back = start(1, "logs-back");
    let joining = "node 1: joining the job's rendezvous";
    assert!(
        wait_for_stderr(&mut back, joining, limit).is_some(),
        "{:?}",
        back.output()
    );
    let (code, out, err) = node0.finish(JOB_LIMIT);
    assert_eq!(code, 0, "node 0\n{out}\n{err}");
    let (code, out, err) = back.finish(limit);
    assert_eq!(code, 0, "node 1, back\n{out}\n{err}");
    assert!(err.contains("the job finished without node 1"), "{err}");
    reference.assert_same_restarted_run(&out_dir, "2 nodes, then 1");
}
