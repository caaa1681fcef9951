//! The CPU backend: a bandwidth-optimal ring over TCP.
//!
//! Member `i` of a group of `n` sends to member `i+1` and receives from member `i−1` (mod `n`)
//! over one TCP connection each way, authenticated with the job token when the ring forms (see
//! `ring/handshake.rs`; the operations themselves are in `ring/op.rs`). The traffic itself is neither encrypted nor authenticated afterwards:
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
//! of leaving anyone waiting; every later call fails at once. A peer that hangs without closing
//! (a frozen process, a host off the network) is caught by stall detection (`ring/stall.rs`):
//! no byte moving for [`StallLimits::warn_after`] logs a warning, for [`StallLimits::timeout`]
//! fails the operation naming the group, the operation and the peer waited on; a slow link
//! that still moves bytes never times out.

mod handshake;
mod op;
mod sender;
mod stall;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_stall;

use self::handshake::{accept_prev, connect_next, Abandoned, Identity, MAX_GROUP};
pub use self::op::PeerClosed;
use self::op::*;
use self::sender::Sender;
use self::stall::Progress;
pub use self::stall::{
    CollectiveTimeout, StallLimits, COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT,
    MAX_STALL_WARNING,
};
use super::{Collective, KeyValue, ReduceOp};
use anyhow::{anyhow, bail, ensure, Context, Result};
use ring::hmac;
use std::fmt;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Elements per pipelined segment (256 KiB): the unit in which a member reduces what it
/// receives and passes it on.
pub const SEGMENT: usize = 64 * 1024;

/// A process group whose collectives run over a ring of TCP connections; see the module docs.
pub struct RingCollective {
    group: String,
    members: Vec<usize>,
    rank: usize,
    /// When an operation without progress warns and fails.
    limits: StallLimits,
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
    broken: Option<Broken>,
    /// What a reduction receives before adding it in ([`SEGMENT`] elements).
    segment: Vec<f32>,
    /// Reduce-scatter's partial sums on their way through this member (two blocks).
    partial: Vec<f32>,
    /// When a byte last moved on either connection.
    progress: Arc<Progress>,
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
            limits: StallLimits::default(),
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
            s.set_write_timeout(None)?;
        }
        send.set_read_timeout(None)?;
        // Receives wake up at every tick to look for a stall (see `ring/stall.rs`).
        recv.set_read_timeout(Some(ring.limits.tick()))?;
        let progress = Arc::new(Progress::default());
        let sender = Sender::spawn(send, &recv, "ring-send".into(), progress.clone())
            .with_context(|| format!("ring {group:?}: starting the sender thread"))?;
        ring.links = Some(Mutex::new(Links {
            recv,
            sender,
            seq: 0,
            broken: None,
            segment: vec![0.0; SEGMENT],
            partial: Vec::new(),
            progress,
        }));
        Ok(ring)
    }

    /// Sets when an operation that makes no progress warns and fails (default
    /// [`StallLimits::default`]: PyTorch's 10 minutes); workers take it from
    /// [`COLLECTIVE_TIMEOUT_ENV`].
    pub fn set_stall_limits(&mut self, limits: StallLimits) -> Result<()> {
        self.limits = limits;
        if let Some(links) = &self.links {
            let links = links.lock().unwrap_or_else(|p| p.into_inner());
            links
                .recv
                .set_read_timeout(Some(limits.tick()))
                .with_context(|| format!("ring {:?}: setting the receive timeout", self.group))?;
        }
        Ok(())
    }

    /// When an operation that makes no progress warns and fails.
    pub fn stall_limits(&self) -> StallLimits {
        self.limits
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
            links.broken.get_or_insert_with(|| Broken::by(&err));
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
        if let Some(broken) = &links.broken {
            return Err(broken.error(&self.group));
        }
        links.seq += 1;
        // The clock of stall detection starts with the operation: time between calls is no stall.
        links.progress.touch();
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
        if drained.is_err() {
            // Stalled or gone: unblock the sender, and below wait (promptly, then) until it no
            // longer reads the caller's buffers.
            op.links.sender.shutdown();
        }
        let _ = op.links.sender.wait(op.links.sender.queued());
        if result.is_ok() {
            result = drained.and_then(|()| match op.links.sender.error() {
                Some((kind, e)) => Err(op.send_error(kind, &e)),
                None => Ok(()),
            });
        }
        if let Err(e) = &result {
            op.links.sender.shutdown();
            op.links.broken = Some(Broken::by(e));
        }
        op.finished = true;
        result
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
