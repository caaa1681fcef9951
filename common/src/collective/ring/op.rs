//! One collective operation on a member's links: the header both neighbours check, the
//! buffers shared with the sender thread, and the ring algorithms (reduce-scatter, all-gather,
//! all-reduce, broadcast), pipelined segment by segment (see the parent module's docs).

use super::sender::SenderGone;
use super::stall::{CollectiveTimeout, Verdict, Waiting, Watch};
use super::*;
use tracing::warn;

/// The error of an operation whose neighbour closed or reset its connection: that member
/// stopped (it failed, or was stopped) before this one, so this failure follows from its. A
/// worker exits with its "peer failed" code for it, which lets the launcher's summary name the
/// member that failed first instead of its neighbours.
#[derive(Debug)]
pub struct PeerClosed(pub String);

impl fmt::Display for PeerClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerClosed {}

/// A link's failure `message` as an error: [`PeerClosed`] (saying that member stopped or
/// failed) when the I/O error's `kind` means the member at the other end closed the link (its
/// process ended or dropped the group).
fn link_error(kind: ErrorKind, message: String) -> anyhow::Error {
    match kind {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => {
            anyhow::Error::new(PeerClosed(format!("{message} (it stopped or failed)")))
        }
        _ => anyhow!(message),
    }
}

/// Why a group is unusable, once it is: the first failure's text, and whether a neighbour
/// closing its connection caused it (then every later operation's error says so too).
#[derive(Debug, Clone)]
pub(super) struct Broken {
    pub(super) why: String,
    pub(super) by_peer: bool,
}

impl Broken {
    /// The state `err` leaves the group in.
    pub(super) fn by(err: &anyhow::Error) -> Self {
        Self {
            why: format!("{err:#}"),
            by_peer: err.is::<PeerClosed>(),
        }
    }

    /// The error of an operation started on the broken group `group`.
    pub(super) fn error(&self, group: &str) -> anyhow::Error {
        let message = format!(
            "ring {group:?}: unusable after an earlier failure: {}",
            self.why
        );
        match self.by_peer {
            true => anyhow::Error::new(PeerClosed(message)),
            false => anyhow!(message),
        }
    }
}

/// Operation codes in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    Broadcast = 4,
    Barrier = 5,
}

/// What each member sends its successor before an operation; the successor checks it equals
/// its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) kind: u8,
    /// 1 = sum, 2 = average, 0 = none.
    pub(super) op: u8,
    pub(super) root: u32,
    pub(super) seq: u64,
    pub(super) len: u64,
}

pub(super) const HEADER_MAGIC: &[u8; 4] = b"CRop";
pub(super) const HEADER: usize = 32;

impl Header {
    pub(super) fn new(kind: Kind, op: Option<ReduceOp>, root: usize, len: usize) -> Self {
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

    pub(super) fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[..4].copy_from_slice(HEADER_MAGIC);
        b[4] = self.kind;
        b[5] = self.op;
        b[8..12].copy_from_slice(&self.root.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8; HEADER]) -> Option<Self> {
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
pub(super) struct Raw {
    pub(super) ptr: *mut f32,
    pub(super) len: usize,
}

impl Raw {
    pub(super) fn of(s: &mut [f32]) -> Raw {
        Raw {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// For buffers that are only ever read (lent or summed from), never through `slice_mut`.
    pub(super) fn of_const(s: &[f32]) -> Raw {
        Raw {
            ptr: s.as_ptr().cast_mut(),
            len: s.len(),
        }
    }

    /// # Safety
    /// The buffer is alive and no lent range overlaps `r` (no other reference to it exists).
    pub(super) unsafe fn slice_mut<'x>(&self, r: Range<usize>) -> &'x mut [f32] {
        assert!(r.start <= r.end && r.end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.len())
    }

    /// # Safety
    /// The buffer is alive and `r` is not being written.
    pub(super) unsafe fn slice<'x>(&self, r: Range<usize>) -> &'x [f32] {
        assert!(r.start <= r.end && r.end <= self.len);
        std::slice::from_raw_parts(self.ptr.add(r.start), r.len())
    }
}

/// Chunk `c` of `len` elements split into `n` chunks that differ by at most one element.
pub(super) fn chunk(len: usize, n: usize, c: usize) -> Range<usize> {
    let (base, extra) = (len / n, len % n);
    let start = c * base + c.min(extra);
    start..start + base + usize::from(c < extra)
}

/// `r` in pieces of at most [`SEGMENT`] elements.
pub(super) fn segments(r: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let end = r.end;
    r.step_by(SEGMENT).map(move |s| s..(s + SEGMENT).min(end))
}

pub(super) fn bytes_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: any bytes are a valid f32, u8 has no alignment, and the length covers exactly x.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), std::mem::size_of_val(x)) }
}

pub(super) fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += *b;
    }
}

pub(super) fn divide(x: &mut [f32], n: usize) {
    let n = n as f32;
    for v in x {
        *v /= n;
    }
}

/// One operation in progress on a member's links. If it is dropped unfinished (a panic), it
/// shuts the links down and waits until the sender has let go of every lent buffer, so the
/// caller's buffers are never read after they are gone.
pub(super) struct Op<'a> {
    pub(super) ring: &'a RingCollective,
    pub(super) links: &'a mut Links,
    pub(super) mine: Header,
    pub(super) finished: bool,
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.links.sender.shutdown();
            let _ = self.links.sender.wait(self.links.sender.queued());
            self.links.broken.get_or_insert_with(|| Broken {
                why: "an operation panicked".into(),
                by_peer: false,
            });
        }
    }
}

impl Op<'_> {
    pub(super) fn n(&self) -> usize {
        self.ring.members.len()
    }

    pub(super) fn me(&self) -> usize {
        self.ring.rank
    }

    pub(super) fn prev(&self) -> usize {
        (self.me() + self.n() - 1) % self.n()
    }

    pub(super) fn next(&self) -> usize {
        (self.me() + 1) % self.n()
    }

    /// The error of a failed write to the next member (`kind`, `e`: the sender's).
    pub(super) fn send_error(&self, kind: ErrorKind, e: &str) -> anyhow::Error {
        let (group, next, what) = (&self.ring.group, self.ring.who(self.next()), self.mine);
        link_error(
            kind,
            format!("ring {group:?}: sending to {next} failed during {what}: {e}"),
        )
    }

    /// The error of a failed read from the previous member (or of the write that failed
    /// first, which shut both links down).
    pub(super) fn recv_error(&self, e: std::io::Error) -> anyhow::Error {
        if let Some((kind, se)) = self.links.sender.error() {
            return self.send_error(kind, &se);
        }
        let (group, prev, what) = (&self.ring.group, self.ring.who(self.prev()), self.mine);
        let message = match e.kind() {
            ErrorKind::UnexpectedEof => {
                format!("ring {group:?}: {prev} closed the connection during {what}")
            }
            _ => format!("ring {group:?}: receiving from {prev} failed during {what}: {e}"),
        };
        link_error(e.kind(), message)
    }

    /// Called when a receive or a wait found nothing new: warns or fails once the operation
    /// has made no progress for the limits' times (see `ring/stall.rs`).
    pub(super) fn quiet(&self, watch: &mut Watch, waiting: Waiting) -> Result<()> {
        let limits = &self.ring.limits;
        let (peer, doing) = match waiting {
            Waiting::Receive => (self.prev(), "to send"),
            Waiting::Send => (self.next(), "to receive"),
        };
        match watch.check(&self.links.progress, limits) {
            Verdict::Wait => Ok(()),
            Verdict::Warn(idle) => {
                warn!(
                    group = %self.ring.group,
                    peer = %self.ring.who(peer),
                    "stalled collective: ring {:?}: no progress for {:.1} s during {}, waiting \
                     for {} {doing} (the collective timeout of {:.1} s stops the job)",
                    self.ring.group,
                    idle.as_secs_f64(),
                    self.mine,
                    self.ring.who(peer),
                    limits.timeout.as_secs_f64()
                );
                Ok(())
            }
            Verdict::Fail(idle) => Err(anyhow::Error::new(CollectiveTimeout(format!(
                "ring {:?}: collective timeout: no progress for {:.1} s during {}, waiting for \
                 {} {doing} (it stopped participating, or the network between them dropped; \
                 raise --collective-timeout for longer pauses)",
                self.ring.group,
                idle.as_secs_f64(),
                self.mine,
                self.ring.who(peer)
            )))),
        }
    }

    /// `read_exact` from the previous member that watches for stalls between the socket's
    /// timeouts and stamps the progress clock.
    pub(super) fn read_full(&mut self, dst: &mut [u8]) -> Result<()> {
        let mut got = 0;
        let mut watch = Watch::new();
        while got < dst.len() {
            match self.links.recv.read(&mut dst[got..]) {
                Ok(0) => return Err(self.recv_error(ErrorKind::UnexpectedEof.into())),
                Ok(n) => {
                    got += n;
                    self.links.progress.touch();
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    self.quiet(&mut watch, Waiting::Receive)?
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.recv_error(e)),
            }
        }
        Ok(())
    }

    /// Reads the previous member's header and checks it matches this member's.
    pub(super) fn check_header(&mut self) -> Result<()> {
        let mut b = [0u8; HEADER];
        self.read_full(&mut b)?;
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

    pub(super) fn recv_into(&mut self, dst: &mut [f32]) -> Result<()> {
        self.read_full(bytes_mut(dst))
    }

    /// Receives `dst.len()` elements and adds them to `dst`.
    pub(super) fn recv_reduce(&mut self, dst: &mut [f32]) -> Result<()> {
        // Borrowed out of the links for the reads, and always put back.
        let mut segment = std::mem::take(&mut self.links.segment);
        let mut result = Ok(());
        for piece in dst.chunks_mut(SEGMENT) {
            let got = &mut segment[..piece.len()];
            result = self.recv_into(got);
            if result.is_err() {
                break;
            }
            add_into(piece, got);
        }
        self.links.segment = segment;
        result
    }

    /// Queues `buf[r]` to the next member without copying; returns the ticket to wait for
    /// before writing that range again.
    ///
    /// # Safety
    /// `buf` stays alive until the operation ends ([`RingCollective::run`] waits), and `r` is
    /// not written before [`Op::wait`] has returned for the ticket.
    pub(super) unsafe fn lend(&mut self, buf: Raw, r: Range<usize>) -> u64 {
        assert!(r.start <= r.end && r.end <= buf.len);
        self.links.sender.lend(
            buf.ptr.add(r.start).cast::<u8>(),
            std::mem::size_of_val(buf.slice(r)),
        )
    }

    /// Waits until the sender is done with `ticket`, watching for stalls.
    pub(super) fn wait(&self, ticket: u64) -> Result<()> {
        let mut watch = Watch::new();
        loop {
            match self
                .links
                .sender
                .wait_timeout(ticket, self.ring.limits.tick())
            {
                Ok(true) => return Ok(()),
                Ok(false) => self.quiet(&mut watch, Waiting::Send)?,
                Err(SenderGone) => bail!(
                    "ring {:?}: the sender thread died during {}",
                    self.ring.group,
                    self.mine
                ),
            }
        }
    }

    pub(super) fn all_reduce(&mut self, buf: Raw, op: ReduceOp) -> Result<()> {
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

    pub(super) fn reduce_scatter(&mut self, input: Raw, output: Raw, op: ReduceOp) -> Result<()> {
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

    pub(super) fn all_gather(&mut self, input: Raw, output: Raw) -> Result<()> {
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

    pub(super) fn broadcast(&mut self, buf: Raw, root: usize) -> Result<()> {
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
