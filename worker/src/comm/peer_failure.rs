//! How a stopped collective ends a worker: the error that marks "another rank failed first",
//! and the exit codes the launcher reads (peer failed, collective timeout).

use coca_common::collective::ring::PeerClosed;
use std::sync::atomic::{AtomicBool, Ordering};

/// Exit code of a worker that stopped because another rank failed (the launcher reports these
/// after the real failure, so the summary names the rank that failed first).
pub const EXIT_PEER_FAILED: i32 = 75;

/// Exit code of a worker whose collective made no progress for `--collective-timeout` (as
/// `timeout(1)` exits when its command timed out).
pub const EXIT_COLLECTIVE_TIMEOUT: i32 = 124;

/// Marks an error as the consequence of another rank's failure (exit code
/// [`EXIT_PEER_FAILED`]).
#[derive(Debug, thiserror::Error)]
#[error("stopped because another rank failed first (see the launcher's summary)")]
pub struct PeerFailed;

/// Set once a collective of this process found a peer's connection closed and its error went
/// on as another type that keeps only the text (the model's collectives are candle ops).
static PEER_CLOSED_SEEN: AtomicBool = AtomicBool::new(false);

/// Records a collective's error that is about to lose its type (see [`PEER_CLOSED_SEEN`]), so
/// that [`exit_code`] still knows a peer had stopped first.
pub fn note_collective_error(e: &anyhow::Error) {
    if e.is::<PeerClosed>() {
        PEER_CLOSED_SEEN.store(true, Ordering::Relaxed);
    }
}

/// The exit code an error asks for: [`EXIT_PEER_FAILED`] when another rank failed first (the
/// control plane said so, or a collective found its peer's connection closed),
/// [`EXIT_COLLECTIVE_TIMEOUT`] for a collective that outlasted `--collective-timeout`; `None`
/// for any other error.
pub fn exit_code(e: &anyhow::Error) -> Option<i32> {
    if e.is::<PeerFailed>() || e.is::<PeerClosed>() {
        Some(EXIT_PEER_FAILED)
    } else if e.is::<coca_common::collective::ring::CollectiveTimeout>() {
        Some(EXIT_COLLECTIVE_TIMEOUT)
    } else if PEER_CLOSED_SEEN.load(Ordering::Relaxed) {
        Some(EXIT_PEER_FAILED)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test of this binary that sets [`PEER_CLOSED_SEEN`] (no other test may expect
    /// `None` from [`exit_code`]).
    #[test]
    fn a_peer_closed_connection_asks_for_the_peer_failed_code() {
        let closed = || anyhow::Error::new(PeerClosed("rank 1 closed the connection".into()));
        let wrapped = closed().context("summing zero-shot hits over the ranks");
        assert_eq!(exit_code(&wrapped), Some(EXIT_PEER_FAILED));
        // Through a type that keeps only the text (the model's collectives are candle ops):
        // recorded when the error is converted.
        let own = anyhow::anyhow!("decoding image 9.jpg: invalid JPEG");
        assert_eq!(exit_code(&own), None);
        note_collective_error(&own);
        assert_eq!(
            exit_code(&own),
            None,
            "an error of this rank is noted as nothing"
        );
        note_collective_error(&closed());
        let as_text = anyhow::anyhow!("gathering row counts: {:#}", closed());
        assert_eq!(exit_code(&as_text), Some(EXIT_PEER_FAILED));
    }
}
