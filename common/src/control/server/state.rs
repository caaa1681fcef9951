//! The job as the server sees it: nodes joined, the plan, the key-value store, barriers,
//! clients and their event queues, and every decision taken on them (rendezvous, failures,
//! restarts, the end of the job).

use super::*;
use crate::control::protocol::{
    fmt_secs, Event, ExitKind, FailureReport, Identity, NodeInfo, Plan, Request, Response,
};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};
use tracing::{error, info, warn};

/// Everything the server's tasks share.
pub(super) struct Shared {
    pub(super) config: ServerConfig,
    pub(super) local_addr: SocketAddr,
    pub(super) state: Mutex<State>,
    /// Bumped after every change of `state`; blocking requests wait on it.
    pub(super) changed: watch::Sender<u64>,
    pub(super) next_id: AtomicU64,
    /// Set by shutdown: connections ending now are not failures.
    pub(super) closing: AtomicBool,
    /// The event writers, awaited (briefly) at shutdown so queued events get out.
    pub(super) writers: Mutex<Vec<JoinHandle<()>>>,
    pub(super) admission: Arc<super::admission::Admission>,
}

/// The job as the server sees it.
#[derive(Default)]
pub(super) struct State {
    pub(super) generation: u64,
    pub(super) restarts: u32,
    /// Nodes that joined the current generation's rendezvous, by node rank.
    pub(super) joined: BTreeMap<usize, Joined>,
    /// When the current rendezvous round (started by its first node) times out.
    pub(super) rdzv_deadline: Option<Instant>,
    /// Rounds abandoned so far, and why the last one was: its waiters all get that message.
    pub(super) rdzv_round: u64,
    pub(super) rdzv_failure: String,
    /// The current generation's plan, once every node joined.
    pub(super) plan: Option<Plan>,
    /// Nodes that reported done in the current generation.
    pub(super) done: BTreeMap<usize, ()>,
    /// Abort or Finished, once the job ended; later clients get it on connect.
    pub(super) terminal: Option<Event>,
    pub(super) kv: HashMap<String, Vec<u8>>,
    pub(super) barriers: HashMap<String, Barrier>,
    pub(super) clients: HashMap<u64, Client>,
}

pub(super) struct Joined {
    pub(super) client: u64,
    pub(super) info: NodeInfo,
}

pub(super) struct Barrier {
    pub(super) participants: usize,
    pub(super) arrived: usize,
    /// Completed rounds: a waiter of round `r` is released when this exceeds `r`.
    pub(super) round: u64,
}

pub(super) struct Client {
    pub(super) identity: Identity,
    pub(super) remote: SocketAddr,
    /// Events to push; `None` once shutdown closed the queue.
    pub(super) events: Option<mpsc::UnboundedSender<Event>>,
    /// A node that joined a rendezvous: losing it is a failure of the job.
    pub(super) registered: bool,
    /// When its last heartbeat (or its hello) arrived.
    pub(super) last_heard: Instant,
}

/// How a client's session ended.
pub(super) enum SessionEnd {
    /// Graceful goodbye: not a failure.
    Goodbye,
    /// No heartbeat for the heartbeat timeout.
    Silent,
    /// The connection ended otherwise; `timed_out` when QUIC's idle timeout ended it.
    Lost { cause: String, timed_out: bool },
    /// We closed it (shutdown).
    Local,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Waits until `check` returns `Some` (re-checked after every state change) or `deadline`.
    pub(super) async fn wait_for<T>(
        &self,
        deadline: Instant,
        mut check: impl FnMut(&mut State) -> Option<T>,
    ) -> Option<T> {
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if let Some(v) = check(&mut self.lock()) {
                return Some(v);
            }
            match timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    pub(super) fn broadcast(st: &mut State, event: &Event) {
        for client in st.clients.values() {
            if let Some(tx) = &client.events {
                let _ = tx.send(event.clone());
            }
        }
    }

    /// The failure policy: the first failure of the current generation restarts the job (while
    /// restarts are left) or aborts it; anything later or older is collateral.
    pub(super) fn on_failure(
        &self,
        st: &mut State,
        report: FailureReport,
    ) -> std::result::Result<(), String> {
        if let Some(terminal) = &st.terminal {
            let ended = match terminal {
                Event::Finished => "finished",
                _ => "was aborted",
            };
            info!("after the job {ended}, ignoring: {report}");
            return Ok(());
        }
        if report.generation > st.generation {
            return Err(format!(
                "failure report for generation {}, but the job is at generation {}",
                report.generation, st.generation
            ));
        }
        if report.generation < st.generation {
            info!(
                "collateral failure of generation {} (already handled): {report}",
                report.generation
            );
            return Ok(());
        }
        let max = self.config.max_restarts;
        // A launcher stopped by a signal (no rank) was told to stop — by a person or the
        // scheduler: the job ends instead of restarting without that node.
        let stopped = report.rank.is_none() && matches!(report.exit, ExitKind::Signal(_));
        // Elastic: a restart needs at least --nnodes MIN nodes left.
        let too_few = (st.restarts < max && !stopped)
            .then(|| self.too_few_nodes(st, Self::lost_node(&report)))
            .flatten();
        if st.restarts < max && !stopped && too_few.is_none() {
            st.restarts += 1;
            let generation = st.generation + 1;
            warn!(
                "{report}; restarting the job as generation {generation} (restart {} of {max})",
                st.restarts
            );
            st.generation = generation;
            st.joined.clear();
            st.rdzv_deadline = None;
            st.plan = None;
            st.done.clear();
            st.kv.clear();
            st.barriers.clear();
            let event = Event::Restart {
                generation,
                failure: report,
            };
            Self::broadcast(st, &event);
        } else {
            let reason = if let Some(few) = too_few {
                format!("{report} ({few}: no restart)")
            } else if max == 0 || stopped {
                report.to_string()
            } else {
                format!("{report} (all {max} restarts used)")
            };
            error!("aborting the job: {reason}");
            let event = Event::Abort {
                reason,
                failure: Some(report),
            };
            Self::broadcast(st, &event);
            st.terminal = Some(event);
        }
        self.bump();
        Ok(())
    }

    pub(super) fn aborted(st: &State) -> Option<String> {
        match &st.terminal {
            Some(Event::Abort { reason, .. }) => Some(format!("the job was aborted: {reason}")),
            Some(Event::Finished) => Some("the job already finished".into()),
            _ => None,
        }
    }

    pub(super) async fn process(&self, id: u64, request: Request) -> Response {
        let identity = match self.lock().clients.get(&id) {
            Some(c) => c.identity.clone(),
            None => return Response::Error("this session has ended".into()),
        };
        let result = match request {
            Request::Rendezvous { timeout_ms } => self
                .rendezvous(id, &identity, Duration::from_millis(timeout_ms))
                .await
                .map(Response::Plan)
                .inspect_err(|e| warn!("rendezvous of {identity}: {e}")),
            Request::ReportFailure(report) => {
                let mut st = self.lock();
                self.on_failure(&mut st, report).map(|()| Response::Ok)
            }
            Request::ReportDone => self.report_done(id, &identity).map(|()| Response::Ok),
            Request::Set { key, value } => {
                let mut st = self.lock();
                match stale_worker(&st, &identity) {
                    Some(e) => Err(e),
                    None => {
                        st.kv.insert(key, value);
                        drop(st);
                        self.bump();
                        Ok(Response::Ok)
                    }
                }
            }
            Request::Get { key, timeout_ms } => self
                .get(&identity, key, Duration::from_millis(timeout_ms))
                .await
                .map(Response::Value),
            Request::Barrier {
                name,
                participants,
                timeout_ms,
            } => self
                .barrier(
                    &identity,
                    name,
                    participants,
                    Duration::from_millis(timeout_ms),
                )
                .await
                .map(|()| Response::Ok),
        };
        result.unwrap_or_else(Response::Error)
    }

    pub(super) async fn rendezvous(
        &self,
        id: u64,
        identity: &Identity,
        wait: Duration,
    ) -> std::result::Result<Plan, String> {
        let Identity::Node {
            node_rank,
            nproc,
            host,
        } = identity.clone()
        else {
            return Err(format!(
                "rendezvous is for node launchers, not for {identity}"
            ));
        };
        let nnodes = self.config.nnodes;
        let rdzv_timeout = self.config.rdzv_timeout.min(MAX_WAIT);
        let wait = wait.min(rdzv_timeout);
        let own_deadline = deadline_after(wait);
        if node_rank < nnodes && Self::outside_plan(&self.lock(), node_rank) {
            // Elastic: the running generation started without this node; it joins the next.
            self.wait_for_next_generation(node_rank, own_deadline)
                .await?;
        }
        let (generation, round, round_deadline) = {
            let mut st = self.lock();
            if let Some(e) = Self::aborted(&st) {
                return Err(e);
            }
            let generation = st.generation;
            if node_rank >= nnodes {
                return Err(format!(
                    "node_rank {node_rank} is out of range: this job has {nnodes} node(s), \
                     ranks 0..{nnodes}"
                ));
            }
            if nproc == 0 {
                return Err(format!("node {node_rank} announced nproc 0"));
            }
            match st.joined.get(&node_rank) {
                Some(j) if j.client == id => {
                    if let Some(plan) = &st.plan {
                        return Ok(plan.clone()); // asked again: same answer
                    }
                }
                Some(j) => {
                    let other = st
                        .clients
                        .get(&j.client)
                        .map(|c| c.remote.to_string())
                        .unwrap_or_else(|| "a closed connection".into());
                    return Err(format!(
                        "duplicate node_rank {node_rank} in generation {generation}: \
                         node {node_rank} already joined from {other}"
                    ));
                }
                None => {}
            }
            if let Some(other) = st.joined.values().find(|j| j.info.nproc != nproc) {
                return Err(format!(
                    "node {node_rank} runs nproc {nproc}, but node {} joined with nproc {}: \
                     every node must run the same number of workers",
                    other.info.node_rank, other.info.nproc
                ));
            }
            if st.joined.is_empty() {
                // The first node of a round starts the round's clock.
                st.rdzv_deadline = Some(deadline_after(rdzv_timeout));
            }
            st.joined.insert(
                node_rank,
                Joined {
                    client: id,
                    info: NodeInfo {
                        node_rank,
                        nproc,
                        host,
                    },
                },
            );
            if let Some(c) = st.clients.get_mut(&id) {
                c.registered = true;
            }
            info!(
                "node {node_rank} joined the rendezvous of generation {generation} ({} of {nnodes})",
                st.joined.len()
            );
            if self.try_complete(&mut st, false) {
                let plan = st.plan.clone();
                drop(st);
                self.bump();
                return plan.ok_or_else(|| "internal error: no plan".to_string());
            }
            let round_deadline = st.rdzv_deadline.unwrap_or(own_deadline);
            (generation, st.rdzv_round, round_deadline)
        };
        let check = |st: &mut State| -> Option<std::result::Result<Plan, String>> {
            if let Some(e) = Self::aborted(st) {
                return Some(Err(e));
            }
            if st.generation != generation {
                return Some(Err(format!(
                    "the rendezvous of generation {generation} was superseded: the job restarted \
                     as generation {}",
                    st.generation
                )));
            }
            if st.rdzv_round != round {
                return Some(Err(st.rdzv_failure.clone()));
            }
            // Elastic: a node that left may be what the round waited for.
            if st.plan.is_none() && self.try_complete(st, false) {
                self.bump();
            }
            if let Some(plan) = &st.plan {
                return Some(Ok(plan.clone()));
            }
            if generation > 0 {
                if let Some(few) = self.too_few_nodes(st, None) {
                    return Some(Err(format!(
                        "the rendezvous of generation {generation} cannot start: {few}"
                    )));
                }
            }
            None
        };
        let deadline = own_deadline.min(round_deadline);
        if let Some(result) = self.wait_for(deadline, check).await {
            return result;
        }
        let mut st = self.lock();
        if let Some(result) = check(&mut st) {
            return result;
        }
        let listing = |st: &State| {
            let missing: Vec<String> = (0..nnodes)
                .filter(|r| !st.joined.contains_key(r))
                .map(|r| format!("node {r}"))
                .collect();
            let present: Vec<String> = st.joined.keys().map(|r| format!("node {r}")).collect();
            format!(
                "{} never joined (joined: {})",
                missing.join(", "),
                present.join(", ")
            )
        };
        if Instant::now() >= round_deadline && self.try_complete(&mut st, true) {
            // Elastic: the round's time is up with enough nodes: start with them.
            let plan = st.plan.clone();
            drop(st);
            self.bump();
            return plan.ok_or_else(|| "internal error: no plan".to_string());
        }
        if Instant::now() >= round_deadline {
            // The round's time is up: abandon it for every waiter, with one message.
            let message = format!(
                "rendezvous timed out after {}: {}",
                fmt_secs(rdzv_timeout),
                listing(&st)
            );
            st.joined.clear();
            st.rdzv_deadline = None;
            st.rdzv_round += 1;
            st.rdzv_failure = message.clone();
            drop(st);
            self.bump();
            return Err(message);
        }
        // This caller's own (shorter) timeout: withdraw it alone, so that it may try again.
        let message = format!(
            "rendezvous timed out after {}: {}",
            fmt_secs(wait),
            listing(&st)
        );
        if st.joined.get(&node_rank).is_some_and(|j| j.client == id) {
            st.joined.remove(&node_rank);
            if st.joined.is_empty() {
                st.rdzv_deadline = None;
            }
        }
        drop(st);
        self.bump();
        Err(message)
    }

    pub(super) fn report_done(
        &self,
        id: u64,
        identity: &Identity,
    ) -> std::result::Result<(), String> {
        let Identity::Node { node_rank, .. } = identity else {
            return Err(format!(
                "report_done is for node launchers, not for {identity}"
            ));
        };
        let mut st = self.lock();
        if let Some(e) = Self::aborted(&st) {
            return Err(e);
        }
        let joined = st.joined.get(node_rank).is_some_and(|j| j.client == id);
        if st.plan.is_none() || !joined {
            return Err(format!(
                "node {node_rank} reported done, but it has no completed rendezvous in \
                 generation {}",
                st.generation
            ));
        }
        st.done.insert(*node_rank, ());
        let nodes = st
            .plan
            .as_ref()
            .map_or(self.config.nnodes, |p| p.nodes.len());
        info!("node {node_rank} done ({} of {nodes})", st.done.len());
        if st.done.len() == nodes {
            info!("every node is done: the job finished");
            Self::broadcast(&mut st, &Event::Finished);
            st.terminal = Some(Event::Finished);
            drop(st);
            self.bump();
        }
        Ok(())
    }

    pub(super) async fn get(
        &self,
        identity: &Identity,
        key: String,
        wait: Duration,
    ) -> std::result::Result<Vec<u8>, String> {
        let wait = wait.min(MAX_WAIT);
        let generation = {
            let st = self.lock();
            if let Some(e) = stale_worker(&st, identity) {
                return Err(e);
            }
            st.generation
        };
        let check = |st: &mut State| -> Option<std::result::Result<Vec<u8>, String>> {
            if let Some(e) = Self::aborted(st) {
                return Some(Err(e));
            }
            if st.generation != generation {
                return Some(Err(format!(
                    "get of key '{key}' cancelled: the job restarted as generation {}",
                    st.generation
                )));
            }
            st.kv.get(&key).cloned().map(Ok)
        };
        if let Some(result) = self.wait_for(deadline_after(wait), check).await {
            return result;
        }
        if let Some(result) = check(&mut self.lock()) {
            return result;
        }
        Err(format!("key '{key}' was not set within {}", fmt_secs(wait)))
    }

    pub(super) async fn barrier(
        &self,
        identity: &Identity,
        name: String,
        participants: usize,
        wait: Duration,
    ) -> std::result::Result<(), String> {
        let wait = wait.min(MAX_WAIT);
        if participants == 0 {
            return Err(format!("barrier '{name}' with 0 participants"));
        }
        let (generation, round) = {
            let mut st = self.lock();
            if let Some(e) = stale_worker(&st, identity) {
                return Err(e);
            }
            let generation = st.generation;
            let barrier = st.barriers.entry(name.clone()).or_insert(Barrier {
                participants,
                arrived: 0,
                round: 0,
            });
            if barrier.arrived == 0 {
                barrier.participants = participants;
            } else if barrier.participants != participants {
                return Err(format!(
                    "barrier '{name}' entered with {participants} participants, but others \
                     entered it with {}",
                    barrier.participants
                ));
            }
            let round = barrier.round;
            barrier.arrived += 1;
            if barrier.arrived == barrier.participants {
                barrier.arrived = 0;
                barrier.round += 1;
                drop(st);
                self.bump();
                return Ok(());
            }
            (generation, round)
        };
        let check = |st: &mut State| -> Option<std::result::Result<(), String>> {
            if let Some(e) = Self::aborted(st) {
                return Some(Err(e));
            }
            if st.generation != generation {
                return Some(Err(format!(
                    "barrier '{name}' cancelled: the job restarted as generation {}",
                    st.generation
                )));
            }
            match st.barriers.get(&name) {
                Some(b) if b.round > round => Some(Ok(())),
                _ => None,
            }
        };
        if let Some(result) = self.wait_for(deadline_after(wait), check).await {
            return result;
        }
        let mut st = self.lock();
        if let Some(result) = check(&mut st) {
            return result;
        }
        let mut arrived = 0;
        if let Some(b) = st.barriers.get_mut(&name) {
            arrived = b.arrived;
            b.arrived = b.arrived.saturating_sub(1); // withdraw
        }
        Err(format!(
            "barrier '{name}' timed out after {}: {arrived} of {participants} participants arrived",
            fmt_secs(wait)
        ))
    }
}

/// A worker of an older generation (a straggler of a restart) may not touch the store.
pub(super) fn stale_worker(st: &State, identity: &Identity) -> Option<String> {
    match identity {
        Identity::Worker { rank, generation } if *generation != st.generation => Some(format!(
            "worker rank {rank} belongs to generation {generation}, but the job is at \
             generation {}",
            st.generation
        )),
        _ => None,
    }
}

pub(super) fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait.min(MAX_WAIT))
        .unwrap_or_else(|| now + Duration::from_secs(3600))
}
