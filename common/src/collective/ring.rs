//! The CPU backend: a bandwidth-optimal ring over TCP.
//!
//! Member `i` of a group of `n` sends to member `i+1` and receives from member `i−1` (mod `n`)
//! over one TCP connection each way, authenticated with the job token when the ring forms (see
//! `ring/handshake.rs`). The traffic itself is neither encrypted nor authenticated afterwards:
//! the handshake keeps strangers from joining, the network is trusted not to tamper.
//!
//! - **all-reduce** is a reduce-scatter followed by an all-gather: `2(n−1)` steps, each sending
//!   one `1/n` chunk to the next member while receiving one from the previous, so every member
//!   sends and receives `2(n−1)/n` of the buffer in all: the optimum. Chunks differ by at most
//!   one element when the length is not a multiple of `n`. The last step of the reduce-scatter
//!   leaves chunk `i` fully reduced on member `i` (divided by `n` there for
//!   [`ReduceOp::Avg`]); the all-gather copies those bits everywhere, so every member ends with
//!   bit-identical results.
//! - **reduce-scatter** and **all-gather** are the two halves on the trait's block layout.
//! - **broadcast** streams the root's buffer around the ring, each member forwarding as it
//!   receives.
//! - **barrier** is an all-reduce of one element.
//!
//! Everything is pipelined in segments of [`SEGMENT`] elements: a long-lived sender thread per
//! group writes queued ranges of the caller's buffer (`ring/sender.rs`) while the calling thread
//! receives, reduces and queues each segment for the next step as soon as it is done, so a
//! chunk is on its way onwards before it has fully arrived.
//!
//! Every operation starts with a 32-byte header (operation, reduction, root, sequence number,
//! length) sent to the next member and checked against the previous member's, so members that
//! call different collectives or lengths fail instead of corrupting data or hanging.
//!
//! `f32`s travel in native byte order; every member must share it (the handshake checks).
//! Sockets use `TCP_NODELAY` and the kernel's buffer autotuning: on loopback, small fixed
//! buffers were faster (they stay in cache) but would cap throughput on real links, where the
//! bandwidth-delay product is what matters.
//!
//! Failures: a peer that closes its connection (a process that dies) makes the pending
//! operation fail with an error naming the group and the peer. Any failure — a closed
//! connection, a mismatch, a bad argument — leaves the group unusable: this member shuts its
//! connections down, so its neighbours fail too and the failure travels around the ring instead
//! of leaving anyone waiting; every later call fails at once. Data reads have no timeout (a slow
//! peer is legitimate); a peer that hangs without closing is for the control plane to detect.

mod handshake;
mod sender;
#[cfg(test)]
mod tests;

use self::handshake::{accept_prev, connect_next, Abandoned, Identity, MAX_GROUP};
use self::sender::Sender;
use super::{Collective, KeyValue, ReduceOp};
use anyhow::{anyhow, bail, ensure, Context, Result};
use ring::hmac;
use std::fmt;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Elements per pipelined segment (256 KiB): the unit in which a member reduces what it
/// receives and passes it on.
pub const SEGMENT: usize = 64 * 1024;

/// A process group whose collectives run over a ring of TCP connections; see the module docs.
pub struct RingCollective {
    group: String,
    members: Vec<usize>,
    rank: usize,
    /// `None` for a group of one.
    links: Option<Mutex<Links>>,
}

/// The connections of one member and the state that operations share.
struct Links {
    /// From the previous member.
    recv: TcpStream,
    /// To the next member.
    sender: Sender,
    /// Operations started, the number in the next header.
    seq: u64,
    /// Why the group is unusable, once it is.
    broken: Option<String>,
    /// What a reduction receives before adding it in ([`SEGMENT`] elements).
    segment: Vec<f32>,
    /// Reduce-scatter's partial sums on their way through this member (two blocks).
    partial: Vec<f32>,
}

impl fmt::Debug for RingCollective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingCollective")
            .field("group", &self.group)
            .field("members", &self.members)
            .field("rank", &self.rank)
            .finish_non_exhaustive()
    }
}

/// The KV key under which member `rank` of `group` publishes its address.
fn address_key(group: &str, rank: usize) -> String {
    format!("ring/{group}/{rank}")
}

impl RingCollective {
    /// Joins the ring of `group` (a name unique within the job generation, e.g. `"gen0/dp/1"`)
    /// whose members are the global ranks `members` (ascending); `me` is this process's global
    /// rank. Listens on `advertise` (the address peers should connect to), publishes it in `kv`
    /// under `ring/{group}/{rank in group}`, connects to the next member, accepts the previous
    /// one, and authenticates both connections with `token` (the job secret). `timeout` bounds
    /// the whole setup. A group of one opens no sockets.
    pub fn connect(
        group: &str,
        members: &[usize],
        me: usize,
        advertise: IpAddr,
        kv: &dyn KeyValue,
        token: &[u8],
        timeout: Duration,
    ) -> Result<RingCollective> {
        ensure!(
            !group.is_empty() && group.len() <= MAX_GROUP,
            "ring group name must have 1 to {MAX_GROUP} bytes, got {group:?}"
        );
        ensure!(!members.is_empty(), "ring {group:?}: no members");
        ensure!(
            members.windows(2).all(|w| w[0] < w[1]),
            "ring {group:?}: members must be ascending without repeats, got {members:?}"
        );
        let rank = members
            .iter()
            .position(|&m| m == me)
            .ok_or_else(|| anyhow!("ring {group:?}: global rank {me} is not in {members:?}"))?;
        ensure!(!token.is_empty(), "ring {group:?}: the job token is empty");
        let n = members.len();
        let mut ring = RingCollective {
            group: group.to_owned(),
            members: members.to_vec(),
            rank,
            links: None,
        };
        if n == 1 {
            return Ok(ring);
        }

        let deadline = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 86400));
        let (prev, next) = ((rank + n - 1) % n, (rank + 1) % n);
        let listener = TcpListener::bind((advertise, 0))
            .with_context(|| format!("ring {group:?}: listening on {advertise}"))?;
        let addr = listener.local_addr()?;
        kv.set(&address_key(group, rank), addr.to_string().as_bytes())
            .with_context(|| format!("ring {group:?}: publishing this member's address"))?;
        let id = Identity {
            group: group.to_owned(),
            key: hmac::Key::new(hmac::HMAC_SHA256, token),
        };

        let abort = AtomicBool::new(false);
        let (connected, accepted) = std::thread::scope(|s| {
            let connector = s.spawn(|| {
                let r = connect_next(
                    kv,
                    &address_key(group, next),
                    &id,
                    rank as u64,
                    next as u64,
                    deadline,
                    &abort,
                );
                if r.is_err() {
                    abort.store(true, Ordering::SeqCst);
                }
                r
            });
            let accepted = accept_prev(&listener, &id, rank as u64, prev as u64, deadline, &abort);
            if accepted.is_err() {
                abort.store(true, Ordering::SeqCst);
            }
            let connected = connector
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (connected, accepted)
        });
        drop(listener);
        let (send, recv) = match (connected, accepted) {
            (Ok(send), Ok(recv)) => (send, recv),
            (connected, accepted) => {
                // The half that failed first made the other give up: report the cause.
                let genuine = |e: &anyhow::Error| !e.is::<Abandoned>();
                let c = connected.err().filter(genuine);
                let a = accepted.err().filter(genuine);
                let (to_next, from_prev) = (ring.who(next), ring.who(prev));
                let here = format!("ring {group:?}, {}", ring.who(rank));
                match (c, a) {
                    (Some(c), Some(a)) => bail!(
                        "{here}: connecting to {to_next}: {c:#}; accepting {from_prev}: {a:#}"
                    ),
                    (Some(c), None) => {
                        return Err(c.context(format!("{here}: connecting to {to_next}")))
                    }
                    (None, Some(a)) => {
                        return Err(a.context(format!("{here}: accepting {from_prev}")))
                    }
                    (None, None) => bail!("{here}: setup failed"),
                }
            }
        };
        for s in [&send, &recv] {
            s.set_nodelay(true)?;
            s.set_read_timeout(None)?;
            s.set_write_timeout(None)?;
        }
        let sender = Sender::spawn(send, &recv, "ring-send".into())
            .with_context(|| format!("ring {group:?}: starting the sender thread"))?;
        ring.links = Some(Mutex::new(Links {
            recv,
            sender,
            seq: 0,
            broken: None,
            segment: vec![0.0; SEGMENT],
            partial: Vec::new(),
        }));
        Ok(ring)
    }

    /// The group's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The global ranks of the members.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    fn who(&self, rank: usize) -> String {
        format!("rank {rank} (global rank {})", self.members[rank])
    }

    /// Marks the group unusable because of a bad argument on this member, so that the others
    /// (already waiting in the operation) fail instead of hanging.
    fn refuse(&self, why: String) -> anyhow::Error {
        let err = anyhow!("ring {:?}: {why}", self.group);
        if let Some(links) = &self.links {
            let mut links = links.lock().unwrap_or_else(|p| p.into_inner());
            links.sender.shutdown();
            links.broken.get_or_insert_with(|| format!("{err:#}"));
        }
        err
    }

    /// Runs one operation: header exchange, then `body`; always waits until the sender no
    /// longer reads the buffers `body` lent it before returning. On failure, shuts the links
    /// down for good (see the module docs).
    fn run(&self, mine: Header, body: impl FnOnce(&mut Op<'_>) -> Result<()>) -> Result<()> {
        let links = self
            .links
            .as_ref()
            .expect("a group of one runs no operation");
        let mut links = links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &links.broken {
            bail!(
                "ring {:?}: unusable after an earlier failure: {why}",
                self.group
            );
        }
        links.seq += 1;
        let mut op = Op {
            ring: self,
            mine: Header {
                seq: links.seq,
                ..mine
            },
            links: &mut links,
            finished: false,
        };
        // The header goes first, so the successor can tell a mismatch from a failure.
        let header = op.links.sender.send_owned(op.mine.encode().to_vec());
        let mut result = op.check_header().and_then(|()| body(&mut op));
        if result.is_err() {
            // Let the header out before closing (so the successor can name a mismatch): it
            // cannot block for long, as the successor has read or will read everything before
            // it (this member finished the previous operation), or else fails and closes.
            let _ = op.wait(header);
            op.links.sender.shutdown();
        }
        let drained = op.wait(op.links.sender.queued());
        if result.is_ok() {
            result = drained.and_then(|()| match op.links.sender.error() {
                Some(e) => Err(op.send_error(&e)),
                None => Ok(()),
            });
        }
        if let Err(e) = &result {
            op.links.sender.shutdown();
            op.links.broken = Some(format!("{e:#}"));
        }
        op.finished = true;
        result
    }
}

/// Operation codes in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    Broadcast = 4,
    Barrier = 5,
}

/// What each member sends its successor before an operation; the successor checks it equals
/// its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    kind: u8,
    /// 1 = sum, 2 = average, 0 = none.
    op: u8,
    root: u32,
    seq: u64,
    len: u64,
}

const HEADER_MAGIC: &[u8; 4] = b"CRop";
const HEADER: usize = 32;

impl Header {
    fn new(kind: Kind, op: Option<ReduceOp>, root: usize, len: usize) -> Self {
        Header {
            kind: kind as u8,
            op: match op {
                None => 0,
                Some(ReduceOp::Sum) => 1,
                Some(ReduceOp::Avg) => 2,
            },
            root: root as u32,
            seq: 0,
            len: len as u64,
        }
    }

    fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[..4].copy_from_slice(HEADER_MAGIC);
        b[4] = self.kind;
        b[5] = self.op;
        b[8..12].copy_from_slice(&self.root.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER]) -> Option<Self> {
        if &b[..4] != HEADER_MAGIC {
            return None;
        }
        Some(Header {
            kind: b[4],
            op: b[5],
            root: u32::from_le_bytes(b[8..12].try_into().ok()?),
            seq: u64::from_le_bytes(b[16..24].try_into().ok()?),
            len: u64::from_le_bytes(b[24..32].try_into().ok()?),
        })
    }
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            1 => "Sum",
            2 => "Avg",
            _ => "?",
        };
        let (len, seq) = (self.len, self.seq);
        match self.kind {
            1 => write!(f, "all_reduce({op}) of {len} elements"),
            2 => write!(f, "all_gather of {len} elements per member"),
            3 => write!(f, "reduce_scatter({op}) to {len} elements per member"),
            4 => write!(f, "broadcast from rank {} of {len} elements", self.root),
            5 => write!(f, "barrier"),
            k => write!(f, "unknown operation {k}"),
        }?;
        write!(f, " (operation #{seq})")
    }
}

/// A buffer that the calling thread and the sender thread share: the calling thread writes the
/// ranges it has not lent, the sender reads the ones it has. Both derive from one raw pointer.
#[derive(Clone, Copy)]
struct Raw {
    ptr: *mut f32,
    len: usize,
}

impl Raw {
    fn of(s: &mut [f32]) -> Raw {
        Raw {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// For buffers that are only ever read (lent or summed from), never through `slice_mut`.
    fn of_const(s: &[f32]) -> Raw {
        Raw {
            ptr: s.as_ptr().cast_mut(),
            len: s.len(),
        }
    }

    /// # Safety
    /// The buffer is alive and no lent range overlaps `r` (no other reference to it exists).
    unsafe fn slice_mut<'x>(&self, r: Range<usize>) -> &'x mut [f32] {
        assert!(r.start <= r.end && r.end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.len())
    }

    /// # Safety
    /// The buffer is alive and `r` is not being written.
    unsafe fn slice<'x>(&self, r: Range<usize>) -> &'x [f32] {
        assert!(r.start <= r.end && r.end <= self.len);
        std::slice::from_raw_parts(self.ptr.add(r.start), r.len())
    }
}

/// Chunk `c` of `len` elements split into `n` chunks that differ by at most one element.
fn chunk(len: usize, n: usize, c: usize) -> Range<usize> {
    let (base, extra) = (len / n, len % n);
    let start = c * base + c.min(extra);
    start..start + base + usize::from(c < extra)
}

/// `r` in pieces of at most [`SEGMENT`] elements.
fn segments(r: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let end = r.end;
    r.step_by(SEGMENT).map(move |s| s..(s + SEGMENT).min(end))
}

fn bytes_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: any bytes are a valid f32, u8 has no alignment, and the length covers exactly x.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), std::mem::size_of_val(x)) }
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += *b;
    }
}

fn divide(x: &mut [f32], n: usize) {
    let n = n as f32;
    for v in x {
        *v /= n;
    }
}

/// One operation in progress on a member's links. If it is dropped unfinished (a panic), it
/// shuts the links down and waits until the sender has let go of every lent buffer, so the
/// caller's buffers are never read after they are gone.
struct Op<'a> {
    ring: &'a RingCollective,
    links: &'a mut Links,
    mine: Header,
    finished: bool,
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.links.sender.shutdown();
            let _ = self.links.sender.wait(self.links.sender.queued());
            self.links
                .broken
                .get_or_insert_with(|| "an operation panicked".into());
        }
    }
}

impl Op<'_> {
    fn n(&self) -> usize {
        self.ring.members.len()
    }

    fn me(&self) -> usize {
        self.ring.rank
    }

    fn prev(&self) -> usize {
        (self.me() + self.n() - 1) % self.n()
    }

    fn next(&self) -> usize {
        (self.me() + 1) % self.n()
    }

    fn send_error(&self, e: &str) -> anyhow::Error {
        anyhow!(
            "ring {:?}: sending to {} failed during {}: {e}",
            self.ring.group,
            self.ring.who(self.next()),
            self.mine
        )
    }

    fn recv_error(&self, e: std::io::Error) -> anyhow::Error {
        if let Some(se) = self.links.sender.error() {
            return self.send_error(&se);
        }
        let (group, prev, what) = (&self.ring.group, self.ring.who(self.prev()), self.mine);
        if e.kind() == ErrorKind::UnexpectedEof {
            anyhow!(
                "ring {group:?}: {prev} closed the connection during {what} (it stopped or failed)"
            )
        } else {
            anyhow!("ring {group:?}: receiving from {prev} failed during {what}: {e}")
        }
    }

    /// Reads the previous member's header and checks it matches this member's.
    fn check_header(&mut self) -> Result<()> {
        let mut b = [0u8; HEADER];
        if let Err(e) = self.links.recv.read_exact(&mut b) {
            return Err(self.recv_error(e));
        }
        let (group, prev) = (&self.ring.group, self.ring.who(self.prev()));
        let theirs = Header::decode(&b).ok_or_else(|| {
            anyhow!(
                "ring {group:?}: {prev} sent garbage where the header of {} belongs",
                self.mine
            )
        })?;
        ensure!(
            theirs == self.mine,
            "ring {group:?}: mismatched collectives: {} (this member) called {}, but {prev} \
             called {theirs}",
            self.ring.who(self.me()),
            self.mine
        );
        Ok(())
    }

    fn recv_into(&mut self, dst: &mut [f32]) -> Result<()> {
        match self.links.recv.read_exact(bytes_mut(dst)) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.recv_error(e)),
        }
    }

    /// Receives `dst.len()` elements and adds them to `dst`.
    fn recv_reduce(&mut self, dst: &mut [f32]) -> Result<()> {
        for piece in dst.chunks_mut(SEGMENT) {
            let Links { recv, segment, .. } = &mut *self.links;
            let got = &mut segment[..piece.len()];
            if let Err(e) = recv.read_exact(bytes_mut(got)) {
                return Err(self.recv_error(e));
            }
            add_into(piece, got);
        }
        Ok(())
    }

    /// Queues `buf[r]` to the next member without copying; returns the ticket to wait for
    /// before writing that range again.
    ///
    /// # Safety
    /// `buf` stays alive until the operation ends ([`RingCollective::run`] waits), and `r` is
    /// not written before [`Op::wait`] has returned for the ticket.
    unsafe fn lend(&mut self, buf: Raw, r: Range<usize>) -> u64 {
        assert!(r.start <= r.end && r.end <= buf.len);
        self.links.sender.lend(
            buf.ptr.add(r.start).cast::<u8>(),
            std::mem::size_of_val(buf.slice(r)),
        )
    }

    fn wait(&self, ticket: u64) -> Result<()> {
        self.links.sender.wait(ticket).map_err(|_| {
            anyhow!(
                "ring {:?}: the sender thread died during {}",
                self.ring.group,
                self.mine
            )
        })
    }

    fn all_reduce(&mut self, buf: Raw, op: ReduceOp) -> Result<()> {
        let (n, r, len) = (self.n(), self.me(), buf.len);
        // lent[c]: the ticket after which the sender no longer reads chunk c.
        let mut lent = vec![0u64; n];
        // Reduce-scatter: at step s, send chunk r−1−s, receive chunk r−2−s and add ours in;
        // the received chunk is sent on at step s+1, segment by segment as it is reduced. The
        // last step receives chunk r, which is then complete: it goes straight out as the
        // first step of the all-gather.
        let first = (r + n - 1) % n;
        // SAFETY (every `lend` and `slice_mut` below): `buf` is the caller's buffer, alive
        // until `run` has drained the sender; a chunk is only written after `wait(lent[c])`.
        lent[first] = unsafe { self.lend(buf, chunk(len, n, first)) };
        for s in 0..n - 1 {
            let c = (r + 2 * n - 2 - s) % n;
            self.wait(lent[c])?;
            for seg in segments(chunk(len, n, c)) {
                let dst = unsafe { buf.slice_mut(seg.clone()) };
                self.recv_reduce(dst)?;
                if s == n - 2 && op == ReduceOp::Avg {
                    divide(dst, n);
                }
                lent[c] = unsafe { self.lend(buf, seg) };
            }
        }
        // All-gather: at step t, send chunk r−t, receive chunk r−1−t (and pass it on).
        for t in 0..n - 1 {
            let c = (r + 2 * n - 1 - t) % n;
            self.wait(lent[c])?;
            for seg in segments(chunk(len, n, c)) {
                self.recv_into(unsafe { buf.slice_mut(seg.clone()) })?;
                if t < n - 2 {
                    lent[c] = unsafe { self.lend(buf, seg) };
                }
            }
        }
        Ok(())
    }

    fn reduce_scatter(&mut self, input: Raw, output: Raw, op: ReduceOp) -> Result<()> {
        let (n, r, b) = (self.n(), self.me(), output.len);
        // Same schedule as all-reduce's first half, but the input is read-only: partial sums
        // go through two blocks of scratch, taking turns (a block is written again two steps
        // after it was filled, once the sender is done with it).
        if n > 2 && self.links.partial.len() < 2 * b {
            self.links.partial = vec![0.0; 2 * b];
        }
        let partial = Raw::of(&mut self.links.partial);
        let mut lent = [0u64; 2];
        let first = (r + n - 1) % n;
        // SAFETY: `input` and `output` are the caller's, `partial` is ours (not resized until
        // the next operation); all outlive the operation. `input` is never written, `output`
        // never lent, and a scratch block is written only after waiting for its ticket.
        unsafe { self.lend(input, first * b..(first + 1) * b) };
        for s in 0..n - 1 {
            let c = (r + 2 * n - 2 - s) % n;
            let last = s == n - 2;
            let (dst, base) = if last {
                (output, 0)
            } else {
                self.wait(lent[s % 2])?;
                (partial, (s % 2) * b)
            };
            for seg in segments(0..b) {
                let d = unsafe { dst.slice_mut(base + seg.start..base + seg.end) };
                self.recv_into(d)?;
                add_into(d, unsafe {
                    input.slice(c * b + seg.start..c * b + seg.end)
                });
                if !last {
                    lent[s % 2] = unsafe { self.lend(dst, base + seg.start..base + seg.end) };
                } else if op == ReduceOp::Avg {
                    divide(d, n);
                }
            }
        }
        Ok(())
    }

    fn all_gather(&mut self, input: Raw, output: Raw) -> Result<()> {
        let (n, r, b) = (self.n(), self.me(), input.len);
        // SAFETY: the caller's buffers outlive the operation; every block of `output` is
        // written once, before it is lent.
        unsafe {
            output
                .slice_mut(r * b..(r + 1) * b)
                .copy_from_slice(input.slice(0..b));
            self.lend(output, r * b..(r + 1) * b);
        }
        for t in 0..n - 1 {
            let c = (r + 2 * n - 1 - t) % n;
            for seg in segments(c * b..(c + 1) * b) {
                self.recv_into(unsafe { output.slice_mut(seg.clone()) })?;
                if t < n - 2 {
                    unsafe { self.lend(output, seg) };
                }
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, buf: Raw, root: usize) -> Result<()> {
        // SAFETY: the caller's buffer outlives the operation; the root only reads it, the
        // others write each segment before lending it and never again.
        if self.me() == root {
            unsafe { self.lend(buf, 0..buf.len) };
            return Ok(());
        }
        let forward = self.next() != root;
        for seg in segments(0..buf.len) {
            self.recv_into(unsafe { buf.slice_mut(seg.clone()) })?;
            if forward {
                unsafe { self.lend(buf, seg) };
            }
        }
        Ok(())
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let header = Header::new(Kind::AllReduce, Some(op), 0, buf.len());
        self.run(header, |o| o.all_reduce(Raw::of(buf), op))
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let n = self.size();
        if input.len().checked_mul(n) != Some(output.len()) {
            return Err(self.refuse(format!(
                "all_gather: output has {} elements, expected {} × {n}",
                output.len(),
                input.len()
            )));
        }
        if n == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        let header = Header::new(Kind::AllGather, None, 0, input.len());
        self.run(header, |o| {
            o.all_gather(Raw::of_const(input), Raw::of(output))
        })
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()> {
        let n = self.size();
        if output.len().checked_mul(n) != Some(input.len()) {
            return Err(self.refuse(format!(
                "reduce_scatter: input has {} elements, expected {} × {n}",
                input.len(),
                output.len()
            )));
        }
        if n == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        let header = Header::new(Kind::ReduceScatter, Some(op), 0, output.len());
        self.run(header, |o| {
            o.reduce_scatter(Raw::of_const(input), Raw::of(output), op)
        })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let n = self.size();
        if root >= n {
            return Err(self.refuse(format!("broadcast: root {root} outside a group of {n}")));
        }
        if n == 1 {
            return Ok(());
        }
        let header = Header::new(Kind::Broadcast, None, root, buf.len());
        self.run(header, |o| o.broadcast(Raw::of(buf), root))
    }

    fn barrier(&self) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let mut one = [0.0f32];
        let header = Header::new(Kind::Barrier, None, 0, 1);
        self.run(header, |o| o.all_reduce(Raw::of(&mut one), ReduceOp::Sum))
    }
}
