//! Jobs across hosts (network namespaces with their own addresses and names, `common::hosts`):
//! each node advertises the address of its interface that reaches the master — also node 0,
//! whose own name resolves to 127.0.1.1 on its host, as on Debian — and 2 hosts × 2 workers,
//! data-parallel and tp 2 × sharding 2, end with the one-process parameters and losses.

mod common;

use common::host_jobs::{assert_no_process_left, finish_all, start_launchers};
use common::hosts::Hosts;
use common::training::{pretrain_flags, with, Reference};
use std::time::Duration;

const JOB_LIMIT: Duration = Duration::from_secs(240);

#[test]
fn each_node_advertises_the_address_that_reaches_the_master_never_loopback() {
    let Some(hosts) = Hosts::new(2) else { return };
    // node 0's host maps its own name to 127.0.1.1 first.
    let (_, out, _) = hosts.run(0, "getent", &["hosts", "host0"]);
    assert!(out.starts_with("127.0.1.1"), "{out}");
    let tmp = tempfile::tempdir().unwrap();
    let mut jobs = start_launchers(&hosts, 1, tmp.path(), &[], &["--version".to_string()]);
    let (stderr, _) = finish_all(&mut jobs, Duration::from_secs(60), "--version on 2 hosts");
    for node in 0..2 {
        let ip = hosts.host(node).addr;
        assert!(
            stderr.contains(&format!("node {node} advertises {ip} (")),
            "node {node} advertises its host's address {ip}: {stderr}"
        );
    }
    assert!(
        stderr.contains(&format!("master \"host0\" is {}:", hosts.host(0).addr)),
        "the address used is logged: {stderr}"
    );
    assert!(!stderr.contains("advertises 127."), "{stderr}");
    assert_no_process_left(&hosts);
}

#[test]
fn two_hosts_train_the_one_process_parameters_data_parallel_and_tp2_by_sharding2() {
    let Some(hosts) = Hosts::new(2) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (steps, global_batch) = (4, 8);
    let reference = Reference::train(tmp.path(), global_batch, steps);

    // (what, per-device batch, extra worker flags): 2 hosts × 2 workers each.
    let layouts: [(&str, usize, &[&str]); 2] = [
        (
            "dp 4 over 2 hosts",
            global_batch / 4,
            &["--gather_with_grad", "True"],
        ),
        (
            "tp 2 × sharding 2 (stage 2) over 2 hosts",
            global_batch / 2,
            &common::training::TP2_SHARDING2,
        ),
    ];
    for (i, (what, batch, extra)) in layouts.into_iter().enumerate() {
        let out_dir = tmp.path().join(format!("layout{i}"));
        let worker = with(
            pretrain_flags(&reference.config, &out_dir, batch, steps),
            extra,
        );
        let mut jobs = start_launchers(&hosts, 2, &tmp.path().join("logs"), &[], &worker);
        let (_, took) = finish_all(&mut jobs, JOB_LIMIT, what);
        eprintln!("{what}: {steps} steps in {:.1} s", took.as_secs_f64());
        reference.assert_same_run(&out_dir, what);
        assert_no_process_left(&hosts);
    }
}
