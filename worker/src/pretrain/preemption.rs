//! A rank's side of preemption (the protocol is [`coca_common::preempt`]): the checkpoint signal
//! (`--checkpoint-signal`, default SIGUSR1), or a SIGTERM that did not come from this worker's
//! launcher, asks the whole job to save one checkpoint at the next step boundary and stop. The
//! training loop asks [`Preemption::at_boundary`] after every step: one uncontended lock, nothing
//! over the network.
//!
//! Three parties share one lock:
//! - the signal thread: a signal sets the job's request key (or, alone, decides at once);
//! - the agreement thread: one blocking `get` of the request key; when it returns, it reads this
//!   rank's completed steps *under the lock*, announces them, and (rank 0) turns every
//!   announcement into the decision `max + 1`, which every rank reads;
//! - the training loop, which records each boundary under the lock.
//!
//! No rank passes the agreed step: a rank that had not announced when it reached boundary `b`
//! announces at least `b`, so the decision is after `b`; a rank that announced `c` waits at its
//! next boundary (`c + 1`, at most the decision) until the decision is there. That wait is short:
//! every rank announces from its agreement thread, whatever its training thread is doing.
//!
//! A SIGTERM from the launcher (it stops its workers that way) ends the process at once, as
//! SIGTERM always did; repeated signals change nothing (SLURM may deliver one twice).

use crate::distributed::context::{env_world_rank, RankContext};
use anyhow::{bail, Context, Result};
use coca_common::control::ControlClient;
use coca_common::preempt::{
    announce_key, checkpoint_signal_from_env, decision_key, request_key, signal_name, Decision,
};
use signal_hook::iterator::exfiltrator::origin::WithOrigin;
use signal_hook::iterator::SignalsInfo;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long the agreement may take: rank 0 waiting for every announcement, and a rank waiting
/// at a step boundary for the decision. Every rank announces within milliseconds of the request
/// unless it is still starting (loading weights), and a failure anywhere ends the waits at once.
const AGREEMENT_TIMEOUT: Duration = Duration::from_secs(600);

/// A `get` of the request key that lasts as long as the job (it ends with the job's end, a
/// restart or the loss of the control plane).
const WAIT_FOR_REQUEST: Duration = Duration::from_secs(365 * 24 * 3600);

/// Listens for the checkpoint signal and SIGTERM for the whole run; see the module's doc.
pub struct Preemption {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// This rank, for messages (`RANK`, 0 alone).
    rank: usize,
}

#[derive(Default)]
struct State {
    /// Steps this rank has completed (its last boundary).
    completed: u64,
    /// Set by [`Preemption::attach`]: the job's side, once the run is ready.
    job: Option<Job>,
    /// A signal that came before `attach`.
    pending: Option<String>,
    /// This rank asked the control plane already (its signal thread or `attach`).
    requested: bool,
    /// The completed steps this rank announced.
    announced: Option<u64>,
    decision: Option<Decision>,
    /// Why the agreement failed.
    failed: Option<String>,
}

#[derive(Clone)]
struct Job {
    /// `None`: a job of one, which decides alone.
    control: Option<Arc<ControlClient>>,
    generation: u64,
    output_dir: PathBuf,
}

impl Job {
    fn decision(&self, step: u64) -> Decision {
        let dir = super::checkpoint::checkpoint_dir(&self.output_dir, step);
        Decision {
            step,
            checkpoint: std::path::absolute(&dir)
                .unwrap_or(dir)
                .display()
                .to_string(),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Preemption {
    /// Installs the handlers (before anything slow, so an early signal is not fatal) and starts
    /// the signal thread. The checkpoint signal is the launcher's `COCA_CHECKPOINT_SIGNAL`, or
    /// SIGUSR1 alone.
    pub fn listen() -> Result<Preemption> {
        let checkpoint_signal = checkpoint_signal_from_env()?;
        let (_, rank) = env_world_rank()?;
        // Started by coca-launch: its SIGTERM means "stop now".
        let launcher = std::env::var_os("COCA_CONTROL_ADDR")
            .is_some()
            // SAFETY: getppid(2) has no preconditions.
            .then(|| unsafe { libc::getppid() });
        let mut handled = vec![libc::SIGTERM];
        handled.extend(checkpoint_signal);
        let signals = SignalsInfo::<WithOrigin>::new(&handled)
            .context("cannot install the checkpoint signal's handler")?;
        let preemption = Self::new(rank);
        let listener = preemption.shared.clone();
        std::thread::Builder::new()
            .name("preemption-signals".into())
            .spawn(move || listen(listener, signals, launcher))
            .context("cannot start the preemption signal thread")?;
        Ok(preemption)
    }

    /// No signal handled: [`Preemption::ask`] alone makes requests (tests of the agreement).
    fn new(rank: usize) -> Preemption {
        Preemption {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                rank,
            }),
        }
    }

    /// Joins the job once the run is ready to take steps (`completed` of them done): from now on
    /// a request is acted on. Starts the agreement thread in a launched job.
    pub fn attach(&self, ctx: &RankContext, output_dir: &Path, completed: u64) -> Result<()> {
        self.join(
            ctx.control.clone(),
            ctx.generation,
            ctx.topology.world,
            output_dir,
            completed,
        )
    }

    /// [`Preemption::attach`] from its parts: `control` is `None` for a job of one.
    fn join(
        &self,
        control: Option<Arc<ControlClient>>,
        generation: u64,
        world: usize,
        output_dir: &Path,
        completed: u64,
    ) -> Result<()> {
        let job = Job {
            control,
            generation,
            output_dir: output_dir.to_path_buf(),
        };
        let pending = {
            let mut st = self.shared.lock();
            st.completed = completed;
            st.job = Some(job.clone());
            st.pending.take()
        };
        if let Some(reason) = pending {
            request(&self.shared, reason);
        }
        if let Some(control) = job.control.clone() {
            let shared = self.shared.clone();
            std::thread::Builder::new()
                .name("preemption-agreement".into())
                .spawn(move || agree(&shared, &control, &job, world))
                .context("cannot start the preemption agreement thread")?;
        }
        Ok(())
    }

    /// At the end of the run: says goodbye to the control plane for the agreement thread, which
    /// holds the client in its `get` for as long as the job lasts (the client's own drop would
    /// say it, but the thread's hold keeps it from being dropped). Without a goodbye, a worker
    /// that exits while others still run would count as lost.
    pub fn detach(&self) {
        let control = self
            .shared
            .lock()
            .job
            .as_ref()
            .and_then(|j| j.control.clone());
        if let Some(control) = control {
            control.goodbye();
        }
    }

    /// Asks the job for a checkpoint, as a signal does.
    #[cfg(test)]
    fn ask(&self, reason: String) {
        request(&self.shared, reason);
    }

    /// After every step (`completed` steps done, fewer than the run's total): the decision when
    /// the job checkpoints here and stops. Waits only when this rank announced and the decision
    /// is not there yet (bounded; see the module's doc).
    pub fn at_boundary(&self, completed: u64) -> Result<Option<Decision>> {
        let shared = &self.shared;
        let mut st = shared.lock();
        st.completed = completed;
        let deadline = Instant::now() + AGREEMENT_TIMEOUT;
        loop {
            if let Some(e) = &st.failed {
                bail!("rank {}: agreeing on the checkpoint step: {e}", shared.rank);
            }
            if let Some(d) = &st.decision {
                if d.step < completed {
                    bail!(
                        "rank {}: the job agreed to checkpoint after step {}, but this rank is \
                         already at step {completed}",
                        shared.rank,
                        d.step
                    );
                }
                return Ok((d.step == completed).then(|| d.clone()));
            }
            if st.announced.is_none() {
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "rank {}: no checkpoint step was agreed within {} s of the request",
                    shared.rank,
                    AGREEMENT_TIMEOUT.as_secs()
                );
            }
            st = shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The signal thread: each signal is a request, except a SIGTERM from the launcher, which ends
/// the process as SIGTERM's default action does.
fn listen(shared: Arc<Shared>, mut signals: SignalsInfo<WithOrigin>, launcher: Option<i32>) {
    for origin in signals.forever() {
        let from = origin.process.map(|p| p.pid);
        let name = signal_name(origin.signal);
        if origin.signal == libc::SIGTERM && launcher.is_some() && from == launcher {
            let _ = signal_hook::low_level::emulate_default_handler(libc::SIGTERM);
            std::process::exit(128 + libc::SIGTERM);
        }
        let from = from.map_or_else(String::new, |pid| format!(" from pid {pid}"));
        let reason = format!("{name} to rank {}{from}", shared.rank);
        eprintln!(
            "rank {}: received {name}{from}: the job saves a checkpoint at the next step boundary \
             and stops",
            shared.rank
        );
        request(&shared, reason);
    }
}

/// Asks the job for a checkpoint: through the control plane, or alone at the next boundary; kept
/// for `attach` when the run is not ready yet.
fn request(shared: &Shared, reason: String) {
    let control = {
        let mut st = shared.lock();
        let Some(job) = st.job.clone() else {
            st.pending.get_or_insert(reason);
            return;
        };
        if std::mem::replace(&mut st.requested, true) {
            return;
        }
        match &job.control {
            Some(control) => (control.clone(), job.generation),
            None => {
                if st.decision.is_none() {
                    st.announced = Some(st.completed);
                    st.decision = Some(job.decision(st.completed + 1));
                    shared.changed.notify_all();
                }
                return;
            }
        }
    };
    let (control, generation) = control;
    if let Err(e) = control.set(&request_key(generation), reason.as_bytes()) {
        tracing::warn!(
            "rank {}: cannot ask the job for a checkpoint: {e:#}",
            shared.rank
        );
    }
}

/// The agreement thread of a launched rank (see the module's doc).
fn agree(shared: &Shared, control: &ControlClient, job: &Job, world: usize) {
    let g = job.generation;
    // Ends with the job (finished, aborted, restarted): then no checkpoint was asked for.
    let Ok(reason) = control.get(&request_key(g), WAIT_FOR_REQUEST) else {
        return;
    };
    let completed = {
        let mut st = shared.lock();
        st.announced = Some(st.completed);
        st.completed
    };
    eprintln!(
        "rank {}: checkpoint requested ({}) after step {completed}",
        shared.rank,
        String::from_utf8_lossy(&reason)
    );
    let rank = shared.rank;
    let decided = (|| -> Result<Decision> {
        control.set(&announce_key(g, rank), completed.to_string().as_bytes())?;
        if rank == 0 {
            let mut latest = 0u64;
            for r in 0..world {
                let v = control.get(&announce_key(g, r), AGREEMENT_TIMEOUT)?;
                let text = String::from_utf8_lossy(&v);
                let steps: u64 = text
                    .parse()
                    .with_context(|| format!("rank {r} announced {text:?}, not a step"))?;
                latest = latest.max(steps);
            }
            control.set(&decision_key(g), &job.decision(latest + 1).encode())?;
        }
        Decision::decode(&control.get(&decision_key(g), AGREEMENT_TIMEOUT)?)
    })();
    let mut st = shared.lock();
    match decided {
        Ok(d) => {
            eprintln!(
                "rank {rank}: the job checkpoints after step {} into {}",
                d.step, d.checkpoint
            );
            st.decision = Some(d);
        }
        Err(e) => st.failed = Some(format!("{e:#}")),
    }
    shared.changed.notify_all();
}

#[cfg(test)]
#[path = "preemption_tests.rs"]
mod tests;
