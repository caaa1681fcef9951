//! Elastic membership over loopback (`--nnodes MIN:MAX`): a lost node restarts the job on the
//! nodes that are left, a node that comes back joins at the next restart, too few nodes end
//! the job, and a first rendezvous whose time is up starts with at least MIN nodes.

use super::tests::{
    failure, next_event, node, rendezvous_all, token, worker, HEARTBEAT_TIMEOUT, LONG, SLACK,
};
use super::*;
use std::thread;
use std::time::{Duration, Instant};

fn config(
    min_nnodes: usize,
    nnodes: usize,
    max_restarts: u32,
    rdzv_timeout: Duration,
) -> ServerConfig {
    ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        token: token(),
        nnodes,
        min_nnodes,
        rdzv_timeout,
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        max_restarts,
        handshake: Default::default(),
    }
}

fn elastic_server(
    min_nnodes: usize,
    nnodes: usize,
    max_restarts: u32,
    rdzv_timeout: Duration,
) -> ControlServer {
    ControlServer::start(config(min_nnodes, nnodes, max_restarts, rdzv_timeout)).unwrap()
}

fn node_ranks(plan: &Plan) -> Vec<usize> {
    plan.nodes.iter().map(|n| n.node_rank).collect()
}

fn expect_restart(client: &ControlClient, generation: u64) -> FailureReport {
    match next_event(client, HEARTBEAT_TIMEOUT + SLACK) {
        Event::Restart {
            generation: g,
            failure,
        } if g == generation => failure,
        other => panic!("expected a restart as generation {generation}, got {other:?}"),
    }
}

#[test]
fn a_lost_node_restarts_the_job_on_the_nodes_left_and_a_returning_node_joins_the_next() {
    let srv = elastic_server(2, 3, 2, LONG);
    let addr = srv.local_addr();
    let mut nodes: Vec<_> = (0..3).map(|r| node(addr, r, 1)).collect();
    let plans = rendezvous_all(&nodes);
    assert_eq!(node_ranks(&plans[0]), [0, 1, 2]);
    // Host 2 drops off the network: its worker's silence is noticed while its launcher's
    // session still lingers, so the rendezvous must wait for that session to end, not time out.
    let w2 = worker(addr, 2, 0);
    w2.pause_heartbeats();
    thread::sleep(Duration::from_millis(300));
    nodes[2].pause_heartbeats();
    let lost = nodes.pop().unwrap();
    for n in &nodes {
        let f = expect_restart(n, 1);
        assert!(f.cause.starts_with("node 2 unreachable"), "{}", f.cause);
    }
    let started = Instant::now();
    let plans = rendezvous_all(&nodes);
    assert!(plans.iter().all(|p| p == &plans[0]));
    let plan = &plans[0];
    assert_eq!((plan.generation, plan.world), (1, 2));
    assert_eq!(node_ranks(plan), [0, 1]);
    assert_eq!((plan.rank_offset(0), plan.rank_offset(1)), (0, 1));
    assert!(started.elapsed() < HEARTBEAT_TIMEOUT + SLACK, "{started:?}");
    // Node 2's session ended outside a running generation: no failure of generation 1.
    assert!(nodes[0]
        .events()
        .recv_timeout(Duration::from_millis(300))
        .is_err());
    lost.vanish();
    w2.vanish();

    // Its launcher, started again, waits for the next restart instead of joining generation 1.
    let back = node(addr, 2, 1);
    thread::scope(|s| {
        let joining = s.spawn(|| back.rendezvous(LONG));
        thread::sleep(Duration::from_millis(500));
        assert!(!joining.is_finished(), "node 2 joined a running generation");
        nodes[0].report_failure(failure(1, 0, 0)).unwrap();
        expect_restart(&nodes[0], 2);
        let plans = rendezvous_all(&nodes);
        let back_plan = joining.join().unwrap().unwrap();
        assert_eq!(back_plan, plans[0]);
        assert_eq!((back_plan.generation, back_plan.world), (2, 3));
        assert_eq!(node_ranks(&back_plan), [0, 1, 2]);
    });
    expect_restart(&back, 2); // it heard the restart it was waiting for
                              // No restart left: the next failure ends the job.
    nodes[1].report_failure(failure(2, 1, 1)).unwrap();
    assert!(matches!(
        next_event(&back, SLACK),
        Event::Abort {
            failure: Some(_),
            ..
        }
    ));
}

#[test]
fn a_restart_with_fewer_than_min_nodes_left_ends_the_job_naming_them() {
    let srv = elastic_server(2, 3, 2, LONG);
    let addr = srv.local_addr();
    let mut nodes: Vec<_> = (0..3).map(|r| node(addr, r, 1)).collect();
    rendezvous_all(&nodes);
    nodes.pop().unwrap().vanish();
    nodes.pop().unwrap().vanish();
    let started = Instant::now();
    // The first loss restarts; the second leaves node 0 alone, below MIN, whichever way the
    // verdict comes (an abort, or the restart's rendezvous refusing to start).
    let message = match next_event(&nodes[0], HEARTBEAT_TIMEOUT + SLACK) {
        Event::Restart { .. } => match nodes[0].rendezvous(LONG) {
            Err(e) => format!("{e:#}"),
            Ok(plan) => panic!("a generation started below MIN: {plan:?}"),
        },
        Event::Abort { reason, .. } => reason,
        other => panic!("expected a restart or an abort, got {other:?}"),
    };
    assert!(
        message.contains("only 1 node(s) left (node 0), fewer than the 2 that --nnodes 2:3 needs"),
        "{message}"
    );
    assert!(started.elapsed() < 2 * HEARTBEAT_TIMEOUT + SLACK);
}

#[test]
fn a_first_rendezvous_whose_time_is_up_starts_with_at_least_min_nodes() {
    let srv = elastic_server(2, 3, 0, Duration::from_millis(1500));
    let addr = srv.local_addr();
    let nodes: Vec<_> = (0..2).map(|r| node(addr, r, 2)).collect();
    let started = Instant::now();
    let plans = rendezvous_all(&nodes);
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert_eq!((node_ranks(&plans[0]), plans[0].world), (vec![0, 1], 4));
    // Both nodes done finishes the job although node 2 never came.
    for n in &nodes {
        n.report_done().unwrap();
    }
    assert_eq!(next_event(&nodes[0], SLACK), Event::Finished);
    // A fixed-size job's rendezvous times out instead (tests.rs), and MIN above MAX is refused.
    let bad = ControlServer::start(config(4, 3, 0, LONG));
    assert!(format!("{:#}", bad.unwrap_err()).contains("min_nnodes"));
}
