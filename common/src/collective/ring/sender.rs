//! The sending half of a ring link: a long-lived thread that writes queued byte ranges to the
//! next member in order, so that the calling thread receives and reduces at the same time.
//!
//! Ranges are *lent*: the queue holds raw pointers into the caller's buffers, and the caller
//! promises (see [`Sender::lend`]) not to write to or free a range before [`Sender::wait`] has
//! seen its ticket. Tickets count queued jobs; the thread counts finished ones.

use super::stall::Progress;
use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The longest one write blocks before it returns what it has sent (`SO_SNDTIMEO`): the progress
/// clock is stamped after each write, so a slow link shows progress this often, while a fast
/// one still writes each segment in one call.
const WRITE_SLICE: Duration = Duration::from_millis(200);

enum Job {
    Owned(Vec<u8>),
    Lent { ptr: *const u8, len: usize },
}

// SAFETY: a `Lent` job points into memory its owner keeps alive and unmodified until the job is
// acknowledged (the contract of `Sender::lend`); the thread only reads it.
unsafe impl Send for Job {}

#[derive(Default)]
struct State {
    /// Jobs finished (written, or skipped after a failure).
    done: u64,
    /// The first write error: its kind and its text.
    error: Option<(ErrorKind, String)>,
    /// The thread has exited (it holds no pointer any more).
    exited: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    progress: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending thread of one link and its queue.
pub(super) struct Sender {
    jobs: Option<mpsc::Sender<Job>>,
    shared: Arc<Shared>,
    queued: u64,
    thread: Option<JoinHandle<()>>,
    /// Handles on the two sockets of this member, to shut them down on failure.
    send: TcpStream,
    recv: TcpStream,
}

/// The thread exited before it finished the job waited for (it panicked); it no longer reads
/// any lent memory.
#[derive(Debug)]
pub(super) struct SenderGone;

impl Sender {
    /// Starts the thread writing to `send`. `recv` (the socket from the previous member) is only
    /// shut down, together with `send`, when a write fails, so that a receive blocked on it
    /// returns at once. Every write stamps `progress`.
    pub(super) fn spawn(
        send: TcpStream,
        recv: &TcpStream,
        name: String,
        progress: Arc<Progress>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let thread = {
            let shared = shared.clone();
            let stream = send.try_clone()?;
            let recv = recv.try_clone()?;
            std::thread::Builder::new()
                .name(name)
                .spawn(move || run(stream, recv, rx, shared, progress))?
        };
        Ok(Self {
            jobs: Some(tx),
            shared,
            queued: 0,
            thread: Some(thread),
            send,
            recv: recv.try_clone()?,
        })
    }

    fn push(&mut self, job: Job) -> u64 {
        self.queued += 1;
        if let Some(jobs) = &self.jobs {
            // A send error means the thread is gone; `wait` reports that.
            let _ = jobs.send(job);
        }
        self.queued
    }

    /// Queues bytes the queue owns. Returns the job's ticket.
    pub(super) fn send_owned(&mut self, bytes: Vec<u8>) -> u64 {
        self.push(Job::Owned(bytes))
    }

    /// Queues `len` bytes at `ptr` without copying them. Returns the job's ticket (the current
    /// one when `len` is 0).
    ///
    /// # Safety
    /// The `len` bytes at `ptr` must stay allocated, and must not be written, until
    /// [`Sender::wait`] has returned (either way) for the returned ticket or a later one.
    pub(super) unsafe fn lend(&mut self, ptr: *const u8, len: usize) -> u64 {
        if len == 0 {
            return self.queued;
        }
        self.push(Job::Lent { ptr, len })
    }

    /// The ticket of the last job queued.
    pub(super) fn queued(&self) -> u64 {
        self.queued
    }

    /// Blocks until the job with `ticket` and every earlier one are finished (written, or
    /// skipped because an earlier write failed). Either way the thread no longer reads them.
    pub(super) fn wait(&self, ticket: u64) -> Result<(), SenderGone> {
        while !self.wait_timeout(ticket, Duration::from_secs(3600))? {}
        Ok(())
    }

    /// Like [`Sender::wait`] for at most about `limit`: whether the job is finished.
    pub(super) fn wait_timeout(&self, ticket: u64, limit: Duration) -> Result<bool, SenderGone> {
        let mut state = self.shared.lock();
        if state.done < ticket && !state.exited {
            state = self
                .shared
                .progress
                .wait_timeout_while(state, limit, |s| s.done < ticket && !s.exited)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if state.done >= ticket {
            Ok(true)
        } else if state.exited {
            Err(SenderGone)
        } else {
            Ok(false)
        }
    }

    /// The first write error (its kind and its text), if a write failed.
    pub(super) fn error(&self) -> Option<(ErrorKind, String)> {
        self.shared.lock().error.clone()
    }

    /// Shuts both sockets down: a blocked write or read on them returns with an error, and the
    /// peers see the connection closed.
    pub(super) fn shutdown(&self) {
        let _ = self.send.shutdown(Shutdown::Both);
        let _ = self.recv.shutdown(Shutdown::Both);
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.shutdown();
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `write_all`, stamping `progress` whenever bytes went out: the socket's send timeout
/// ([`WRITE_SLICE`]) makes a blocked write return what it has sent, or nothing (then it is
/// retried without a stamp).
fn write_all(stream: &mut TcpStream, mut bytes: &[u8], progress: &Progress) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes = &bytes[n..];
                progress.touch();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn run(
    mut stream: TcpStream,
    recv: TcpStream,
    jobs: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    progress: Arc<Progress>,
) {
    struct Exit(Arc<Shared>);
    impl Drop for Exit {
        fn drop(&mut self) {
            self.0.lock().exited = true;
            self.0.progress.notify_all();
        }
    }
    let _exit = Exit(shared.clone());

    // Without the timeout a slow link would stamp no progress until a whole segment is out.
    let mut failed = false;
    if let Err(e) = stream.set_write_timeout(Some(WRITE_SLICE)) {
        failed = true;
        shared.lock().error = Some((e.kind(), format!("cannot set the send timeout: {e}")));
    }
    while let Ok(job) = jobs.recv() {
        if !failed {
            let written = match &job {
                Job::Owned(bytes) => write_all(&mut stream, bytes, &progress),
                // SAFETY: the contract of `Sender::lend`: the range stays valid and unwritten
                // until this job is acknowledged below.
                Job::Lent { ptr, len } => {
                    let bytes = unsafe { std::slice::from_raw_parts(*ptr, *len) };
                    write_all(&mut stream, bytes, &progress)
                }
            };
            if let Err(e) = written {
                failed = true;
                shared.lock().error = Some((e.kind(), e.to_string()));
                let _ = stream.shutdown(Shutdown::Both);
                let _ = recv.shutdown(Shutdown::Both);
            }
        }
        drop(job);
        shared.lock().done += 1;
        shared.progress.notify_all();
    }
}
