//! Forming the ring: every member listens, publishes its address, connects to the next member
//! and accepts the previous one, and both ends of every connection prove they hold the job
//! token.
//!
//! Handshake (the listening port is reachable from the network, so the acceptor trusts nothing
//! before the proof):
//!
//! 1. acceptor → connector: a fresh 32-byte nonce `ns`.
//! 2. connector → acceptor: `"COCARING"`, version `u16`, byte order `u8`, group length `u16`,
//!    group, connector's rank `u64`, its own fresh nonce `nc` (32 bytes) and
//!    `HMAC-SHA256(token, CONNECT_LABEL ‖ byte order ‖ len(group) ‖ group ‖ rank ‖ ns ‖ nc)`.
//! 3. The acceptor checks the proof (constant time), the group, that the rank is its
//!    predecessor and the byte order, then answers
//!    `HMAC-SHA256(token, ACCEPT_LABEL ‖ len(group) ‖ group ‖ acceptor rank ‖ connector rank ‖
//!    ns ‖ nc)`, which the connector checks in turn.
//!
//! Integers are little-endian. An acceptor reads at most [`MAX_HELLO`] bytes from an
//! unauthenticated peer and gives it [`HANDSHAKE_TIMEOUT`] to finish; a refused connection is
//! closed without an answer and logged, and the acceptor keeps waiting for its predecessor.

use super::super::KeyValue;
use anyhow::{anyhow, bail, Context, Result};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"COCARING";
const VERSION: u16 = 1;
const NONCE: usize = 32;
const TAG: usize = 32;
/// Longest group name on the wire.
pub(super) const MAX_GROUP: usize = 256;
/// The most an acceptor reads from a peer before it has proven anything.
const MAX_HELLO: usize = 8 + 2 + 1 + 2 + MAX_GROUP + 8 + NONCE + TAG;
/// How long an unauthenticated peer may take over its part of the handshake.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the connector waits for the acceptor's part (the address it dialled was published
/// by the member itself). Longer than [`HANDSHAKE_TIMEOUT`]: once the acceptor has sent its
/// proof it is done with this connection and accepts no other, so a connector that gave up
/// while TCP was still retransmitting that proof over a lossy link (15 % loss each way) could
/// never join; TCP delivers it if given the time.
const CONNECTOR_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Handshakes in progress at once on one listener; connections beyond are closed at once.
const MAX_PENDING: usize = 16;
const CONNECT_LABEL: &[u8] = b"coca ring v1\0connect\0";
const ACCEPT_LABEL: &[u8] = b"coca ring v1\0accept\0";

/// The error of one half of the setup when the other half failed first.
#[derive(Debug)]
pub(super) struct Abandoned;

impl std::fmt::Display for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("setup abandoned")
    }
}

impl std::error::Error for Abandoned {}

/// This host's byte order, which every member must share (`f32`s travel in native order).
fn byte_order() -> u8 {
    if cfg!(target_endian = "little") {
        1
    } else {
        2
    }
}

/// What both ends of a link agree on.
#[derive(Clone)]
pub(super) struct Identity {
    pub group: String,
    pub key: hmac::Key,
}

/// What the connector's proof signs; `group` and `rank` are the ones it claims.
fn connect_proof(order: u8, group: &[u8], rank: u64, ns: &[u8], nc: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(128 + group.len());
    m.extend_from_slice(CONNECT_LABEL);
    m.push(order);
    m.extend_from_slice(&(group.len() as u32).to_le_bytes());
    m.extend_from_slice(group);
    m.extend_from_slice(&rank.to_le_bytes());
    m.extend_from_slice(ns);
    m.extend_from_slice(nc);
    m
}

impl Identity {
    fn accept_proof(&self, acceptor: u64, connector: u64, ns: &[u8], nc: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(128 + self.group.len());
        m.extend_from_slice(ACCEPT_LABEL);
        m.extend_from_slice(&(self.group.len() as u32).to_le_bytes());
        m.extend_from_slice(self.group.as_bytes());
        m.extend_from_slice(&acceptor.to_le_bytes());
        m.extend_from_slice(&connector.to_le_bytes());
        m.extend_from_slice(ns);
        m.extend_from_slice(nc);
        m
    }
}

fn nonce(rng: &SystemRandom) -> Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    rng.fill(&mut n)
        .map_err(|_| anyhow!("the system random generator failed"))?;
    Ok(n)
}

/// `read_exact` that gives up at `deadline`.
fn read_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[at..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(k) => at += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Err(ErrorKind::TimedOut.into()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_by(stream: &mut TcpStream, bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ErrorKind::TimedOut.into());
    }
    stream.set_write_timeout(Some(left))?;
    stream.write_all(bytes)
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::UnexpectedEof => "closed the connection".into(),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "went silent".into(),
        _ => e.to_string(),
    }
}

/// Why a connection attempt to the next member failed.
pub(super) enum ConnectError {
    /// Worth another try (refused, closed, silent: the acceptor may be busy or not up yet).
    Retry(String),
    /// The acceptor answered but could not prove it holds the token.
    Fatal(String),
}

/// The connector's side on a fresh connection to member `next` (this member is `me`).
pub(super) fn connect_handshake(
    stream: &mut TcpStream,
    id: &Identity,
    me: u64,
    next: u64,
    deadline: Instant,
) -> std::result::Result<(), ConnectError> {
    let rng = SystemRandom::new();
    let retry =
        |what: &str, e: std::io::Error| ConnectError::Retry(format!("{what}: {}", describe(&e)));
    let mut ns = [0u8; NONCE];
    read_by(stream, &mut ns, deadline).map_err(|e| retry("waiting for its nonce", e))?;
    let nc = nonce(&rng).map_err(|e| ConnectError::Fatal(e.to_string()))?;
    let order = byte_order();
    let proof = connect_proof(order, id.group.as_bytes(), me, &ns, &nc);
    let tag = hmac::sign(&id.key, &proof);

    let mut hello = Vec::with_capacity(MAX_HELLO);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.push(order);
    hello.extend_from_slice(&(id.group.len() as u16).to_le_bytes());
    hello.extend_from_slice(id.group.as_bytes());
    hello.extend_from_slice(&me.to_le_bytes());
    hello.extend_from_slice(&nc);
    hello.extend_from_slice(tag.as_ref());
    write_by(stream, &hello, deadline).map_err(|e| retry("sending our proof", e))?;

    let mut answer = [0u8; TAG];
    read_by(stream, &mut answer, deadline).map_err(|e| {
        retry(
            "waiting for its proof (refused: wrong token, group or rank?)",
            e,
        )
    })?;
    hmac::verify(&id.key, &id.accept_proof(next, me, &ns, &nc), &answer).map_err(|_| {
        ConnectError::Fatal("its proof is wrong: it does not hold the job token".into())
    })?;
    Ok(())
}

/// The acceptor's side: `Ok` once the peer proved it is member `prev` of this group.
fn accept_handshake(
    stream: &mut TcpStream,
    id: &Identity,
    me: u64,
    prev: u64,
    deadline: Instant,
) -> std::result::Result<(), String> {
    let rng = SystemRandom::new();
    let ns = nonce(&rng).map_err(|e| e.to_string())?;
    write_by(stream, &ns, deadline).map_err(|e| format!("sending the nonce: {}", describe(&e)))?;

    let io = |e: std::io::Error| format!("incomplete hello: {}", describe(&e));
    let mut head = [0u8; 8 + 2 + 1 + 2];
    read_by(stream, &mut head, deadline).map_err(io)?;
    if &head[..8] != MAGIC {
        return Err("not a coca ring peer (bad magic)".into());
    }
    let version = u16::from_le_bytes([head[8], head[9]]);
    if version != VERSION {
        return Err(format!("protocol version {version}, expected {VERSION}"));
    }
    let order = head[10];
    let group_len = u16::from_le_bytes([head[11], head[12]]) as usize;
    if group_len > MAX_GROUP {
        return Err(format!(
            "group name of {group_len} bytes (at most {MAX_GROUP})"
        ));
    }
    let mut rest = vec![0u8; group_len + 8 + NONCE + TAG];
    read_by(stream, &mut rest, deadline).map_err(io)?;
    let (group, rest) = rest.split_at(group_len);
    let (rank, rest) = rest.split_at(8);
    let (nc, tag) = rest.split_at(NONCE);
    let rank = u64::from_le_bytes(rank.try_into().expect("8 bytes"));

    // The proof binds the claimed group and rank, so check it first: a failure below is then a
    // genuine member of the job in the wrong place, not a stranger.
    if hmac::verify(&id.key, &connect_proof(order, group, rank, &ns, nc), tag).is_err() {
        return Err("bad proof (wrong job token?)".into());
    }
    if group != id.group.as_bytes() {
        return Err(format!(
            "authenticated peer of group {:?} connected to group {:?}",
            String::from_utf8_lossy(group),
            id.group
        ));
    }
    if rank != prev {
        return Err(format!(
            "authenticated peer claims rank {rank}, expected the predecessor {prev}"
        ));
    }
    if order != byte_order() {
        return Err("peer has a different byte order".into());
    }
    let answer = hmac::sign(&id.key, &id.accept_proof(me, rank, &ns, nc));
    write_by(stream, answer.as_ref(), deadline)
        .map_err(|e| format!("sending our proof: {}", describe(&e)))?;
    Ok(())
}

/// Accepts connections on `listener` until one proves it is member `prev`, `deadline` passes or
/// `abort` is set. Each connection is handshaken on its own thread so that a silent or slow
/// stranger does not hold up the genuine predecessor.
pub(super) fn accept_prev(
    listener: &TcpListener,
    id: &Identity,
    me: u64,
    prev: u64,
    deadline: Instant,
    abort: &AtomicBool,
) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let (tx, rx) = mpsc::channel::<(SocketAddr, std::result::Result<TcpStream, String>)>();
    let pending = Arc::new(AtomicUsize::new(0));
    let mut refused = 0usize;
    let mut last_refusal = String::new();
    loop {
        loop {
            match listener.accept() {
                Ok((stream, addr)) => {
                    if pending.load(Ordering::SeqCst) >= MAX_PENDING {
                        tracing::warn!(remote = %addr, group = %id.group,
                            "refused ring connection: too many handshakes in progress");
                        continue;
                    }
                    pending.fetch_add(1, Ordering::SeqCst);
                    let (tx, hs_id, hs_pending) = (tx.clone(), id.clone(), pending.clone());
                    let hs_deadline = deadline.min(Instant::now() + HANDSHAKE_TIMEOUT);
                    let spawned = std::thread::Builder::new()
                        .name("ring-handshake".into())
                        .spawn(move || {
                            let mut stream = stream;
                            let r = stream
                                .set_nonblocking(false)
                                .map_err(|e| e.to_string())
                                .and_then(|()| {
                                    accept_handshake(&mut stream, &hs_id, me, prev, hs_deadline)
                                });
                            hs_pending.fetch_sub(1, Ordering::SeqCst);
                            let _ = tx.send((addr, r.map(|()| stream)));
                        });
                    if let Err(e) = spawned {
                        pending.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(remote = %addr, group = %id.group,
                            "refused ring connection: cannot start a handshake thread: {e}");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // e.g. out of file descriptors: back off, keep listening.
                    tracing::warn!(group = %id.group, "ring accept failed: {e}");
                    break;
                }
            }
        }
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok((_, Ok(stream))) => return Ok(stream),
            Ok((addr, Err(reason))) => {
                tracing::warn!(remote = %addr, group = %id.group,
                    "refused ring connection: {reason}");
                refused += 1;
                last_refusal = format!("{addr}: {reason}");
            }
            Err(_) => {}
        }
        if abort.load(Ordering::SeqCst) {
            return Err(Abandoned.into());
        }
        if Instant::now() >= deadline {
            if refused > 0 {
                bail!(
                    "the previous member (rank {prev}) did not connect in time; refused {refused} \
                     connection(s), the last from {last_refusal}"
                );
            }
            bail!("the previous member (rank {prev}) did not connect in time");
        }
    }
}

/// Looks up member `next`'s address under `key`, connects and handshakes, retrying until
/// `deadline` (or `abort`) unless the peer fails to prove it holds the token.
pub(super) fn connect_next(
    kv: &dyn KeyValue,
    key: &str,
    id: &Identity,
    me: u64,
    next: u64,
    deadline: Instant,
    abort: &AtomicBool,
) -> Result<TcpStream> {
    let value = kv
        .get(key, deadline.saturating_duration_since(Instant::now()))
        .with_context(|| format!("looking up the next member (rank {next})"))?;
    let addr: SocketAddr = std::str::from_utf8(&value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            anyhow!(
                "the next member's address under {key:?} is not ip:port: {:?}",
                String::from_utf8_lossy(&value)
            )
        })?;
    let mut backoff = Duration::from_millis(10);
    let mut last = String::from("no attempt");
    loop {
        if abort.load(Ordering::SeqCst) {
            return Err(Abandoned.into());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("could not join the next member (rank {next}) at {addr} in time: {last}");
        }
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(1))) {
            Ok(mut stream) => {
                let hs_deadline = deadline.min(Instant::now() + CONNECTOR_HANDSHAKE_TIMEOUT);
                match connect_handshake(&mut stream, id, me, next, hs_deadline) {
                    Ok(()) => return Ok(stream),
                    Err(ConnectError::Retry(why)) => last = why,
                    Err(ConnectError::Fatal(why)) => {
                        bail!("the next member (rank {next}) at {addr} failed the handshake: {why}")
                    }
                }
            }
            Err(e) => last = format!("connecting: {e}"),
        }
        std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}
