//! Stall detection on real rings (threads as ranks over loopback): a member that stops
//! participating makes the others fail within the collective timeout, naming the group, the
//! operation and the peer they wait on.

use super::*;
use crate::collective::MemoryKeyValue;
use std::io::Write;
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::thread;

const TOKEN: &[u8] = b"job secret for stall tests";
const SETUP: Duration = Duration::from_secs(20);
const TIMEOUT: Duration = Duration::from_secs(2);

/// Forms a ring of `n` members of `group` with the collective timeout [`TIMEOUT`].
fn form(group: &str, n: usize) -> Vec<RingCollective> {
    form_with(&MemoryKeyValue::new(), group, n, TIMEOUT)
}

/// Forms a ring of `n` members of `group` that find each other through `kv`.
fn form_with(kv: &dyn KeyValue, group: &str, n: usize, timeout: Duration) -> Vec<RingCollective> {
    let members: Vec<usize> = (0..n).collect();
    thread::scope(|s| {
        let joins: Vec<_> = (0..n)
            .map(|m| {
                let members = &members;
                s.spawn(move || {
                    let lo = Ipv4Addr::LOCALHOST.into();
                    let mut ring =
                        RingCollective::connect(group, members, m, lo, kv, TOKEN, SETUP)?;
                    ring.set_stall_limits(StallLimits::with_timeout(timeout))?;
                    anyhow::Ok(ring)
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().unwrap().unwrap())
            .collect()
    })
}

/// Runs `f` on the members in `active` (one thread each) while the others stay idle but alive;
/// returns each active member's result and how long it took.
fn run_without<T: Send>(
    rings: &[RingCollective],
    active: &[usize],
    f: impl Fn(&RingCollective) -> T + Sync,
) -> Vec<(T, Duration)> {
    thread::scope(|s| {
        let joins: Vec<_> = active
            .iter()
            .map(|&m| {
                let (ring, f) = (&rings[m], &f);
                s.spawn(move || {
                    let start = Instant::now();
                    (f(ring), start.elapsed())
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

fn assert_bounded(took: Duration) {
    assert!(
        took >= TIMEOUT && took < TIMEOUT + Duration::from_secs(3),
        "the stall was detected after {took:?} (timeout {TIMEOUT:?})"
    );
}

#[test]
fn a_member_that_never_calls_stops_the_others_naming_it() {
    let rings = form("gen0/tp/0", 3);
    // Rank 2 never calls: rank 0 waits for its data and times out; rank 1 waits for rank 0,
    // and either times out too or sees rank 0 give up (the failure travels around the ring).
    let results = run_without(&rings, &[0, 1], |r| {
        let mut buf = vec![1.0f32; 1 << 20];
        r.all_reduce(&mut buf, ReduceOp::Sum)
    });
    let (result, took) = &results[0];
    let e = format!("{:#}", result.as_ref().unwrap_err());
    assert!(e.contains("ring \"gen0/tp/0\": collective timeout"), "{e}");
    assert!(e.contains("during all_reduce(Sum)"), "{e}");
    assert!(
        e.contains("waiting for rank 2 (global rank 2) to send"),
        "{e}"
    );
    assert_bounded(*took);
    let (result, took) = &results[1];
    let e = format!("{:#}", result.as_ref().unwrap_err());
    assert!(e.contains("ring \"gen0/tp/0\""), "{e}");
    assert!(
        e.contains("collective timeout") || e.contains("rank 0 (global rank 0) closed"),
        "{e}"
    );
    assert_bounded(*took);
    // The group is unusable afterwards, at once.
    let mut one = [0.0f32];
    let start = Instant::now();
    let e = rings[0].all_reduce(&mut one, ReduceOp::Sum).unwrap_err();
    assert!(format!("{e:#}").contains("unusable"), "{e:#}");
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn a_member_that_stops_reading_stops_the_sender_naming_it() {
    const LEN: usize = 16 << 20;
    let rings = form("gen0/dp/1", 2);
    // Member 1 enters the broadcast (its header goes out, as its call would send it) and then
    // freezes: it never reads, so the root's sends fill the socket buffers and stop.
    {
        let mut links = rings[1].links.as_ref().unwrap().lock().unwrap();
        let header = Header {
            seq: 1,
            ..Header::new(Kind::Broadcast, None, 0, LEN)
        };
        let ticket = links.sender.send_owned(header.encode().to_vec());
        links.sender.wait(ticket).unwrap();
    }
    let results = run_without(&rings, &[0], |r| {
        let mut buf = vec![0.5f32; LEN];
        r.broadcast(&mut buf, 0)
    });
    let (result, took) = &results[0];
    let e = format!("{:#}", result.as_ref().unwrap_err());
    assert!(e.contains("\"gen0/dp/1\""), "{e}");
    assert!(e.contains("broadcast from rank 0"), "{e}");
    assert!(
        e.contains("waiting for rank 1 (global rank 1) to receive"),
        "{e}"
    );
    assert_bounded(*took);
}

#[test]
fn waits_shorter_than_the_timeout_are_no_stall() {
    let rings = form("gen0/world/0", 2);
    // Member 1 joins each operation late, but well within the timeout: every one succeeds.
    let results = run_without(&rings, &[0, 1], |r| {
        for step in 0..3 {
            if r.rank() == 1 {
                thread::sleep(TIMEOUT / 3);
            }
            let mut buf = vec![(r.rank() + step) as f32; 1000];
            r.all_reduce(&mut buf, ReduceOp::Sum)?;
            anyhow::ensure!(buf[999] == (1 + 2 * step) as f32, "wrong sum {}", buf[999]);
        }
        anyhow::Ok(())
    });
    for (m, (result, _)) in results.into_iter().enumerate() {
        result.unwrap_or_else(|e| panic!("rank {m}: {e:#}"));
    }
}

/// A key-value store that sends whoever looks up member 1's address to `proxy` instead.
struct Redirect<'a> {
    kv: &'a MemoryKeyValue,
    key: String,
    proxy: SocketAddr,
}

impl KeyValue for Redirect<'_> {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.kv.set(key, value)
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        if key == self.key {
            return Ok(self.proxy.to_string().into_bytes());
        }
        self.kv.get(key, timeout)
    }
}

/// Copies `from` to `to` in pieces of `piece` bytes with `pause` after each (a slow link),
/// until either side closes; then closes both.
fn pump(mut from: TcpStream, mut to: TcpStream, piece: usize, pause: Duration) {
    let mut buf = vec![0u8; piece];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        thread::sleep(pause);
    }
    for s in [&from, &to] {
        let _ = s.shutdown(Shutdown::Both);
    }
}

#[test]
fn a_slow_link_that_keeps_moving_never_times_out() {
    // 256 KiB over a link that moves 32 KiB every 400 ms: about 3 s in all, with each gap longer
    // than a stall check's tick (125 ms) but shorter than the timeout.
    const LEN: usize = 64 * 1024;
    const SLOW_TIMEOUT: Duration = Duration::from_secs(1);
    let group = "gen0/sharding/0";
    let kv = MemoryKeyValue::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let redirect = Redirect {
        kv: &kv,
        key: address_key(group, 1),
        proxy: listener.local_addr().unwrap(),
    };
    thread::scope(|s| {
        // The proxy between member 0 and member 1: slow towards member 1, fast back.
        s.spawn(|| {
            let (client, _) = listener.accept().unwrap();
            let real: SocketAddr =
                String::from_utf8(kv.get(&address_key(group, 1), SETUP).unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
            let server = TcpStream::connect(real).unwrap();
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let back = thread::spawn(move || pump(s2, c2, 64 * 1024, Duration::ZERO));
            pump(client, server, 32 * 1024, Duration::from_millis(400));
            back.join().unwrap();
        });
        let rings = form_with(&redirect, group, 2, SLOW_TIMEOUT);
        let results = run_without(&rings, &[0, 1], |r| {
            let mut buf = vec![r.rank() as f32; LEN];
            r.broadcast(&mut buf, 0).map(|()| buf)
        });
        for (m, (result, _)) in results.iter().enumerate() {
            let buf = result
                .as_ref()
                .unwrap_or_else(|e| panic!("member {m}: {e:#}"));
            assert!(buf.iter().all(|&x| x == 0.0), "member {m} got other data");
        }
        // (The root is done once the socket buffers hold the rest; the receiver waits it out.)
        let took = results[1].1;
        assert!(
            took > 2 * SLOW_TIMEOUT,
            "member 1 finished in {took:?}: the link was not slow enough to prove anything"
        );
        drop(rings); // closes the proxy's connections, which ends its threads
    });
}
