//! Admission of connections that have not proved the token yet: a cap on how many such
//! handshakes run at once, overall and per source address, so that a flood of half-open or
//! garbage connections cannot hold the server's memory or starve the job's own clients (which
//! retry a refused attempt). A connection holds its [`Ticket`] from its first packet until it
//! proved the token or was refused, at most [`HandshakeLimits::timeout`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// How many connections may be in their handshake (QUIC/TLS, then the hello with the token
/// proof) at once, and for how long each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Unauthenticated connections at once, from all sources together.
    pub max_pending: usize,
    /// Unauthenticated connections at once from one source address (a node's workers connect
    /// from one address at about the same time, so this is not tiny).
    pub max_pending_per_source: usize,
    /// How long a connection may take from its first packet to a verified hello.
    pub timeout: Duration,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            max_pending: 256,
            max_pending_per_source: 64,
            timeout: Duration::from_secs(10),
        }
    }
}

/// How often a refusal is logged as a warning at most (the rest are counted in the next one).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The counts of unauthenticated connections, overall and per source.
#[derive(Debug)]
pub(super) struct Admission {
    limits: HandshakeLimits,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    total: usize,
    /// Only sources with a pending handshake (so at most `max_pending` entries).
    per_source: HashMap<IpAddr, usize>,
    /// Refusals since the last warning, and when that was.
    unlogged: u64,
    last_warning: Option<Instant>,
}

/// One admitted handshake; dropping it frees the slot.
#[derive(Debug)]
pub(super) struct Ticket {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self.admission.lock();
        inner.total = inner.total.saturating_sub(1);
        if let Some(n) = inner.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                inner.per_source.remove(&self.source);
            }
        }
    }
}

impl Admission {
    pub(super) fn new(limits: HandshakeLimits) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The handshake timeout.
    pub(super) fn timeout(&self) -> Duration {
        self.limits.timeout
    }

    /// A slot for a new connection from `source`, or `None` (logged, rate-limited) when either
    /// cap is reached.
    pub(super) fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Ticket> {
        let mut inner = self.lock();
        let from_source = inner.per_source.get(&source).copied().unwrap_or(0);
        let full = if inner.total >= self.limits.max_pending {
            Some(format!(
                "{} unauthenticated connections pending (the limit)",
                inner.total
            ))
        } else if from_source >= self.limits.max_pending_per_source {
            Some(format!(
                "{from_source} unauthenticated connections pending from {source} (the limit \
                 per source)"
            ))
        } else {
            None
        };
        if let Some(why) = full {
            inner.unlogged += 1;
            let now = Instant::now();
            if inner
                .last_warning
                .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL)
            {
                warn!(
                    %source,
                    refused = inner.unlogged,
                    "refusing control-plane connection attempts: {why}"
                );
                inner.unlogged = 0;
                inner.last_warning = Some(now);
            } else {
                debug!(%source, "refused a control-plane connection attempt: {why}");
            }
            return None;
        }
        inner.total += 1;
        *inner.per_source.entry(source).or_insert(0) += 1;
        Some(Ticket {
            admission: self.clone(),
            source,
        })
    }

    /// Tests: handshakes in progress, and the number of sources they come from.
    #[cfg(test)]
    pub(super) fn pending(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.total, inner.per_source.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_overall_and_per_source_and_frees_on_drop() {
        let admission = Admission::new(HandshakeLimits {
            max_pending: 3,
            max_pending_per_source: 2,
            timeout: Duration::from_secs(1),
        });
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = admission.admit(a).expect("first from a");
        let a2 = admission.admit(a).expect("second from a");
        assert!(admission.admit(a).is_none(), "a third from one source");
        let b1 = admission.admit(b).expect("first from b");
        assert!(admission.admit(b).is_none(), "a fourth overall");
        assert_eq!(admission.pending(), (3, 2));
        drop(a1);
        let a3 = admission.admit(a).expect("a slot freed");
        drop((a2, a3, b1));
        assert_eq!(admission.pending(), (0, 0), "no entry left behind");
    }
}
