//! The control plane under hostile input, over loopback: random datagrams, mutated QUIC
//! Initials, many half-open and silent connections, and random or mutated hello frames, while
//! a client of the job keeps using the key-value store and barriers. Nothing panics, the
//! server's tracked state stays within its caps, and the job never notices. Seeded, so every
//! run sends the same bytes.

use super::protocol::{encode_frame, Hello, MAX_HELLO_BYTES, PROTOCOL_VERSION};
use super::tests::{client_config, node_identity, token};
use super::*;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const SEED: u64 = 0x0019_C0CA_F022;
const LIMITS: HandshakeLimits = HandshakeLimits {
    max_pending: 32,
    max_pending_per_source: 16,
    timeout: Duration::from_secs(2),
};
const RANDOM_DATAGRAMS: usize = 2000;
const MUTATED_INITIALS: usize = 1000;
const HALF_OPEN: usize = 150;
const SILENT: usize = 24;
const HELLO_FRAMES: usize = 300;

/// splitmix64: small, seeded, good enough to pick bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// `base` with a few random bytes changed, or cut short, or extended.
    fn mutate(&mut self, base: &[u8]) -> Vec<u8> {
        let mut v = base.to_vec();
        match self.below(4) {
            0 => v.truncate(self.below(v.len().max(1))),
            1 => {
                let extra = self.below(64);
                v.extend(self.bytes(extra));
            }
            _ => {
                for _ in 0..1 + self.below(8) {
                    if !v.is_empty() {
                        let i = self.below(v.len());
                        v[i] ^= 1 << self.below(8);
                    }
                }
            }
        }
        v
    }
}

/// Attack traffic comes from other loopback addresses than the job's client (127.0.0.1).
fn attacker(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + n % 4))
}

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// First datagrams (QUIC Initials carrying a TLS ClientHello) of `n` connection attempts,
/// caught by a plain socket posing as the server.
async fn capture_initials(n: usize) -> Vec<Vec<u8>> {
    let recorder = UdpSocket::bind("127.0.0.1:0").unwrap();
    recorder
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let target = recorder.local_addr().unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let config = tls::client_config(Duration::from_secs(1), Duration::from_secs(5)).unwrap();
    endpoint.set_default_client_config(config);
    let mut attempts = Vec::new();
    for _ in 0..n {
        attempts.push(endpoint.connect(target, tls::SERVER_NAME).unwrap());
    }
    // Let the endpoint's driver send them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut initials = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(5);
    while initials.len() < n && Instant::now() < deadline {
        match recorder.recv_from(&mut buf) {
            Ok((len, _)) => initials.push(buf[..len].to_vec()),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    drop(attempts);
    endpoint.close(0u32.into(), b"");
    assert!(
        initials.len() >= n / 2,
        "captured {} Initials",
        initials.len()
    );
    initials
}

/// One hello-stage probe: a real QUIC connection (right ALPN, no token) that sends `frame` on
/// its first stream and reads whatever comes back. Whether it got a slot at all.
async fn send_hello_frame(endpoint: &quinn::Endpoint, server: SocketAddr, frame: Vec<u8>) -> bool {
    let Ok(connecting) = endpoint.connect(server, tls::SERVER_NAME) else {
        return false;
    };
    let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), connecting).await else {
        return false;
    };
    if let Ok((mut send, mut recv)) = conn.open_bi().await {
        let _ = send.write_all(&frame).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(3), recv.read_to_end(1 << 20)).await;
    }
    conn.close(0u32.into(), b"");
    true
}

/// Hello-stage frames: random bytes, lying length prefixes and lengths, wrong versions, bad
/// proofs, and mutations of a well-formed hello.
fn hello_frame(rng: &mut Rng) -> Vec<u8> {
    let hello = |version: u32, proof: Vec<u8>| {
        encode_frame(&Hello {
            version,
            identity: node_identity(0, 1),
            proof,
        })
        .unwrap()
    };
    let valid = hello(PROTOCOL_VERSION, vec![7; 32]);
    match rng.below(6) {
        0 => {
            let len = rng.below(300);
            rng.bytes(len)
        }
        1 => {
            let mut f = u32::MAX.to_le_bytes().to_vec();
            f.extend(rng.bytes(64));
            f
        }
        2 => {
            let mut f = ((MAX_HELLO_BYTES as u32) - 1).to_le_bytes().to_vec();
            f.extend(rng.bytes(100)); // claims far more than it sends
            f
        }
        3 => hello(rng.next() as u32, rng.bytes(32)),
        4 => {
            let len = rng.below(64);
            hello(PROTOCOL_VERSION, rng.bytes(len))
        }
        _ => rng.mutate(&valid),
    }
}

#[test]
fn hostile_input_leaves_the_job_working_and_the_server_bounded() {
    let server = ControlServer::start(ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        token: token(),
        nnodes: 1,
        min_nnodes: 1,
        rdzv_timeout: Duration::from_secs(20),
        heartbeat_timeout: Duration::from_secs(3),
        max_restarts: 0,
        handshake: LIMITS,
    })
    .unwrap();
    let addr = server.local_addr();
    let rss_before = rss_bytes();
    let job = ControlClient::connect(client_config(addr, token()), node_identity(0, 1)).unwrap();
    job.rendezvous(Duration::from_secs(10)).unwrap();
    let mut rng = Rng(SEED);
    let stop = AtomicBool::new(false);
    let max_pending = AtomicUsize::new(0);
    let max_clients = AtomicUsize::new(0);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let (rounds, slowest, admitted_hellos) = thread::scope(|s| {
        // The job: key-value and barrier round trips throughout, each bounded.
        let job_loop = s.spawn(|| {
            let (mut rounds, mut slowest) = (0usize, Duration::ZERO);
            while !stop.load(Ordering::SeqCst) {
                let start = Instant::now();
                let value = rounds.to_le_bytes();
                job.set(&format!("job/{rounds}"), &value)?;
                anyhow::ensure!(job.get(&format!("job/{rounds}"), LIMITS.timeout)? == value);
                job.barrier("job", 1, Duration::from_secs(5))?;
                slowest = slowest.max(start.elapsed());
                rounds += 1;
                thread::sleep(Duration::from_millis(20));
            }
            anyhow::Ok((rounds, slowest))
        });
        // The server's tracked state, sampled throughout.
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let (pending, _, clients) = server.tracked();
                max_pending.fetch_max(pending, Ordering::SeqCst);
                max_clients.fetch_max(clients, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(5));
            }
        });

        let admitted_hellos = runtime.block_on(async {
            // 1. Hello frames over real connections, eight at a time from four sources.
            let endpoints: Vec<quinn::Endpoint> = (0..4)
                .map(|i| {
                    let mut e = quinn::Endpoint::client(SocketAddr::new(attacker(i), 0)).unwrap();
                    let config = tls::client_config(Duration::from_secs(1), Duration::from_secs(5));
                    e.set_default_client_config(config.unwrap());
                    e
                })
                .collect();
            let mut admitted = 0;
            for batch in 0..HELLO_FRAMES / 8 {
                let mut probes = tokio::task::JoinSet::new();
                for i in 0..8 {
                    let (endpoint, frame) =
                        (endpoints[(batch + i) % 4].clone(), hello_frame(&mut rng));
                    probes.spawn(async move { send_hello_frame(&endpoint, addr, frame).await });
                }
                while let Some(ok) = probes.join_next().await {
                    admitted += usize::from(ok.unwrap());
                }
            }

            // 2. Connections that finish QUIC/TLS but never say hello (held open).
            let mut silent = Vec::new();
            for i in 0..SILENT {
                let connecting = endpoints[i % 4].connect(addr, tls::SERVER_NAME).unwrap();
                silent.push(tokio::time::timeout(Duration::from_secs(3), connecting).await);
            }

            // 3. Half-open: real Initials replayed from fresh sockets that never answer.
            let initials = capture_initials(HALF_OPEN).await;
            let sockets: Vec<UdpSocket> = (0..initials.len())
                .map(|i| UdpSocket::bind(SocketAddr::new(attacker(i as u8), 0)).unwrap())
                .collect();
            for (sock, initial) in sockets.iter().zip(&initials) {
                sock.send_to(initial, addr).unwrap();
            }
            // 4. Mutated Initials and random datagrams, some shaped like QUIC long headers.
            for i in 0..MUTATED_INITIALS {
                let base = &initials[rng.below(initials.len())];
                let _ = sockets[i % sockets.len()].send_to(&rng.mutate(base), addr);
            }
            for i in 0..RANDOM_DATAGRAMS {
                let len = 1 + rng.below(1400);
                let mut d = rng.bytes(len);
                if i % 2 == 0 && len > 6 {
                    d[0] = 0xC0 | (d[0] & 0x0F);
                    d[1..5].copy_from_slice(&1u32.to_be_bytes());
                }
                let _ = sockets[i % sockets.len()].send_to(&d, addr);
                if i % 200 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            // Hold everything past the handshake timeout, then let go.
            tokio::time::sleep(LIMITS.timeout + Duration::from_millis(500)).await;
            drop((silent, sockets));
            for e in &endpoints {
                e.close(0u32.into(), b"");
            }
            admitted
        });
        stop.store(true, Ordering::SeqCst);
        let (rounds, slowest) = job_loop.join().unwrap().expect("the job's requests");
        (rounds, slowest, admitted_hellos)
    });

    // Bounded throughout, and back to nothing once the handshake timeout has passed.
    let max_pending = max_pending.load(Ordering::SeqCst);
    assert!(max_pending <= LIMITS.max_pending, "{max_pending} pending");
    assert!(
        max_pending >= LIMITS.max_pending_per_source,
        "the flood never filled a source's cap"
    );
    assert_eq!(
        max_clients.load(Ordering::SeqCst),
        1,
        "a stranger became a client"
    );
    assert!(
        admitted_hellos >= HELLO_FRAMES / 2,
        "only {admitted_hellos} hellos got a slot"
    );
    let deadline = Instant::now() + LIMITS.timeout + Duration::from_secs(3);
    while server.tracked().0 > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        server.tracked().0,
        0,
        "handshakes still pending after their timeout"
    );

    // The job never noticed: its requests kept working, no event arrived, a newcomer joins.
    assert!(rounds >= 20, "only {rounds} rounds of the job's requests");
    assert!(
        slowest < Duration::from_secs(2),
        "a request of the job took {slowest:?}"
    );
    assert!(job.events().try_recv().is_err(), "the job got an event");
    let newcomer = ControlClient::connect(
        client_config(addr, token()),
        Identity::Worker {
            rank: 0,
            generation: 0,
        },
    )
    .unwrap();
    assert_eq!(
        newcomer.get("job/0", LIMITS.timeout).unwrap(),
        0usize.to_le_bytes()
    );
    newcomer.barrier("job", 1, Duration::from_secs(5)).unwrap();
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 256 << 20, "the process grew by {} MiB", grown >> 20);
    newcomer.close();
    job.close();
    server.shutdown();
}
