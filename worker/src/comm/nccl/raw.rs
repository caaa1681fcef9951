//! An NCCL communicator over the raw functions of [`super::library`]: created non-blocking
//! (`ncclCommInitRankConfig` with `blocking = 0`) and polled to completion with a deadline,
//! abortable from another thread, errors with NCCL's own text.
//!
//! cudarc's safe `Comm` is not used: it inits blocking (a dead peer hangs the init), has no
//! abort, no `Send`/`Sync`, and its `Drop` panics on error. The types are cudarc's
//! `nccl-02030` bindings (through candle-core's `nccl` feature, the only NCCL version feature
//! enabled); `ncclConfig_t` is passed with its size and version, and NCCL copies only the
//! prefix it knows, so an older 2.x library reads the fields it has.

use super::library::{functions, Functions};
use anyhow::{bail, Result};
use candle_core::cuda_backend::cudarc::nccl::sys;
use coca_common::collective::ring::PeerClosed;
use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::{Duration, Instant};

/// `NCCL_VERSION(2, 30, 0)`: the version of the headers cudarc's bindings were made from.
const BINDINGS_VERSION: u32 = 23000;

/// The oldest library accepted: non-blocking communicators and `ncclCommGetAsyncError` as
/// used here (2.19; cudarc's oldest bindings are 2.18).
const MIN_LIBRARY_VERSION: c_int = 21900;

/// How often a pending non-blocking call is polled.
const POLL: Duration = Duration::from_micros(50);

/// Whether a call's result means it succeeded or was accepted and is still running (what a
/// non-blocking communicator answers).
fn accepted(code: sys::ncclResult_t) -> bool {
    matches!(
        code,
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
    )
}

/// NCCL's text for `code`.
fn error_string(f: &Functions, code: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a pointer to a static NUL-terminated string (or null).
    let ptr = unsafe { (f.ncclGetErrorString)(code) };
    if ptr.is_null() {
        return format!("{code:?}");
    }
    // SAFETY: non-null, static and NUL-terminated, as above.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// The library's last error message for `comm` (may be null for "no communicator").
fn last_error(f: &Functions, comm: sys::ncclComm_t) -> String {
    // SAFETY: `comm` is a live communicator or null (allowed); the returned string is owned by
    // NCCL and valid until the next NCCL call on this thread, and is copied at once.
    let ptr = unsafe { (f.ncclGetLastError)(comm) };
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated, as above.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// An error naming `what`, NCCL's text for `code` and its last error message.
fn nccl_error(
    f: &Functions,
    what: &str,
    code: sys::ncclResult_t,
    comm: sys::ncclComm_t,
) -> anyhow::Error {
    let last = last_error(f, comm);
    let text = error_string(f, code);
    let message = if last.is_empty() {
        format!("NCCL {what}: {text}")
    } else {
        format!("NCCL {what}: {text} ({last})")
    };
    typed(code, message)
}

/// `message` as the error type the exit code is read from: NCCL's `ncclRemoteError` ("a remote
/// process exiting prematurely", or the network between) is another rank's failure seen from
/// here, so the worker exits with the "peer failed" code (75), as after a closed ring
/// connection, even when the control plane's verdict has not reached it; any other code is
/// this rank's own error.
fn typed(code: sys::ncclResult_t, message: String) -> anyhow::Error {
    match code {
        sys::ncclResult_t::ncclRemoteError => anyhow::Error::new(PeerClosed(message)),
        _ => anyhow::anyhow!(message),
    }
}

/// The NCCL library's version code, refused when older than [`MIN_LIBRARY_VERSION`].
pub fn library_version() -> Result<c_int> {
    let f = functions()?;
    let mut v = 0;
    // SAFETY: ncclGetVersion writes one int through the pointer, which outlives the call.
    let code = unsafe { (f.ncclGetVersion)(&mut v) };
    if code != sys::ncclResult_t::ncclSuccess {
        bail!(nccl_error(f, "ncclGetVersion", code, std::ptr::null_mut()));
    }
    if v < MIN_LIBRARY_VERSION {
        bail!(
            "the NCCL library is {} (version code {v}), older than the NCCL {} this build needs; \
             put a newer libnccl.so.2 (the nvidia-nccl-cu13 wheel's lib folder) on \
             LD_LIBRARY_PATH",
            version_name(v),
            version_name(MIN_LIBRARY_VERSION)
        );
    }
    Ok(v)
}

/// `major.minor.patch` of an `ncclGetVersion` code: `NCCL_VERSION_CODE`, which is
/// `major·10000 + minor·100 + patch` since 2.9 and `major·1000 + minor·100 + patch` before.
fn version_name(code: c_int) -> String {
    let (major, rest) = match code {
        20900.. => (code / 10000, code % 10000),
        _ => (code / 1000, code % 1000),
    };
    format!("{major}.{}.{}", rest / 100, rest % 100)
}

/// A fresh unique id (rank 0 of a group makes it and publishes it through the key-value store).
pub fn new_unique_id() -> Result<[u8; 128]> {
    let f = functions()?;
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    // SAFETY: ncclGetUniqueId writes one ncclUniqueId through the pointer, which outlives it.
    let code = unsafe { (f.ncclGetUniqueId)(&mut id) };
    if code != sys::ncclResult_t::ncclSuccess {
        bail!(nccl_error(f, "ncclGetUniqueId", code, std::ptr::null_mut()));
    }
    // `c_char` is i8 on x86-64 and u8 on aarch64: the bytes are moved as they are.
    Ok(id.internal.map(|c| c as u8))
}

/// The element type and reduction of a call.
#[derive(Debug, Clone, Copy)]
pub enum RawOp {
    /// Sum.
    Sum,
    /// Average over the members.
    Avg,
}

impl RawOp {
    fn nccl(self) -> sys::ncclRedOp_t {
        match self {
            RawOp::Sum => sys::ncclRedOp_t::ncclSum,
            RawOp::Avg => sys::ncclRedOp_t::ncclAvg,
        }
    }
}

/// One NCCL communicator. Operations are issued from one thread at a time (the trainer's);
/// [`RawComm::abort`] may be called from any thread at any time.
pub struct RawComm {
    f: &'static Functions,
    comm: AtomicPtr<sys::ncclComm>,
    rank: usize,
    size: usize,
}

// SAFETY: the handle is an opaque pointer owned by NCCL. NCCL allows ncclCommAbort and
// ncclCommGetAsyncError from another thread while a call is in progress (the watchdog pattern of
// PyTorch and XLA); every other call is made by the thread that owns the communicator's
// operations, which `Communicator`'s callers guarantee by issuing a group's operations in order.
unsafe impl Send for RawComm {}
// SAFETY: as above; the pointer is read and swapped atomically.
unsafe impl Sync for RawComm {}

impl RawComm {
    /// Joins the communicator of `size` members named by `id` as `rank`, failing after
    /// `timeout` (the init is aborted, not left hanging).
    pub fn init(id: &[u8; 128], rank: usize, size: usize, timeout: Duration) -> Result<Self> {
        library_version()?;
        let f = functions()?;
        let mut unique = sys::ncclUniqueId { internal: [0; 128] };
        for (dst, src) in unique.internal.iter_mut().zip(id) {
            *dst = *src as _;
        }
        let mut config = blocking_off_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are valid for writes/reads for the call; the config is
        // fully initialised (undefined ints, null pointers) with its size, magic and version.
        let status = unsafe {
            (f.ncclCommInitRankConfig)(
                &mut comm,
                c_int::try_from(size)?,
                unique,
                c_int::try_from(rank)?,
                &mut config,
            )
        };
        let raw = RawComm {
            f,
            comm: AtomicPtr::new(comm),
            rank,
            size,
        };
        if !accepted(status) {
            bail!(nccl_error(f, "ncclCommInitRankConfig", status, comm));
        }
        raw.wait("ncclCommInitRankConfig", Instant::now() + timeout)?;
        Ok(raw)
    }

    /// This member's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of members.
    pub fn size(&self) -> usize {
        self.size
    }

    fn handle(&self, what: &str) -> Result<sys::ncclComm_t> {
        let comm = self.comm.load(Ordering::Acquire);
        if comm.is_null() {
            bail!("NCCL {what}: the communicator was aborted");
        }
        Ok(comm)
    }

    /// Polls `ncclCommGetAsyncError` until the pending call completes, fails, or `deadline`
    /// passes (then aborts).
    pub fn wait(&self, what: &str, deadline: Instant) -> Result<()> {
        loop {
            let comm = self.handle(what)?;
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is live (not yet aborted; an abort racing this call is allowed by
            // NCCL) and `state` is valid for the write.
            let code = unsafe { (self.f.ncclCommGetAsyncError)(comm, &mut state) };
            if code != sys::ncclResult_t::ncclSuccess {
                bail!(nccl_error(self.f, "ncclCommGetAsyncError", code, comm));
            }
            match state {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress if Instant::now() < deadline => {
                    std::thread::sleep(POLL)
                }
                sys::ncclResult_t::ncclInProgress => {
                    self.abort();
                    bail!(
                        "NCCL {what}: not complete by its deadline; the communicator was aborted"
                    );
                }
                error => bail!(nccl_error(self.f, what, error, comm)),
            }
        }
    }

    /// Makes every pending and future call fail: `ncclCommAbort` (NCCL's kernels exit, a
    /// blocked stream synchronisation returns). Idempotent; callable from any thread.
    pub fn abort(&self) {
        let comm = self.comm.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !comm.is_null() {
            // SAFETY: `comm` was live and is aborted exactly once (the swap above); no new call
            // can take it (the handle is now null). The result is ignored: nothing can be done.
            let _ = unsafe { (self.f.ncclCommAbort)(comm) };
        }
    }

    /// Enqueues one collective on `stream` and waits for NCCL to accept it (non-blocking
    /// communicators may answer "in progress"). `send`/`recv` are device addresses of `count`
    /// f32 elements as the operation defines (`count` is the per-member count of all-gather and
    /// reduce-scatter).
    ///
    /// # Safety
    /// `send` and `recv` must be device allocations on this communicator's device, valid for
    /// the sizes `kind` implies until the stream has run the collective; `stream` must be a live
    /// stream of that device.
    pub unsafe fn enqueue(
        &self,
        kind: RawKind,
        send: u64,
        recv: u64,
        count: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        let what = kind.name();
        let comm = self.handle(what)?;
        let f32_ = sys::ncclDataType_t::ncclFloat32;
        let (s, r) = (send as *const c_void, recv as *mut c_void);
        let stream = stream as sys::cudaStream_t;
        let f = self.f;
        // SAFETY: the caller's contract above; `comm` is live.
        let status = unsafe {
            match kind {
                RawKind::AllReduce(op) => {
                    (f.ncclAllReduce)(s, r, count, f32_, op.nccl(), comm, stream)
                }
                RawKind::ReduceScatter(op) => {
                    (f.ncclReduceScatter)(s, r, count, f32_, op.nccl(), comm, stream)
                }
                RawKind::AllGather => (f.ncclAllGather)(s, r, count, f32_, comm, stream),
                RawKind::Broadcast(root) => {
                    (f.ncclBroadcast)(s, r, count, f32_, c_int::try_from(root)?, comm, stream)
                }
            }
        };
        if !accepted(status) {
            bail!(nccl_error(f, what, status, comm));
        }
        self.wait(what, Instant::now() + Duration::from_secs(600))
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        // Abort, not destroy: ncclCommDestroy waits for peers and hangs when one is gone.
        self.abort();
    }
}

/// Which collective [`RawComm::enqueue`] issues.
#[derive(Debug, Clone, Copy)]
pub enum RawKind {
    /// `ncclAllReduce`.
    AllReduce(RawOp),
    /// `ncclReduceScatter`.
    ReduceScatter(RawOp),
    /// `ncclAllGather`.
    AllGather,
    /// `ncclBroadcast` from this root.
    Broadcast(usize),
}

impl RawKind {
    fn name(self) -> &'static str {
        match self {
            RawKind::AllReduce(_) => "ncclAllReduce",
            RawKind::ReduceScatter(_) => "ncclReduceScatter",
            RawKind::AllGather => "ncclAllGather",
            RawKind::Broadcast(_) => "ncclBroadcast",
        }
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: cudarc has no initializer, so every field is
/// set here (ints undefined, pointers null).
fn blocking_off_config() -> sys::ncclConfig_t {
    const UNDEF: c_int = i32::MIN; // NCCL_CONFIG_UNDEF_INT
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: BINDINGS_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::peer_failure::{exit_code, EXIT_PEER_FAILED};

    #[test]
    fn version_codes_are_named_as_nccl_releases() {
        assert_eq!(version_name(MIN_LIBRARY_VERSION), "2.19.0");
        assert_eq!(version_name(21805), "2.18.5");
        assert_eq!(version_name(23206), "2.32.6");
        // Before 2.9 the minor version had one digit.
        assert_eq!(version_name(2804), "2.8.4");
    }

    #[test]
    fn a_remote_error_is_a_peer_failure_and_the_rest_are_this_ranks() {
        let remote = typed(
            sys::ncclResult_t::ncclRemoteError,
            "NCCL ncclAllReduce: remote process exited or there was a network error".into(),
        );
        assert!(remote.is::<PeerClosed>());
        let wrapped = remote.context("the dp group's all-reduce");
        assert_eq!(exit_code(&wrapped), Some(EXIT_PEER_FAILED));
        assert!(format!("{wrapped:#}").contains("remote process exited"));
        for code in [
            sys::ncclResult_t::ncclSystemError,
            sys::ncclResult_t::ncclInternalError,
            sys::ncclResult_t::ncclInvalidUsage,
            sys::ncclResult_t::ncclUnhandledCudaError,
        ] {
            let own = typed(code, format!("NCCL ncclAllReduce: {code:?}"));
            assert!(!own.is::<PeerClosed>(), "{code:?}");
        }
    }
}
