//! How a stopped collective ends a worker: the error that marks "another rank failed first",
//! and the exit codes the launcher reads (peer failed, collective timeout).

use coca_common::collective::ring::{CollectiveTimeout, PeerClosed};
use std::sync::atomic::{AtomicI32, Ordering};

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

/// The exit code a collective's typed error asks for, if it is one of those.
fn typed_code(e: &anyhow::Error) -> Option<i32> {
    if e.is::<PeerFailed>() || e.is::<PeerClosed>() {
        Some(EXIT_PEER_FAILED)
    } else if e.is::<CollectiveTimeout>() {
        Some(EXIT_COLLECTIVE_TIMEOUT)
    } else {
        None
    }
}

/// The exit code of the first collective error of this process that went on as another type
/// keeping only the text (the model's collectives are candle ops); 0 while there is none.
static FIRST_UNTYPED: AtomicI32 = AtomicI32::new(0);

/// Records a collective's error that is about to lose its type, so that [`exit_code`] still
/// knows that a peer had stopped first, or that a collective timed out.
pub fn note_collective_error(e: &anyhow::Error) {
    if let Some(code) = typed_code(e) {
        let _ = FIRST_UNTYPED.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// The exit code an error asks for: [`EXIT_PEER_FAILED`] when another rank failed first (the
/// control plane said so, or a collective found its peer's connection closed),
/// [`EXIT_COLLECTIVE_TIMEOUT`] for a collective that outlasted `--collective-timeout`; for any
/// other error, what the first collective failure noted by [`note_collective_error`] asks for,
/// else `None`.
pub fn exit_code(e: &anyhow::Error) -> Option<i32> {
    typed_code(e).or(match FIRST_UNTYPED.load(Ordering::Relaxed) {
        0 => None,
        code => Some(code),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test of this binary that notes errors (no other test may expect `None` from
    /// [`exit_code`] for an untyped error).
    #[test]
    fn collective_failures_ask_for_their_exit_codes_even_as_text() {
        let closed = || anyhow::Error::new(PeerClosed("rank 1 closed the connection".into()));
        let wrapped = closed().context("summing zero-shot hits over the ranks");
        assert_eq!(exit_code(&wrapped), Some(EXIT_PEER_FAILED));
        let timeout = || anyhow::Error::new(CollectiveTimeout("no progress for 600 s".into()));
        assert_eq!(exit_code(&timeout()), Some(EXIT_COLLECTIVE_TIMEOUT));
        // Through a type that keeps only the text (the model's collectives are candle ops):
        // the first collective failure noted when the error was converted.
        let own = anyhow::anyhow!("decoding image 9.jpg: invalid JPEG");
        assert_eq!(exit_code(&own), None);
        note_collective_error(&own);
        assert_eq!(exit_code(&own), None, "an error of this rank notes nothing");
        note_collective_error(&closed());
        note_collective_error(&timeout());
        let as_text = anyhow::anyhow!("gathering row counts: {:#}", closed());
        assert_eq!(
            exit_code(&as_text),
            Some(EXIT_PEER_FAILED),
            "the first one noted"
        );
        assert_eq!(
            exit_code(&timeout()),
            Some(EXIT_COLLECTIVE_TIMEOUT),
            "typed first"
        );
    }
}
