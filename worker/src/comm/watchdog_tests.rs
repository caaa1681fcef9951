//! The abort path with a communicator that blocks like NCCL does: it spins until aborted.

use super::*;
use crate::comm::peer_failure::{exit_code, EXIT_COLLECTIVE_TIMEOUT, EXIT_PEER_FAILED};
use coca_common::collective::SingleProcess;
use std::sync::mpsc;

/// Blocks in every operation until released or aborted.
struct Spinning {
    blocks: bool,
    aborted: AtomicBool,
    calls: Mutex<usize>,
    transport: Arc<dyn Collective>,
}

impl Spinning {
    fn new(blocks: bool) -> Arc<Self> {
        Arc::new(Self {
            blocks,
            aborted: AtomicBool::new(false),
            calls: Mutex::new(0),
            transport: Arc::new(SingleProcess),
        })
    }

    fn spin(&self) -> Result<()> {
        *lock(&self.calls) += 1;
        while self.blocks && !self.aborted.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.aborted.load(Ordering::SeqCst) {
            anyhow::bail!("NCCL: remote process exited or there was a network error (aborted)");
        }
        Ok(())
    }
}

impl Abort for Spinning {
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }
}

impl Communicator for Spinning {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        2
    }
    fn all_reduce(&self, _: &mut FlatBuffer, _: ReduceOp) -> Result<()> {
        self.spin()
    }
    fn all_gather(&self, input: &FlatBuffer) -> Result<FlatBuffer> {
        self.spin().map(|_| input.clone())
    }
    fn reduce_scatter(&self, input: &FlatBuffer, _: ReduceOp) -> Result<FlatBuffer> {
        self.spin().map(|_| input.clone())
    }
    fn broadcast(&self, _: &mut FlatBuffer, _: usize) -> Result<()> {
        self.spin()
    }
    fn barrier(&self) -> Result<()> {
        self.spin()
    }
    fn transport(&self) -> &Arc<dyn Collective> {
        &self.transport
    }
}

/// A failure signal fed by a channel, as the control plane's events feed the real one.
fn signal() -> (mpsc::Sender<String>, FailureSignal) {
    let (tx, rx) = mpsc::channel::<String>();
    (tx, Box::new(move |tick| rx.recv_timeout(tick).ok()))
}

const TICK: Duration = Duration::from_millis(5);

#[test]
fn operations_pass_through_while_nothing_fails() {
    let (_tx, failures) = signal();
    let dog = Watchdog::start(Duration::from_secs(60), TICK, failures).unwrap();
    let comm = dog.watch("data", Spinning::new(false));
    let mut buf = FlatBuffer::Host(vec![1.0; 4]);
    comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
    comm.broadcast(&mut buf, 0).unwrap();
    comm.barrier().unwrap();
    assert_eq!(comm.all_gather(&buf).unwrap().len(), 4);
    assert_eq!(comm.size(), 2);
}

#[test]
fn a_peer_failure_releases_a_blocked_collective_with_the_peer_failed_code() {
    let (tx, failures) = signal();
    let dog = Watchdog::start(Duration::from_secs(60), TICK, failures).unwrap();
    let inner = Spinning::new(true);
    let comm = dog.watch("data", inner.clone());
    let other = dog.watch("tensor", Spinning::new(true));
    let blocked = std::thread::spawn(move || {
        let mut buf = FlatBuffer::Host(vec![1.0; 4]);
        let started = Instant::now();
        (comm.all_reduce(&mut buf, ReduceOp::Sum), started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !blocked.is_finished(),
        "the double must block until aborted"
    );
    tx.send("rank 3 exited with status 1".into()).unwrap();
    let (out, took) = blocked.join().unwrap();
    let e = out.unwrap_err();
    assert_eq!(exit_code(&e), Some(EXIT_PEER_FAILED), "{e:#}");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("data group's all_reduce") && msg.contains("rank 3"),
        "{msg}"
    );
    assert!(took < Duration::from_secs(5), "released after {took:?}");
    // Every watched communicator was aborted, and later operations fail without blocking.
    let calls = *lock(&inner.calls);
    assert_eq!(
        exit_code(&other.barrier().unwrap_err()),
        Some(EXIT_PEER_FAILED)
    );
    assert_eq!(*lock(&inner.calls), calls);
}

#[test]
fn a_collective_outlasting_the_timeout_is_aborted_naming_group_and_operation() {
    let (_tx, failures) = signal();
    let dog = Watchdog::start(Duration::from_millis(100), TICK, failures).unwrap();
    let comm = dog.watch("sharding", Spinning::new(true));
    let started = Instant::now();
    let e = comm
        .reduce_scatter(&FlatBuffer::Host(vec![0.0; 4]), ReduceOp::Avg)
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(exit_code(&e), Some(EXIT_COLLECTIVE_TIMEOUT), "{e:#}");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("sharding group's reduce_scatter") && msg.contains("--collective-timeout"),
        "{msg}"
    );
}

#[test]
fn a_closed_failure_signal_does_not_spin_or_abort() {
    let (tx, failures) = signal();
    drop(tx);
    let dog = Watchdog::start(Duration::from_secs(60), TICK, failures).unwrap();
    let comm = dog.watch("world", Spinning::new(false));
    std::thread::sleep(Duration::from_millis(30));
    comm.barrier().unwrap();
}
