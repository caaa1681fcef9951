//! End-to-end tests of the control plane over loopback: real servers and clients, each test
//! bounded in time (short heartbeat and rendezvous timeouts).

use super::*;
use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
pub(super) const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);
pub(super) const LONG: Duration = Duration::from_secs(20);
/// Events caused by a lost peer arrive within the heartbeat timeout plus this.
pub(super) const SLACK: Duration = Duration::from_secs(3);

pub(super) fn token() -> Token {
    Token::from_secret("coca-test-token-0123456789").unwrap()
}

fn server_with(nnodes: usize, max_restarts: u32, rdzv_timeout: Duration) -> ControlServer {
    ControlServer::start(ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        token: token(),
        nnodes,
        min_nnodes: nnodes,
        rdzv_timeout,
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        max_restarts,
        handshake: Default::default(),
    })
    .unwrap()
}

fn server(nnodes: usize, max_restarts: u32) -> ControlServer {
    server_with(nnodes, max_restarts, LONG)
}

pub(super) fn client_config(addr: SocketAddr, token: Token) -> ClientConfig {
    ClientConfig {
        server: addr,
        token,
        connect_timeout: Duration::from_secs(5),
        heartbeat_interval: HEARTBEAT_INTERVAL,
    }
}

pub(super) fn node_identity(node_rank: usize, nproc: usize) -> Identity {
    Identity::Node {
        node_rank,
        nproc,
        host: format!("10.0.0.{node_rank}"),
    }
}

pub(super) fn node(addr: SocketAddr, node_rank: usize, nproc: usize) -> ControlClient {
    ControlClient::connect(
        client_config(addr, token()),
        node_identity(node_rank, nproc),
    )
    .unwrap()
}

pub(super) fn worker(addr: SocketAddr, rank: usize, generation: u64) -> ControlClient {
    ControlClient::connect(
        client_config(addr, token()),
        Identity::Worker { rank, generation },
    )
    .unwrap()
}

/// Rendezvous of all `nodes` at once (each blocks until all joined).
pub(super) fn rendezvous_all(nodes: &[ControlClient]) -> Vec<Plan> {
    thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|n| s.spawn(move || n.rendezvous(LONG)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    })
}

pub(super) fn next_event(client: &ControlClient, within: Duration) -> Event {
    client
        .events()
        .recv_timeout(within)
        .unwrap_or_else(|e| panic!("no event within {within:?}: {e}"))
}

pub(super) fn failure(generation: u64, node_rank: usize, rank: usize) -> FailureReport {
    FailureReport {
        generation,
        node_rank,
        rank: Some(rank),
        pid: Some(4242),
        exit: ExitKind::Code(3),
        cause: "CUDA error: out of memory".into(),
        last_lines: vec!["Traceback".into(), "boom".into()],
        unix_time_s: unix_time_s(),
    }
}

#[test]
fn three_nodes_rendezvous_get_the_same_plan() {
    let srv = server(3, 0);
    let nodes: Vec<_> = (0..3).map(|r| node(srv.local_addr(), r, 4)).collect();
    let plans = rendezvous_all(&nodes);
    let plan = &plans[0];
    assert!(plans.iter().all(|p| p == plan));
    assert_eq!(plan.generation, 0);
    assert_eq!(plan.world, 12);
    assert_eq!(
        plan.nodes.iter().map(|n| n.node_rank).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(plan.nodes[2].host, "10.0.0.2");
    assert_eq!(
        (0..3).map(|r| plan.rank_offset(r)).collect::<Vec<_>>(),
        [0, 4, 8]
    );
    // Asking again gives the same answer.
    assert_eq!(&nodes[1].rendezvous(LONG).unwrap(), plan);
    for n in nodes {
        n.close();
    }
    srv.shutdown();
}

#[test]
fn rendezvous_refuses_bad_nodes() {
    let srv = server(2, 0);
    let addr = srv.local_addr();
    let n0 = node(addr, 0, 4);
    let out_of_range = node(addr, 2, 4);
    let e = out_of_range.rendezvous(LONG).unwrap_err().to_string();
    assert!(e.contains("node_rank 2 is out of range"), "{e}");

    let (first, duplicate, other_nproc) = thread::scope(|s| {
        let first = s.spawn(|| n0.rendezvous(LONG));
        thread::sleep(Duration::from_millis(300));
        let dup = node(addr, 0, 4);
        let e_dup = dup.rendezvous(LONG).unwrap_err().to_string();
        let odd = node(addr, 1, 8);
        let e_odd = odd.rendezvous(LONG).unwrap_err().to_string();
        // The proper node 1 completes the rendezvous for node 0.
        let n1 = node(addr, 1, 4);
        n1.rendezvous(LONG).unwrap();
        (first.join().unwrap(), e_dup, e_odd)
    });
    assert_eq!(first.unwrap().world, 8);
    assert!(duplicate.contains("duplicate node_rank 0"), "{duplicate}");
    assert!(
        other_nproc.contains("node 1 runs nproc 8, but node 0 joined with nproc 4"),
        "{other_nproc}"
    );
    // Refused nodes left without a failure: nobody got an Abort.
    assert!(n0.events().try_recv().is_err());
}

#[test]
fn kv_get_blocks_until_another_client_sets() {
    let srv = server(1, 0);
    let addr = srv.local_addr();
    let a = worker(addr, 0, 0);
    let b = worker(addr, 1, 0);
    let started = Instant::now();
    let value = thread::scope(|s| {
        let getter = s.spawn(|| a.get("ring/rank1", LONG));
        thread::sleep(Duration::from_millis(300));
        // The same client's other requests are not held up by its blocking get.
        a.set("other", b"x").unwrap();
        assert_eq!(a.get("other", Duration::from_secs(1)).unwrap(), b"x");
        b.set("ring/rank1", b"127.0.0.1:29500").unwrap();
        getter.join().unwrap().unwrap()
    });
    assert_eq!(value, b"127.0.0.1:29500");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Through the collectives' trait too.
    let kv: &dyn crate::collective::KeyValue = &b;
    kv.set("k", &[1, 2, 3]).unwrap();
    assert_eq!(kv.get("k", Duration::from_secs(1)).unwrap(), [1, 2, 3]);
    // A get that times out names the key.
    let e = a
        .get("never/set", Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("never/set") && e.contains("not set within"),
        "{e}"
    );
    a.close();
    b.close();
}

#[test]
fn barrier_with_three_participants() {
    let srv = server(1, 0);
    let addr = srv.local_addr();
    let clients: Vec<_> = (0..3).map(|r| worker(addr, r, 0)).collect();
    for round in 0..2 {
        let started = Instant::now();
        thread::scope(|s| {
            let hs: Vec<_> = clients
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    s.spawn(move || {
                        thread::sleep(Duration::from_millis(100 * i as u64));
                        c.barrier("init", 3, LONG)
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap().unwrap();
            }
        });
        assert!(started.elapsed() < Duration::from_secs(5), "round {round}");
    }
    // Two of three: times out, saying how many came.
    let e = thread::scope(|s| {
        let h = s.spawn(|| clients[0].barrier("half", 3, Duration::from_millis(500)));
        let e1 = clients[1]
            .barrier("half", 3, Duration::from_millis(500))
            .unwrap_err()
            .to_string();
        h.join().unwrap().unwrap_err();
        e1
    });
    assert!(
        e.contains("barrier 'half' timed out") && e.contains("of 3"),
        "{e}"
    );
    let e = clients[2]
        .barrier("init", 4, Duration::from_millis(100))
        .unwrap_err()
        .to_string();
    assert!(e.contains("timed out"), "{e}");
}

#[test]
fn bad_token_is_refused_and_the_job_goes_on() {
    let srv = server(2, 0);
    let addr = srv.local_addr();
    let n0 = node(addr, 0, 2);
    let bad = Token::from_secret("not-the-job-token-at-all").unwrap();
    let started = Instant::now();
    let e = ControlClient::connect(client_config(addr, bad), node_identity(1, 2))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "the control plane at {addr} refused us: bad token"
        )) && e.contains("COCA_RDZV_TOKEN"),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let n1 = node(addr, 1, 2);
    let plans = rendezvous_all(&[n0, n1]);
    assert_eq!(plans[0].world, 4);
}

#[test]
fn wrong_protocol_version_is_refused() {
    let srv = server(1, 0);
    let addr = srv.local_addr();
    let e = ControlClient::connect_with_version(
        client_config(addr, token()),
        node_identity(0, 1),
        PROTOCOL_VERSION + 98,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("refused us: wrong protocol version 99") && e.contains(&addr.to_string()),
        "{e}"
    );
    let n0 = node(addr, 0, 1);
    assert_eq!(n0.rendezvous(LONG).unwrap().world, 1);
}

#[test]
fn garbage_datagrams_do_not_disturb_a_rendezvous() {
    let srv = server(2, 0);
    let addr = srv.local_addr();
    let spam = thread::spawn(move || {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..400 {
            let len = 1 + (next() % 1400) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            match i % 4 {
                // Long header, QUIC v1 Initial, random rest.
                0 => {
                    buf.resize(1200.max(len), 0);
                    buf[0] = 0xc0 | (buf[0] & 0x0f);
                    buf[1..5].copy_from_slice(&1u32.to_be_bytes());
                }
                // Short header (1-RTT) with a random connection id.
                1 => buf[0] = 0x40 | (buf[0] & 0x3f),
                _ => {}
            }
            let _ = sock.send_to(&buf, addr);
            if i % 50 == 0 {
                thread::sleep(Duration::from_millis(10));
            }
        }
    });
    let nodes = vec![node(addr, 0, 1), node(addr, 1, 1)];
    let plans = rendezvous_all(&nodes);
    spam.join().unwrap();
    assert_eq!(plans[0], plans[1]);
    nodes[0].set("still", b"fine").unwrap();
    assert_eq!(nodes[1].get("still", LONG).unwrap(), b"fine");
    assert!(nodes[0].events().try_recv().is_err());
}

#[test]
fn rendezvous_timeout_names_the_missing_nodes() {
    let srv = server_with(4, 0, Duration::from_secs(1));
    let addr = srv.local_addr();
    let nodes = [node(addr, 0, 1), node(addr, 2, 1)];
    let started = Instant::now();
    let errors: Vec<String> = thread::scope(|s| {
        let hs: Vec<_> = nodes
            .iter()
            .map(|n| s.spawn(move || n.rendezvous(LONG).unwrap_err().to_string()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    for e in errors {
        assert!(
            e.contains(
                "rendezvous timed out after 1 s: node 1, node 3 never joined (joined: node 0, node 2)"
            ),
            "{e}"
        );
    }
}

#[test]
fn failure_report_aborts_everyone() {
    let srv = server(2, 0);
    let addr = srv.local_addr();
    let nodes = vec![node(addr, 0, 2), node(addr, 1, 2)];
    rendezvous_all(&nodes);
    let w = worker(addr, 3, 0);
    let report = failure(0, 1, 3);
    nodes[1].report_failure(report.clone()).unwrap();
    for c in nodes.iter().chain([&w]) {
        match next_event(c, SLACK) {
            Event::Abort {
                reason,
                failure: Some(f),
            } => {
                assert_eq!(f, report);
                assert!(
                    reason.contains("rank 3 (pid 4242) on node 1 exited with code 3"),
                    "{reason}"
                );
            }
            other => panic!("expected an Abort, got {other:?}"),
        }
    }
    // Later reports are collateral: no second event.
    nodes[0].report_failure(failure(0, 0, 0)).unwrap();
    assert!(nodes[0]
        .events()
        .recv_timeout(Duration::from_millis(300))
        .is_err());
    // Blocking requests after the abort fail at once.
    let e = nodes[0].rendezvous(LONG).unwrap_err().to_string();
    assert!(e.contains("aborted"), "{e}");
}

#[test]
fn restart_then_abort_with_max_restarts_1() {
    let srv = server(2, 1);
    let addr = srv.local_addr();
    let nodes = vec![node(addr, 0, 1), node(addr, 1, 1)];
    assert_eq!(rendezvous_all(&nodes)[0].generation, 0);
    let w0 = worker(addr, 0, 0);
    let first = failure(0, 0, 0);
    nodes[0].report_failure(first.clone()).unwrap();
    for c in nodes.iter().chain([&w0]) {
        assert_eq!(
            next_event(c, SLACK),
            Event::Restart {
                generation: 1,
                failure: first.clone()
            }
        );
    }
    // Reports of the old generation (the killed workers) are collateral.
    nodes[1].report_failure(failure(0, 1, 1)).unwrap();
    // A straggler worker of generation 0 may no longer touch the store.
    let e = w0.set("k", b"v").unwrap_err().to_string();
    assert!(e.contains("belongs to generation 0"), "{e}");
    let plans = rendezvous_all(&nodes);
    assert!(plans.iter().all(|p| p.generation == 1));
    let second = failure(1, 1, 1);
    nodes[1].report_failure(second.clone()).unwrap();
    for c in &nodes {
        match next_event(c, SLACK) {
            Event::Abort {
                failure: Some(f),
                reason,
            } => {
                assert_eq!(f, second);
                assert!(reason.contains("restarts used"), "{reason}");
            }
            other => panic!("expected an Abort, got {other:?}"),
        }
    }
}

#[test]
fn a_launcher_stopped_by_a_signal_ends_the_job_even_with_restarts_left() {
    let srv = server(2, 3);
    let addr = srv.local_addr();
    let nodes = vec![node(addr, 0, 1), node(addr, 1, 1)];
    rendezvous_all(&nodes);
    let stopped = FailureReport {
        rank: None,
        exit: ExitKind::Signal(15),
        ..failure(0, 1, 0)
    };
    nodes[1].report_failure(stopped.clone()).unwrap();
    match next_event(&nodes[0], SLACK) {
        Event::Abort {
            failure: Some(f), ..
        } => assert_eq!(f, stopped),
        other => panic!("expected an Abort, got {other:?}"),
    }
}

#[test]
fn node_vanishing_without_goodbye_aborts_the_others() {
    let srv = server(3, 0);
    let addr = srv.local_addr();
    let mut nodes: Vec<_> = (0..3).map(|r| node(addr, r, 1)).collect();
    rendezvous_all(&nodes);
    let started = Instant::now();
    nodes.pop().unwrap().vanish();
    for c in &nodes {
        match next_event(c, HEARTBEAT_TIMEOUT + SLACK) {
            Event::Abort {
                failure: Some(f), ..
            } => {
                assert_eq!((f.node_rank, f.rank, f.exit), (2, None, ExitKind::Lost));
                assert!(f.cause.contains("node 2 unreachable"), "{}", f.cause);
            }
            other => panic!("expected an Abort, got {other:?}"),
        }
    }
    assert!(started.elapsed() < HEARTBEAT_TIMEOUT + SLACK);
}

#[test]
fn a_node_silent_with_its_workers_is_unreachable_not_a_lost_worker() {
    let srv = server(2, 0);
    let addr = srv.local_addr();
    let nodes = vec![node(addr, 0, 1), node(addr, 1, 1)];
    rendezvous_all(&nodes);
    let w1 = worker(addr, 1, 0);
    // The host of node 1 drops off the network: its worker's silence is noticed first.
    w1.pause_heartbeats();
    thread::sleep(Duration::from_millis(300));
    nodes[1].pause_heartbeats();
    match next_event(&nodes[0], HEARTBEAT_TIMEOUT + SLACK) {
        Event::Abort {
            failure: Some(f), ..
        } => {
            assert_eq!((f.node_rank, f.rank, f.exit), (1, None, ExitKind::Lost));
            assert!(
                f.cause.starts_with("node 1 unreachable (10.0.0.1)"),
                "{}",
                f.cause
            );
        }
        other => panic!("expected an Abort, got {other:?}"),
    }
}

#[test]
fn silent_worker_is_a_failure_but_goodbyes_are_not() {
    let srv = server(2, 0);
    let addr = srv.local_addr();
    let nodes = vec![node(addr, 0, 2), node(addr, 1, 2)];
    rendezvous_all(&nodes);
    let [n0, n1] = <[ControlClient; 2]>::try_from(nodes).unwrap();
    // A worker, or a node, that says goodbye is no failure.
    worker(addr, 0, 0).close();
    n1.close();
    assert!(n0
        .events()
        .recv_timeout(HEARTBEAT_TIMEOUT + Duration::from_millis(500))
        .is_err());
    // A worker that stops heartbeating (SIGSTOP) is.
    let w1 = worker(addr, 1, 0);
    let started = Instant::now();
    w1.pause_heartbeats();
    match next_event(&n0, HEARTBEAT_TIMEOUT + SLACK) {
        Event::Abort {
            failure: Some(f), ..
        } => {
            assert_eq!((f.node_rank, f.rank, f.exit), (0, Some(1), ExitKind::Lost));
            assert!(f.cause.contains("no heartbeat"), "{}", f.cause);
        }
        other => panic!("expected an Abort, got {other:?}"),
    }
    assert!(started.elapsed() < HEARTBEAT_TIMEOUT + SLACK);
    assert!(matches!(next_event(&w1, SLACK), Event::Abort { .. }));
}

#[test]
fn all_nodes_done_finishes_the_job() {
    let srv = server(2, 0);
    let addr = srv.local_addr();
    let nodes = vec![node(addr, 0, 1), node(addr, 1, 1)];
    rendezvous_all(&nodes);
    nodes[0].report_done().unwrap();
    assert!(nodes[0]
        .events()
        .recv_timeout(Duration::from_millis(200))
        .is_err());
    nodes[1].report_done().unwrap();
    for c in &nodes {
        assert_eq!(next_event(c, SLACK), Event::Finished);
    }
    // The end of the server after Finished is no Abort.
    srv.shutdown();
    assert!(nodes[0]
        .events()
        .recv_timeout(Duration::from_millis(500))
        .is_err());
}

#[test]
fn connecting_to_nothing_fails_in_time_naming_the_address() {
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut config = client_config(addr, token());
    config.connect_timeout = Duration::from_millis(1200);
    let started = Instant::now();
    let e = ControlClient::connect(config, node_identity(0, 1))
        .unwrap_err()
        .to_string();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1100) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!(
        e.contains(&addr.to_string()) && e.contains("cannot reach"),
        "{e}"
    );
}

#[test]
fn a_client_waits_for_a_server_that_starts_late() {
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let late = thread::spawn(move || {
        thread::sleep(Duration::from_millis(700));
        ControlServer::start(ServerConfig {
            bind: addr,
            token: token(),
            nnodes: 1,
            min_nnodes: 1,
            rdzv_timeout: LONG,
            heartbeat_timeout: HEARTBEAT_TIMEOUT,
            max_restarts: 0,
            handshake: Default::default(),
        })
        .unwrap()
    });
    let n0 = node(addr, 0, 1);
    let srv = late.join().unwrap();
    assert_eq!(n0.rendezvous(LONG).unwrap().world, 1);
    n0.close();
    srv.shutdown();
}

#[test]
fn losing_the_server_aborts_clients_and_calls_fail_fast() {
    // Graceful shutdown: at once.
    let srv = server(1, 0);
    let n0 = node(srv.local_addr(), 0, 1);
    let started = Instant::now();
    srv.shutdown();
    match next_event(&n0, SLACK) {
        Event::Abort {
            reason,
            failure: None,
        } => assert!(reason.contains("lost the control plane at"), "{reason}"),
        other => panic!("expected an Abort, got {other:?}"),
    }
    assert!(started.elapsed() < SLACK);
    let e = n0.get("k", LONG).unwrap_err().to_string();
    assert!(e.contains("lost the control plane"), "{e}");
    assert!(started.elapsed() < SLACK);

    // A server that vanishes: within the heartbeat (idle) timeout.
    let srv = server(1, 0);
    let addr = srv.local_addr();
    let n0 = node(addr, 0, 1);
    let started = Instant::now();
    srv.vanish();
    match next_event(&n0, HEARTBEAT_TIMEOUT + SLACK) {
        Event::Abort { reason, .. } => {
            assert!(
                reason.contains(&format!("lost the control plane at {addr}")),
                "{reason}"
            )
        }
        other => panic!("expected an Abort, got {other:?}"),
    }
    assert!(started.elapsed() < HEARTBEAT_TIMEOUT + SLACK);
    let e = n0.set("k", b"v").unwrap_err().to_string();
    assert!(e.contains("lost the control plane"), "{e}");
}
