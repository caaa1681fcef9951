//! No rank hangs in a collective that cannot finish: a watchdog thread aborts every watched
//! communicator when the control plane says the job is stopping (a peer failed, a restart) or
//! when one operation outlasts `--collective-timeout`, and the blocked operation then fails with
//! the error the worker's exit code is chosen from ([`PeerFailed`]: exit 75,
//! [`CollectiveTimeout`]: exit 124) — what the CPU ring does with its stall clock.
//!
//! NCCL blocks a rank whose peer died inside the collective (or the stream synchronisation
//! after it) and releases it only on `ncclCommAbort` from another thread; PyTorch's
//! ProcessGroupNCCL watchdog works the same way. The backend only has to implement [`Abort`];
//! the tests use a double that spins until aborted, as NCCL's kernels do.

use super::{Communicator, FlatBuffer};
use crate::comm::peer_failure::PeerFailed;
use anyhow::{Error, Result};
use coca_common::collective::ring::CollectiveTimeout;
use coca_common::collective::{Collective, ReduceOp};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A communicator whose pending and future operations an abort from another thread makes fail
/// promptly (NCCL: `ncclCommAbort`).
pub trait Abort: Send + Sync {
    /// Called from the watchdog thread while an operation may be blocked in another thread.
    fn abort(&self);
}

/// Asked every tick: `Some(reason)` once the job is stopping because of another rank (the
/// control plane's Abort with a failure, or a Restart); waits up to the given time otherwise.
pub type FailureSignal = Box<dyn FnMut(Duration) -> Option<String> + Send>;

/// Why the watchdog aborted.
#[derive(Debug, Clone)]
enum Verdict {
    PeerFailed(String),
    Timeout(String),
}

/// What one watched communicator is doing.
struct Entry {
    group: String,
    comm: Arc<dyn Abort>,
    /// The operation in flight and when it started.
    pending: Arc<Mutex<Option<(&'static str, Instant)>>>,
}

struct Shared {
    timeout: Duration,
    entries: Mutex<Vec<Entry>>,
    verdict: Mutex<Option<Verdict>>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single assignment or read: a poisoned lock holds valid data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Records the first verdict and aborts every communicator.
    fn abort_all(&self, verdict: Verdict) {
        lock(&self.verdict).get_or_insert(verdict);
        for entry in lock(&self.entries).iter() {
            entry.comm.abort();
        }
    }

    /// The operation that has run longer than the timeout, if any.
    fn overdue(&self) -> Option<String> {
        lock(&self.entries).iter().find_map(|e| {
            let (op, started) = (*lock(&e.pending))?;
            (started.elapsed() > self.timeout).then(|| {
                format!(
                    "the {} group's {op} did not finish within {:?} \
                     (--collective-timeout); aborted its communicators",
                    e.group, self.timeout
                )
            })
        })
    }
}

/// The watchdog thread of a rank's communicators; stops when dropped.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the thread: every `tick` it asks `failures` and looks for an operation older
    /// than `timeout`.
    pub fn start(timeout: Duration, tick: Duration, mut failures: FailureSignal) -> Result<Self> {
        let shared = Arc::new(Shared {
            timeout,
            entries: Mutex::new(Vec::new()),
            verdict: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("comm-watchdog".into())
            .spawn(move || {
                while !s.stop.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    if let Some(reason) = failures(tick) {
                        s.abort_all(Verdict::PeerFailed(reason));
                        return;
                    }
                    if let Some(what) = s.overdue() {
                        s.abort_all(Verdict::Timeout(what));
                        return;
                    }
                    // A signal that answers at once (its channel closed) must not spin.
                    std::thread::sleep(tick.saturating_sub(asked.elapsed()));
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// `comm` (the members of the group named `group`), watched: its operations fail with the
    /// watchdog's verdict once it aborted them.
    pub fn watch<C: Communicator + Abort + 'static>(
        &self,
        group: &str,
        comm: Arc<C>,
    ) -> Arc<dyn Communicator> {
        let pending = Arc::new(Mutex::new(None));
        lock(&self.shared.entries).push(Entry {
            group: group.to_string(),
            comm: comm.clone(),
            pending: pending.clone(),
        });
        Arc::new(Watched {
            group: group.to_string(),
            inner: comm,
            pending,
            shared: self.shared.clone(),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A communicator whose operations the watchdog can release.
struct Watched<C> {
    group: String,
    inner: Arc<C>,
    pending: Arc<Mutex<Option<(&'static str, Instant)>>>,
    shared: Arc<Shared>,
}

impl<C: Communicator> Watched<C> {
    /// The watchdog's verdict as the error of `op`.
    fn verdict_error(&self, op: &str) -> Option<Error> {
        Some(match lock(&self.shared.verdict).clone()? {
            Verdict::PeerFailed(reason) => Error::new(PeerFailed).context(format!(
                "the {} group's {op} was aborted: {reason}",
                self.group
            )),
            Verdict::Timeout(what) => Error::new(CollectiveTimeout(what)),
        })
    }

    /// Runs `f` as operation `op`, visible to the watchdog while it runs.
    fn run<T>(&self, op: &'static str, f: impl FnOnce(&C) -> Result<T>) -> Result<T> {
        if let Some(e) = self.verdict_error(op) {
            return Err(e);
        }
        *lock(&self.pending) = Some((op, Instant::now()));
        let out = f(&self.inner);
        *lock(&self.pending) = None;
        match out {
            Err(e) => Err(self.verdict_error(op).unwrap_or(e)),
            ok => ok,
        }
    }
}

impl<C: Communicator> Communicator for Watched<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn all_reduce(&self, buf: &mut FlatBuffer, op: ReduceOp) -> Result<()> {
        self.run("all_reduce", |c| c.all_reduce(buf, op))
    }

    fn all_gather(&self, input: &FlatBuffer) -> Result<FlatBuffer> {
        self.run("all_gather", |c| c.all_gather(input))
    }

    fn reduce_scatter(&self, input: &FlatBuffer, op: ReduceOp) -> Result<FlatBuffer> {
        self.run("reduce_scatter", |c| c.reduce_scatter(input, op))
    }

    fn broadcast(&self, buf: &mut FlatBuffer, root: usize) -> Result<()> {
        self.run("broadcast", |c| c.broadcast(buf, root))
    }

    fn barrier(&self) -> Result<()> {
        self.run("barrier", |c| c.barrier())
    }

    fn transport(&self) -> &Arc<dyn Collective> {
        self.inner.transport()
    }
}

#[cfg(test)]
#[path = "watchdog_tests.rs"]
mod tests;
