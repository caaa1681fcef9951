//! How a stopped collective ends a worker: the error that marks "another rank failed first",
//! and the exit codes the launcher reads (peer failed, collective timeout).

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

/// The exit code an error asks for: [`EXIT_PEER_FAILED`] when another rank failed first,
/// [`EXIT_COLLECTIVE_TIMEOUT`] for a collective that outlasted `--collective-timeout`; `None`
/// for any other error.
pub fn exit_code(e: &anyhow::Error) -> Option<i32> {
    if e.downcast_ref::<PeerFailed>().is_some() {
        Some(EXIT_PEER_FAILED)
    } else if e
        .downcast_ref::<coca_common::collective::ring::CollectiveTimeout>()
        .is_some()
    {
        Some(EXIT_COLLECTIVE_TIMEOUT)
    } else {
        None
    }
}
