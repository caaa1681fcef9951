//! What travels between control-plane peers: the public job types (identities, plans, failures,
//! events), the private wire messages, and their framing (u32 little-endian length, then a
//! bincode-2 payload).
//!
//! Streams of one connection:
//! - the session stream, the first bidirectional stream a client opens: `Hello` up, `HelloReply`
//!   down, then heartbeats (`SessionUp`) up and [`Event`]s down until the connection ends;
//! - one bidirectional stream per request: one `Request` up, one `Response` down, so that a
//!   blocking `get` or barrier never holds up the client's other requests.

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The TLS application protocol (ALPN) of the control plane: a peer speaking anything else
/// (another QUIC service on a reused port) fails the handshake instead of confusing us.
pub const ALPN: &[u8] = b"coca-control";

/// Version of the messages below, the first field of `Hello`: a launcher and a worker built
/// from different sources are refused with a clear reason rather than misreading each other.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame accepted (16 MiB): a bigger length prefix is refused before anything is
/// allocated, so a broken or hostile peer cannot make us allocate gigabytes.
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// Largest `Hello` accepted from a peer that has not proved it knows the token yet.
pub(crate) const MAX_HELLO_BYTES: usize = 64 << 10;

/// Who a client is; sent in the hello, it decides which requests it may make and what its
/// disappearance means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Identity {
    /// A launcher.
    Node {
        /// Its node rank, `0..nnodes`.
        node_rank: usize,
        /// How many workers it runs (the same on every node).
        nproc: usize,
        /// The address its workers advertise for collectives.
        host: String,
    },
    /// A worker process.
    Worker {
        /// Its global rank.
        rank: usize,
        /// The generation (rendezvous) it was started for.
        generation: u64,
    },
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node {
                node_rank, host, ..
            } => write!(f, "node {node_rank} ({host})"),
            Identity::Worker { rank, generation } => {
                write!(f, "worker rank {rank} (generation {generation})")
            }
        }
    }
}

/// One node of a [`Plan`]: what its launcher announced when it joined the rendezvous.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's rank, `0..nnodes`.
    pub node_rank: usize,
    /// Workers on that node.
    pub nproc: usize,
    /// The address its workers advertise for collectives.
    pub host: String,
}

/// The outcome of a rendezvous: every node of the generation, from which each launcher derives
/// the global ranks of its workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The generation this plan is for (0, then +1 per restart).
    pub generation: u64,
    /// Sorted by `node_rank`, one entry per node `0..nnodes`.
    pub nodes: Vec<NodeInfo>,
    /// Total number of workers (the sum of `nproc`).
    pub world: usize,
}

impl Plan {
    /// Global rank of the first worker of `node_rank`: the sum of `nproc` of the lower nodes.
    pub fn rank_offset(&self, node_rank: usize) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.node_rank < node_rank)
            .map(|n| n.nproc)
            .sum()
    }

    /// The node that runs global rank `rank`, if any.
    pub fn node_of_rank(&self, rank: usize) -> Option<usize> {
        let mut offset = 0;
        for n in &self.nodes {
            if rank < offset + n.nproc {
                return Some(n.node_rank);
            }
            offset += n.nproc;
        }
        None
    }
}

/// How a process or node ended, in a [`FailureReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ExitKind {
    /// Exited with this status code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Vanished: the node or process disappeared or its heartbeats stopped.
    Lost,
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "exited with code {c}"),
            ExitKind::Signal(s) => write!(f, "was killed by signal {s}"),
            ExitKind::Lost => write!(f, "was lost"),
        }
    }
}

/// A failure of a worker or node, as reported by its launcher (or synthesized by the server
/// for lost peers). The first one of a generation decides between restart and abort, and is
/// shown to the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureReport {
    /// The generation the failed process or node belonged to.
    pub generation: u64,
    /// The node it ran on.
    pub node_rank: usize,
    /// The worker's global rank; `None` for the node (launcher) itself.
    pub rank: Option<usize>,
    /// The process id, when known.
    pub pid: Option<u32>,
    /// How it ended.
    pub exit: ExitKind,
    /// What went wrong, in a sentence for the user.
    pub cause: String,
    /// The last lines the process printed, for the user.
    pub last_lines: Vec<String>,
    /// When it happened (seconds since the Unix epoch, see [`unix_time_s`]).
    pub unix_time_s: f64,
}

impl fmt::Display for FailureReport {
    /// One line: `rank 3 (pid 1234) on node 1 exited with code 1 in generation 0: cause`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rank {
            Some(rank) => write!(f, "rank {rank} ")?,
            None => write!(f, "the launcher ")?,
        }
        if let Some(pid) = self.pid {
            write!(f, "(pid {pid}) ")?;
        }
        write!(
            f,
            "on node {} {} in generation {}",
            self.node_rank, self.exit, self.generation
        )?;
        if !self.cause.is_empty() {
            write!(f, ": {}", self.cause)?;
        }
        Ok(())
    }
}

/// Seconds since the Unix epoch, for [`FailureReport::unix_time_s`].
pub fn unix_time_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What the server pushes to every client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Stop everything now; `failure` is the first failure of the generation (None: shutdown for
    /// another reason given in `reason`).
    Abort {
        /// Why, in a sentence for the user.
        reason: String,
        /// The deciding failure, if a failure caused it.
        failure: Option<FailureReport>,
    },
    /// Kill the current workers and rendezvous again for `generation`; `failure` caused it.
    Restart {
        /// The generation to rendezvous for next.
        generation: u64,
        /// The failure that caused the restart.
        failure: FailureReport,
    },
    /// Every node reported done: the job succeeded.
    Finished,
}

/// The first frame of a session. `version` must stay the first field in every version: the
/// server decodes it alone before the rest, so that a mismatch is reported as such.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub version: u32,
    pub identity: Identity,
    /// HMAC of the token over this TLS session's exported keying material (see `tls`).
    pub proof: Vec<u8>,
}

/// The server's answer to `Hello`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum HelloReply {
    /// Accepted; `proof` shows the server knows the token too.
    Welcome {
        proof: Vec<u8>,
        heartbeat_timeout_ms: u64,
        generation: u64,
    },
    /// Refused, with the reason for the user.
    Refused { reason: String },
}

/// Client-to-server frames on the session stream after the hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum SessionUp {
    Heartbeat { seq: u64 },
}

/// One request, alone on its own bidirectional stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Request {
    Rendezvous {
        timeout_ms: u64,
    },
    ReportFailure(FailureReport),
    ReportDone,
    Barrier {
        name: String,
        participants: usize,
        timeout_ms: u64,
    },
    Set {
        key: String,
        value: Vec<u8>,
    },
    Get {
        key: String,
        timeout_ms: u64,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Response {
    Ok,
    Plan(Plan),
    Value(Vec<u8>),
    Error(String),
}

/// QUIC application error codes the control plane closes connections with.
pub(crate) mod close_code {
    /// The client said goodbye: not a failure.
    pub const GOODBYE: u32 = 0x10;
    /// The server refused the client (token, version, identity).
    pub const REFUSED: u32 = 0x11;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 0x12;
    /// The server declared the client dead (heartbeats stopped).
    pub const DEAD: u32 = 0x13;
    /// A protocol violation (undecodable frame).
    pub const PROTOCOL: u32 = 0x14;
}

/// bincode's configuration with an allocation limit of `LIMIT` bytes: every length read from
/// a payload (strings, byte vectors) is checked against it before anything is allocated.
fn bincode_config<const LIMIT: usize>() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// Serializes `msg` into one frame: u32 little-endian payload length, then the payload.
pub(crate) fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let payload = bincode::serde::encode_to_vec(msg, bincode_config::<MAX_FRAME_BYTES>())
        .context("cannot encode a message")?;
    if payload.len() > MAX_FRAME_BYTES {
        bail!(
            "message of {} bytes exceeds the control plane's {} MiB frame limit",
            payload.len(),
            MAX_FRAME_BYTES >> 20
        );
    }
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Decodes one payload (without its length prefix) of an authenticated peer: lengths inside
/// may claim up to [`MAX_FRAME_BYTES`].
pub(crate) fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T> {
    let (msg, _) = bincode::serde::decode_from_slice(payload, bincode_config::<MAX_FRAME_BYTES>())
        .context("undecodable message")?;
    Ok(msg)
}

/// Decodes a payload of a peer that may be a stranger (hellos, their replies, heartbeats):
/// lengths inside may claim no more than [`MAX_HELLO_BYTES`], so a few bytes claiming a huge
/// string allocate nothing.
pub(crate) fn decode_small<T: DeserializeOwned>(payload: &[u8]) -> Result<T> {
    let (msg, _) = bincode::serde::decode_from_slice(payload, bincode_config::<MAX_HELLO_BYTES>())
        .context("undecodable message")?;
    Ok(msg)
}

/// Writes one frame.
pub(crate) async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode_frame(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame's payload; `None` on a clean end of stream before the frame. A length above
/// `max` is an error, and nothing is allocated for it.
pub(crate) async fn read_frame<R>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>>
where
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            bail!("stream ended inside a frame header");
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        bail!("refused a frame of {len} bytes (limit {max} bytes)");
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .await
        .context("stream ended inside a frame")?;
    Ok(Some(payload))
}

/// Reads and decodes one frame; a clean end of stream is an error here.
pub(crate) async fn read_msg<R, T>(r: &mut R, max: usize) -> Result<T>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    match read_frame(r, max).await? {
        Some(payload) if max <= MAX_HELLO_BYTES => decode_small(&payload),
        Some(payload) => decode(&payload),
        None => bail!("the peer closed the stream"),
    }
}

/// `30 s`, `1.5 s`: durations in messages for people.
pub(crate) fn fmt_secs(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if (s - s.round()).abs() < 1e-9 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// Milliseconds for the wire, saturating.
pub(crate) fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_rank_offsets() {
        let plan = Plan {
            generation: 0,
            nodes: (0..3)
                .map(|r| NodeInfo {
                    node_rank: r,
                    nproc: 4,
                    host: format!("h{r}"),
                })
                .collect(),
            world: 12,
        };
        assert_eq!(plan.rank_offset(0), 0);
        assert_eq!(plan.rank_offset(2), 8);
        assert_eq!(plan.node_of_rank(7), Some(1));
        assert_eq!(plan.node_of_rank(12), None);
    }

    #[test]
    fn frames_roundtrip_and_limits() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            let req = Request::Set {
                key: "k".into(),
                value: vec![1, 2, 3],
            };
            write_frame(&mut a, &req).await.unwrap();
            let back: Request = read_msg(&mut b, MAX_FRAME_BYTES).await.unwrap();
            assert!(
                matches!(back, Request::Set { key, value } if key == "k" && value == [1, 2, 3])
            );

            // A huge length prefix is refused without allocating or waiting for the payload.
            a.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
            let e = read_frame(&mut b, MAX_FRAME_BYTES).await.unwrap_err();
            assert!(e.to_string().contains("refused a frame"), "{e}");

            // Garbage payloads are errors, not panics.
            let e = decode::<Hello>(&[0xff; 40]).unwrap_err();
            assert!(e.to_string().contains("undecodable"), "{e}");

            // A few bytes claiming a huge string are refused by the limit before allocating,
            // not by running out of input after allocating.
            let mut lying = encode_frame(&Hello {
                version: PROTOCOL_VERSION,
                identity: Identity::Node {
                    node_rank: 0,
                    nproc: 1,
                    host: String::new(),
                },
                proof: Vec::new(),
            })
            .unwrap()[4..]
                .to_vec();
            // standard() varints: version, variant 0, node_rank 0, nproc 1, then the host's
            // length: 0 → 0xFC (u32 follows) claiming MAX_HELLO_BYTES + 1.
            assert_eq!(lying[4], 0, "the host's length sits at byte 4");
            let claim = (MAX_HELLO_BYTES as u32 + 1).to_le_bytes();
            lying.splice(4..5, [0xFC].into_iter().chain(claim));
            let e = format!("{:#}", decode_small::<Hello>(&lying).unwrap_err());
            assert!(e.contains("LimitExceeded"), "{e}");
            // (An authenticated peer's frames may claim more: that fails on the missing bytes.)
            let e = format!("{:#}", decode::<Hello>(&lying).unwrap_err());
            assert!(
                e.contains("undecodable") && !e.contains("LimitExceeded"),
                "{e}"
            );

            // Clean end of stream.
            drop(a);
            assert!(read_frame(&mut b, 16).await.unwrap().is_none());
        });
    }
}
