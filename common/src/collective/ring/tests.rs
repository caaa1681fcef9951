//! Threads as ranks over loopback, with an in-memory key-value store.

use super::handshake::{connect_handshake, ConnectError, Identity};
use super::*;
use crate::collective::bench::bench_all_reduce;
use crate::collective::MemoryKeyValue;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::thread;

const TOKEN: &[u8] = b"job secret for tests";
const SETUP: Duration = Duration::from_secs(20);

fn lo() -> IpAddr {
    Ipv4Addr::LOCALHOST.into()
}

/// A group name no other test uses.
fn fresh(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}/{}", NEXT.fetch_add(1, Ordering::SeqCst))
}

/// Forms the ring of `members` in `group`, one thread per member.
fn form_in(kv: &MemoryKeyValue, group: &str, members: &[usize]) -> Vec<RingCollective> {
    thread::scope(|s| {
        let joins: Vec<_> = members
            .iter()
            .map(|&m| {
                s.spawn(move || RingCollective::connect(group, members, m, lo(), kv, TOKEN, SETUP))
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().unwrap().unwrap())
            .collect()
    })
}

fn form(n: usize) -> Vec<RingCollective> {
    let members: Vec<usize> = (0..n).collect();
    form_in(&MemoryKeyValue::new(), &fresh("t"), &members)
}

/// Runs `f` on every member at once, one thread each; results in rank order.
fn each<T: Send>(rings: &[RingCollective], f: impl Fn(&RingCollective) -> T + Sync) -> Vec<T> {
    thread::scope(|s| {
        let joins: Vec<_> = rings.iter().map(|r| s.spawn(|| f(r))).collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

/// Integers in ±1000: sums over a few members are exact in f32, in any order.
fn exact(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 131) % 2001) as f32 - 1000.0)
        .collect()
}

/// Values whose sum depends on the order of addition.
fn inexact(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (i as f32 * 0.37 + rank as f32 * 1.91).sin() * 100.0 / 3.0)
        .collect()
}

fn reference(inputs: &[Vec<f32>], op: ReduceOp) -> Vec<f32> {
    let n = inputs.len();
    let mut sum = vec![0.0f32; inputs[0].len()];
    for x in inputs {
        add_into(&mut sum, x);
    }
    if op == ReduceOp::Avg {
        divide(&mut sum, n);
    }
    sum
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn chunks_cover_uneven_lengths() {
    for n in 1..6 {
        for len in [0, 1, 2, 5, 17, 1000] {
            let mut at = 0;
            for c in 0..n {
                let r = chunk(len, n, c);
                assert_eq!(r.start, at);
                assert!(r.len() == len / n || r.len() == len / n + 1);
                at = r.end;
            }
            assert_eq!(at, len);
        }
    }
    let segs: Vec<_> = segments(10..10 + 2 * SEGMENT + 3).collect();
    assert_eq!(segs.len(), 3);
    assert_eq!(segs[2], 10 + 2 * SEGMENT..10 + 2 * SEGMENT + 3);
    assert_eq!(segments(5..5).count(), 0);
}

#[test]
fn all_reduce_matches_reference_and_is_identical_everywhere() {
    for n in 1..=4 {
        let rings = form(n);
        for len in [0, 1, n - 1, 1000, (1 << 20) + 7] {
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                let inputs: Vec<_> = (0..n).map(|r| exact(r, len)).collect();
                let want = bits(&reference(&inputs, op));
                let got = each(&rings, |c| {
                    let mut buf = inputs[c.rank()].clone();
                    c.all_reduce(&mut buf, op).unwrap();
                    buf
                });
                for (r, g) in got.iter().enumerate() {
                    assert!(bits(g) == want, "n={n} len={len} {op:?}: rank {r} differs");
                }
            }
        }
        // Order-dependent sums: close to the reference, and the same bits on every member.
        let len = (1 << 20) + 7;
        let inputs: Vec<_> = (0..n).map(|r| inexact(r, len)).collect();
        let want = reference(&inputs, ReduceOp::Avg);
        let got = each(&rings, |c| {
            let mut buf = inputs[c.rank()].clone();
            c.all_reduce(&mut buf, ReduceOp::Avg).unwrap();
            buf
        });
        for g in &got {
            assert_eq!(bits(g), bits(&got[0]), "n={n}: members differ");
        }
        for (g, w) in got[0].iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4, "{g} vs {w}");
        }
    }
}

#[test]
fn all_gather_and_reduce_scatter_layouts() {
    for n in 1..=4 {
        let rings = form(n);
        for b in [0, 1, 3, 1000, SEGMENT + 5] {
            let inputs: Vec<_> = (0..n).map(|r| exact(r, b)).collect();
            let want: Vec<f32> = inputs.concat();
            let got = each(&rings, |c| {
                let mut out = vec![f32::NAN; b * n];
                c.all_gather(&inputs[c.rank()], &mut out).unwrap();
                out
            });
            for g in &got {
                assert_eq!(bits(g), bits(&want), "all_gather n={n} b={b}");
            }

            let inputs: Vec<_> = (0..n).map(|r| exact(r + 7, b * n)).collect();
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                let full = reference(&inputs, op);
                // Twice in a row: the second reuses the scratch blocks.
                for _ in 0..2 {
                    let got = each(&rings, |c| {
                        let mut out = vec![f32::NAN; b];
                        c.reduce_scatter(&inputs[c.rank()], &mut out, op).unwrap();
                        out
                    });
                    for (r, g) in got.iter().enumerate() {
                        assert_eq!(bits(g), bits(&full[r * b..(r + 1) * b]), "n={n} b={b}");
                    }
                }
            }
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    for n in 1..=4 {
        let rings = form(n);
        for root in 0..n {
            for len in [0, 5, 3 * SEGMENT + 1] {
                let got = each(&rings, |c| {
                    let mut buf = exact(c.rank(), len);
                    c.broadcast(&mut buf, root).unwrap();
                    buf
                });
                let want = exact(root, len);
                for g in &got {
                    assert_eq!(bits(g), bits(&want), "n={n} root={root} len={len}");
                }
            }
        }
    }
}

#[test]
fn barrier_waits_for_the_last_member() {
    let rings = form(4);
    let late = Duration::from_millis(150);
    let waited = each(&rings, |c| {
        c.barrier().unwrap();
        if c.rank() == 2 {
            thread::sleep(late);
        }
        let t = Instant::now();
        c.barrier().unwrap();
        t.elapsed()
    });
    for (r, w) in waited.iter().enumerate() {
        if r != 2 {
            assert!(*w >= late / 2, "rank {r} left the barrier after {w:?}");
        }
    }
}

#[test]
fn size_one_group_needs_no_peers() {
    let kv = MemoryKeyValue::new();
    let c = RingCollective::connect("solo", &[5], 5, lo(), &kv, TOKEN, SETUP).unwrap();
    assert_eq!((c.rank(), c.size()), (0, 1));
    let mut buf = vec![3.0f32; 4];
    c.all_reduce(&mut buf, ReduceOp::Avg).unwrap();
    assert_eq!(buf, [3.0; 4]);
    let mut out = vec![0.0; 4];
    c.all_gather(&buf, &mut out).unwrap();
    c.reduce_scatter(&buf, &mut out, ReduceOp::Sum).unwrap();
    assert!(c.all_gather(&buf, &mut out[..3]).is_err());
    c.broadcast(&mut buf, 0).unwrap();
    assert!(c.broadcast(&mut buf, 1).is_err());
    c.barrier().unwrap();
}

#[test]
fn connect_checks_its_arguments() {
    let kv = MemoryKeyValue::new();
    let t = Duration::from_millis(100);
    let err = RingCollective::connect("g", &[0, 1], 2, lo(), &kv, TOKEN, t).unwrap_err();
    assert!(err.to_string().contains("not in"), "{err}");
    assert!(RingCollective::connect("g", &[1, 0], 0, lo(), &kv, TOKEN, t).is_err());
    assert!(RingCollective::connect("g", &[0, 0], 0, lo(), &kv, TOKEN, t).is_err());
    assert!(RingCollective::connect("", &[0], 0, lo(), &kv, TOKEN, t).is_err());
    assert!(RingCollective::connect("g", &[0], 0, lo(), &kv, b"", t).is_err());
}

#[test]
fn overlapping_groups_run_concurrently() {
    // World of 4: pairs {0,1},{2,3} and {0,2},{1,3}; every rank drives both of its groups at
    // once from two threads.
    let kv = MemoryKeyValue::new();
    let groups: [(&str, [usize; 2]); 4] = [
        ("gen0/a/0", [0, 1]),
        ("gen0/a/1", [2, 3]),
        ("gen0/b/0", [0, 2]),
        ("gen0/b/1", [1, 3]),
    ];
    let rings: Vec<Vec<RingCollective>> = thread::scope(|s| {
        let joins: Vec<_> = groups
            .iter()
            .map(|(g, m)| s.spawn(|| form_in(&kv, g, m)))
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    thread::scope(|s| {
        for (gi, ring) in rings.iter().enumerate() {
            for c in ring {
                let global = groups[gi].1[c.rank()];
                s.spawn(move || {
                    for round in 0..20 {
                        let len = 10_000 + round * 1000 + gi;
                        let mut buf = exact(global + round, len);
                        c.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
                        let inputs: Vec<_> = groups[gi]
                            .1
                            .iter()
                            .map(|&g| exact(g + round, len))
                            .collect();
                        assert_eq!(bits(&buf), bits(&reference(&inputs, ReduceOp::Sum)));
                    }
                });
            }
        }
    });
}

#[test]
fn wrong_token_never_connects() {
    let kv = MemoryKeyValue::new();
    let group = fresh("badtoken");
    let t = Instant::now();
    let results = thread::scope(|s| {
        let a = s.spawn(|| {
            RingCollective::connect(
                &group,
                &[0, 1],
                0,
                lo(),
                &kv,
                b"right",
                Duration::from_secs(1),
            )
        });
        let b = s.spawn(|| {
            RingCollective::connect(
                &group,
                &[0, 1],
                1,
                lo(),
                &kv,
                b"wrong",
                Duration::from_secs(1),
            )
        });
        [a.join().unwrap(), b.join().unwrap()]
    });
    for r in results {
        let err = r.unwrap_err();
        eprintln!("{err:#}");
        assert!(
            format!("{err:#}").contains("refused"),
            "unexpected error: {err:#}"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// Sends the connector's hello with a proof made with `token`.
fn spoof(addr: SocketAddr, group: &str, claimed_rank: u64, next: u64, token: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    let id = Identity {
        group: group.into(),
        key: hmac::Key::new(hmac::HMAC_SHA256, token),
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    match connect_handshake(&mut s, &id, claimed_rank, next, deadline) {
        Ok(()) => "accepted".into(),
        Err(ConnectError::Retry(m) | ConnectError::Fatal(m)) => m,
    }
}

#[test]
fn strangers_do_not_stop_the_ring_from_forming() {
    let kv = MemoryKeyValue::new();
    let group = fresh("stray");
    thread::scope(|s| {
        let one = s.spawn(|| RingCollective::connect(&group, &[3, 8], 8, lo(), &kv, TOKEN, SETUP));
        let key = address_key(&group, 1);
        let addr: SocketAddr = String::from_utf8(kv.get(&key, SETUP).unwrap())
            .unwrap()
            .parse()
            .unwrap();

        // Says nothing at all (held open until the end).
        let silent = TcpStream::connect(addr).unwrap();
        // Garbage instead of a hello.
        let mut garbage = TcpStream::connect(addr).unwrap();
        let mut nonce = [0u8; 32];
        garbage.read_exact(&mut nonce).unwrap();
        garbage.write_all(&[0xAB; 4096]).unwrap_or(());
        let mut rest = Vec::new();
        garbage
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = garbage.read_to_end(&mut rest);
        assert!(rest.is_empty(), "the acceptor answered garbage");
        // A huge group length.
        let mut big = TcpStream::connect(addr).unwrap();
        big.read_exact(&mut nonce).unwrap();
        let mut hello = b"COCARING".to_vec();
        hello.extend_from_slice(&1u16.to_le_bytes());
        hello.push(1);
        hello.extend_from_slice(&u16::MAX.to_le_bytes());
        big.write_all(&hello).unwrap();
        big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(big.read(&mut nonce).unwrap_or(0), 0);
        // Well-formed, wrong token; right token, wrong rank; right token, wrong group.
        for (g, rank, token) in [
            (group.as_str(), 0, &b"not the token"[..]),
            (group.as_str(), 1, TOKEN),
            ("another/group", 0, TOKEN),
        ] {
            let m = spoof(addr, g, rank, 1, token);
            assert!(m.contains("closed"), "{g} {rank}: {m}");
        }

        let zero = RingCollective::connect(&group, &[3, 8], 3, lo(), &kv, TOKEN, SETUP).unwrap();
        let one = one.join().unwrap().unwrap();
        let rings = [zero, one];
        let got = each(&rings, |c| {
            let mut buf = exact(c.rank(), 100);
            c.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
            buf
        });
        assert_eq!(
            bits(&got[1]),
            bits(&reference(&[exact(0, 100), exact(1, 100)], ReduceOp::Sum))
        );
        drop(silent);
    });
}

#[test]
fn mismatched_calls_fail_on_every_member() {
    // Lengths differ between the two members of a pair.
    let rings = form(2);
    let errs = each(&rings, |c| {
        let mut buf = vec![1.0f32; 10 + c.rank()];
        c.all_reduce(&mut buf, ReduceOp::Sum).unwrap_err()
    });
    for e in &errs {
        eprintln!("{e:#}");
        assert!(e.to_string().contains("mismatched"), "{e:#}");
        assert!(
            !e.is::<PeerClosed>(),
            "a mismatch is this member's own failure: {e:#}"
        );
    }
    // The group is unusable afterwards, at once.
    let errs = each(&rings, |c| c.barrier().unwrap_err());
    assert!(
        errs[0].to_string().contains("earlier failure"),
        "{:#}",
        errs[0]
    );

    // One member of three differs (length, then operation): everyone fails, nobody hangs.
    let rings = form(3);
    let errs = each(&rings, |c| {
        let mut buf = vec![1.0f32; if c.rank() == 2 { 7 } else { 1 << 20 }];
        c.all_reduce(&mut buf, ReduceOp::Sum).unwrap_err()
    });
    assert!(errs.iter().any(|e| e.to_string().contains("mismatched")));
    let rings = form(3);
    let errs = each(&rings, |c| {
        let mut buf = vec![1.0f32; 100];
        if c.rank() == 0 {
            c.broadcast(&mut buf, 0).unwrap_err()
        } else {
            c.all_reduce(&mut buf, ReduceOp::Avg).unwrap_err()
        }
    });
    assert!(errs[0].to_string().contains("mismatched"), "{:#}", errs[0]);

    // A bad argument on one member: it errors without sending, the others fail too.
    let rings = form(3);
    let errs = each(&rings, |c| {
        let input = vec![1.0f32; 30];
        let mut out = vec![0.0f32; if c.rank() == 1 { 11 } else { 10 }];
        c.reduce_scatter(&input, &mut out, ReduceOp::Sum)
            .unwrap_err()
    });
    for e in &errs {
        eprintln!("{e:#}");
    }
    assert!(errs[1].to_string().contains("expected"), "{:#}", errs[1]);
    // The member with the bad argument failed first; the others, because it closed its links.
    assert!(!errs[1].is::<PeerClosed>(), "{:#}", errs[1]);
    for e in [&errs[0], &errs[2]] {
        assert!(e.is::<PeerClosed>(), "{e:#}");
    }
    let errs = each(&rings, |c| {
        let mut buf = [0.0f32; 1];
        c.broadcast(&mut buf, 3).unwrap_err()
    });
    assert_eq!(errs.len(), 3);
}

#[test]
fn a_member_that_goes_away_fails_the_others_promptly() {
    for n in [2, 4] {
        let mut rings = form(n);
        let quitter = rings.pop().unwrap();
        let gone = Mutex::new(None::<Instant>);
        thread::scope(|s| {
            s.spawn(|| {
                let mut buf = exact(quitter.rank(), 1 << 20);
                quitter.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
                thread::sleep(Duration::from_millis(50));
                *gone.lock().unwrap() = Some(Instant::now());
                drop(quitter);
            });
            let errs = each(&rings, |c| {
                let mut buf = exact(c.rank(), 1 << 20);
                c.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
                // The quitter is gone before this one completes.
                let err = loop {
                    if let Err(e) = c.all_reduce(&mut buf, ReduceOp::Sum) {
                        break e;
                    }
                };
                let at = Instant::now();
                (err, c.barrier().unwrap_err(), at)
            });
            let gone = gone.lock().unwrap().unwrap();
            for (e, later, at) in errs {
                // What broke the group stays the reason of every later operation's failure.
                assert!(later.is::<PeerClosed>(), "{later:#}");
                assert!(
                    format!("{later:#}").contains("earlier failure"),
                    "{later:#}"
                );
                let msg = format!("{e:#}");
                eprintln!("n={n}: {msg}");
                assert!(msg.contains("ring \"t/") && msg.contains("rank "), "{msg}");
                assert!(
                    e.is::<PeerClosed>(),
                    "a peer's exit, not this member's: {msg}"
                );
                let late = at.saturating_duration_since(gone);
                assert!(
                    late < Duration::from_secs(2),
                    "failed {late:?} after: {msg}"
                );
            }
        });
    }
}

/// The figures `coca-worker bench-collectives` prints (speed itself is measured there, not
/// here): sizes echoed, bus bandwidth derived from the algorithm bandwidth as NCCL-tests do.
#[test]
fn bench_reports_consistent_figures() {
    for n in [2, 3] {
        let rings = form(n);
        let reports = each(&rings, |c| bench_all_reduce(c, 1 << 20, 1, 3).unwrap());
        for r in reports {
            assert_eq!((r.bytes, r.size), (1 << 20, n));
            assert!(r.seconds > 0.0 && r.min_seconds <= r.seconds);
            let expected = r.algbw_gbps * 2.0 * (n as f64 - 1.0) / n as f64;
            assert!((r.busbw_gbps - expected).abs() <= 1e-9 * expected.max(1.0));
            assert!((r.algbw_gbps - r.bytes as f64 / r.seconds / 1e9).abs() < 1e-6);
        }
    }
}
