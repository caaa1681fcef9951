//! The agreement with threads as ranks over a real control plane on loopback: ranks running at
//! different speeds (no collective holds them together) all stop at the one decided step,
//! which none had reached when the request came; alone, and before the run is ready, a request
//! stops at the next boundary.

use super::*;
use coca_common::control::{ClientConfig, ControlServer, Identity, ServerConfig, Token};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(60);

fn token() -> Token {
    Token::from_secret("coca-preemption-test-token-0123").unwrap()
}

fn server() -> ControlServer {
    ControlServer::start(ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        token: token(),
        nnodes: 1,
        min_nnodes: 1,
        rdzv_timeout: LIMIT,
        heartbeat_timeout: Duration::from_secs(10),
        max_restarts: 0,
        handshake: Default::default(),
    })
    .unwrap()
}

fn worker(server: &ControlServer, rank: usize) -> Arc<ControlClient> {
    let config = ClientConfig {
        server: server.local_addr(),
        token: token(),
        connect_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(1),
    };
    Arc::new(
        ControlClient::connect(
            config,
            Identity::Worker {
                rank,
                generation: 0,
            },
        )
        .unwrap(),
    )
}

#[test]
fn ranks_at_different_speeds_stop_at_one_step_none_had_reached() {
    let server = server();
    let world = 3;
    let out = PathBuf::from("/tmp/coca-preemption-test");
    let total = 400u64;
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..world).map(|_| AtomicU64::new(0)).collect());
    let ranks: Vec<Arc<Preemption>> = (0..world)
        .map(|rank| {
            let p = Preemption::new(rank);
            p.join(Some(worker(&server, rank)), 0, world, &out, 0)
                .unwrap();
            Arc::new(p)
        })
        .collect();
    let (tx, rx) = mpsc::channel();
    for (rank, p) in ranks.iter().enumerate() {
        let (p, tx, progress) = (p.clone(), tx.clone(), progress.clone());
        std::thread::spawn(move || {
            // Rank r takes (r + 1) × 3 ms per step: after 150 ms they are ~25 steps apart.
            let mut stopped = None;
            for step in 1..=total {
                std::thread::sleep(Duration::from_millis(3 * (rank as u64 + 1)));
                progress[rank].store(step, Ordering::SeqCst);
                match p.at_boundary(step) {
                    Ok(Some(d)) => {
                        stopped = Some(Ok(d));
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        stopped = Some(Err(format!("{e:#}")));
                        break;
                    }
                }
            }
            let _ = tx.send((rank, stopped));
        });
    }
    std::thread::sleep(Duration::from_millis(150));
    let at_request: Vec<u64> = progress.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    ranks[1].ask("a test's request to rank 1".into());
    let mut steps = Vec::new();
    for _ in 0..world {
        let (rank, stopped) = rx.recv_timeout(LIMIT).expect("every rank ends in time");
        let d = match stopped {
            Some(Ok(d)) => d,
            other => panic!("rank {rank} did not stop for the checkpoint: {other:?}"),
        };
        assert!(
            d.checkpoint.ends_with(&format!("checkpoint-{}", d.step)),
            "{d:?}"
        );
        steps.push(d.step);
    }
    let fastest = *at_request.iter().max().unwrap();
    assert!(
        steps.iter().all(|&s| s == steps[0]),
        "one step for every rank: {steps:?}"
    );
    assert!(
        steps[0] > fastest && steps[0] < total,
        "the step {} lies after every rank's step at the request {at_request:?}",
        steps[0]
    );
    let slowest = *at_request.iter().min().unwrap();
    assert!(
        slowest + 5 < fastest,
        "the ranks really ran apart: {at_request:?}"
    );
}

#[test]
fn alone_a_request_stops_at_the_next_boundary_also_before_the_run_is_ready() {
    let out = PathBuf::from("/tmp/coca-preemption-test");
    let p = Preemption::new(0);
    p.join(None, 0, 1, &out, 5).unwrap();
    assert_eq!(p.at_boundary(6).unwrap(), None);
    p.ask("first".into());
    p.ask("second changes nothing".into());
    let d = p
        .at_boundary(7)
        .unwrap()
        .expect("stops at the next boundary");
    assert_eq!(d.step, 7);
    assert!(d.checkpoint.ends_with("checkpoint-7"), "{d:?}");

    let early = Preemption::new(0);
    early.ask("before the run is ready".into());
    early.join(None, 0, 1, &out, 10).unwrap();
    assert_eq!(early.at_boundary(11).unwrap().map(|d| d.step), Some(11));
}

#[test]
fn detach_says_goodbye_and_releases_the_agreement_threads_client() {
    let server = server();
    let client = worker(&server, 0);
    let p = Preemption::new(0);
    let out = PathBuf::from("/tmp/coca-preemption-test");
    p.join(Some(client.clone()), 0, 1, &out, 0).unwrap();
    // Ours, the run state's, and the agreement thread's (blocked in its get).
    let held = Arc::strong_count(&client);
    p.detach();
    let deadline = Instant::now() + LIMIT;
    while Arc::strong_count(&client) >= held {
        assert!(
            Instant::now() < deadline,
            "the agreement thread still holds the client after the goodbye"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !client.connection_lost(),
        "a goodbye, not a lost connection"
    );
}
