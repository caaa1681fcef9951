//! Preemption on the launcher's side: the checkpoint signal (`--checkpoint-signal`, default
//! SIGUSR1) and a first SIGTERM ask the whole job, through the control plane, to save one
//! checkpoint at the next step boundary (the workers agree on the step; see
//! `coca_common::preempt`). Workers that saved their part exit with
//! [`EXIT_PREEMPTED`]: not a failure. When every node's workers have, the job ends and each
//! launcher says `preempted at step N, checkpoint DIR` and exits with the same code.
//!
//! A SIGTERM (SLURM's at a time limit or preemption) gives the job `--term-timeout` seconds to
//! get there; past that, or at a SIGINT or SIGHUP, the workers are stopped as before.

use coca_common::control::ControlClient;
use coca_common::preempt::{decision_key, request_key, signal_name, Decision, EXIT_PREEMPTED};
use std::time::{Duration, Instant};

/// How long a launcher whose workers all stopped preempted waits for the decision they acted
/// on (it is in the store before any of them could stop, so this is one round trip).
const DECISION_WAIT: Duration = Duration::from_secs(10);

/// One generation's preemption state on this node.
pub struct Preemption {
    generation: u64,
    node_rank: usize,
    term_timeout: Duration,
    /// When this launcher asked (once is enough: the request is the job's).
    requested: Option<Instant>,
    /// When a SIGTERM's checkpoint is overdue.
    term_deadline: Option<Instant>,
    /// Workers of this node that stopped with [`EXIT_PREEMPTED`].
    preempted_ranks: usize,
    /// The step and checkpoint the workers agreed on, once read.
    decision: Option<Decision>,
}

impl Preemption {
    /// Nothing asked yet, for `generation` of the job.
    pub fn new(generation: u64, node_rank: usize, term_timeout: Duration) -> Self {
        Self {
            generation,
            node_rank,
            term_timeout,
            requested: None,
            term_deadline: None,
            preempted_ranks: 0,
            decision: None,
        }
    }

    /// `signal` reached this launcher: asks every rank of the job for the checkpoint.
    pub fn request(&mut self, client: &ControlClient, signal: libc::c_int) {
        let name = signal_name(signal);
        tracing::warn!(
            "received {name}: every rank saves one checkpoint at the next step boundary, then \
             the job stops (exit code {EXIT_PREEMPTED})"
        );
        if self.requested.is_some() {
            return;
        }
        self.requested = Some(Instant::now());
        let reason = format!("{name} to the launcher of node {}", self.node_rank);
        if let Err(e) = client.set(&request_key(self.generation), reason.as_bytes()) {
            tracing::error!("cannot ask the job for a checkpoint: {e:#}");
        }
    }

    /// A SIGTERM while workers run: `true` when it is taken as a checkpoint request (with a
    /// `--term-timeout`; repeats change nothing, since SLURM may deliver it twice: to every
    /// process of the step and through srun), `false` when the workers must be stopped now.
    pub fn on_sigterm(&mut self, client: &ControlClient) -> bool {
        if self.term_timeout.is_zero() {
            return false;
        }
        if self.term_deadline.is_none() {
            self.term_deadline = Some(Instant::now() + self.term_timeout);
            self.request(client, libc::SIGTERM);
            tracing::warn!(
                "workers still running in {} s are stopped (SIGINT stops them now)",
                self.term_timeout.as_secs()
            );
        }
        true
    }

    /// Whether a SIGTERM's checkpoint is overdue while `running` workers are left.
    pub fn term_overdue(&self, running: bool) -> bool {
        running && self.term_deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Why the workers are stopped when [`Self::term_overdue`].
    pub fn overdue_cause(&self) -> String {
        format!(
            "the launcher of node {} received SIGTERM and the job took no checkpoint within \
             --term-timeout {} s",
            self.node_rank,
            self.term_timeout.as_secs()
        )
    }

    /// A worker of this node stopped with [`EXIT_PREEMPTED`].
    pub fn rank_preempted(&mut self, rank: usize) {
        tracing::info!("rank {rank} saved its part of the checkpoint and stopped (preempted)");
        self.preempted_ranks += 1;
    }

    /// Whether this node's workers stopped for the checkpoint.
    pub fn preempted(&self) -> bool {
        self.preempted_ranks > 0
    }

    /// Before reporting done: reads the step and checkpoint the workers agreed on (for the
    /// summary; a failure to read it is logged, not fatal).
    pub fn read_decision(&mut self, client: &ControlClient) {
        if !self.preempted() || self.decision.is_some() {
            return;
        }
        match client
            .get(&decision_key(self.generation), DECISION_WAIT)
            .and_then(|v| Decision::decode(&v))
        {
            Ok(d) => self.decision = Some(d),
            Err(e) => tracing::warn!("cannot read the job's checkpoint step: {e:#}"),
        }
    }

    /// The launcher's last line once every node's workers stopped for the checkpoint.
    pub fn summary(&self) -> String {
        let after = self.requested.map_or_else(String::new, |t| {
            format!(", {:.1} s after the signal", t.elapsed().as_secs_f64())
        });
        match &self.decision {
            Some(d) => format!(
                "coca-launch: preempted at step {}, checkpoint {} (exit code {EXIT_PREEMPTED}{after}; \
                 the next run resumes from it with --resume_from_checkpoint True)",
                d.step, d.checkpoint
            ),
            None => format!(
                "coca-launch: preempted: every rank saved its part of the checkpoint (exit code \
                 {EXIT_PREEMPTED}{after})"
            ),
        }
    }
}
