//! The control-plane service hosted by the node-rank-0 launcher: rendezvous, key-value store,
//! barriers, liveness, failure decisions and event broadcast, on its own tokio runtime so that
//! the launcher's own work never delays it.
//!
//! All job state sits in one [`State`] behind a mutex (never held across an await); every change
//! bumps a `watch` counter, which blocking requests (rendezvous, get, barrier) wait on and then
//! re-check the state, so a waiter never misses a change.

use super::protocol::{
    close_code, decode, fmt_secs, read_frame, read_msg, unix_time_s, write_frame, Event, ExitKind,
    FailureReport, Hello, HelloReply, Identity, NodeInfo, Plan, Request, Response, SessionUp, ALPN,
    MAX_FRAME_BYTES, MAX_HELLO_BYTES, PROTOCOL_VERSION,
};
use super::tls;
use super::token::Token;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, error, info, warn};

/// How long a connecting peer may take for the QUIC/TLS handshake, and then for its hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request frame once it opened the stream.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused peer gets to read the refusal before the connection is closed.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);
/// How long shutdown waits for queued events to reach the clients.
const FLUSH_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest wait a request may ask for (keeps deadline arithmetic far from overflow).
const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// What [`ControlServer::start`] needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// UDP address to listen on; port 0 picks a free one (see [`ControlServer::local_addr`]).
    pub bind: SocketAddr,
    /// The job secret every client must prove it knows.
    pub token: Token,
    /// Number of nodes (launchers) a rendezvous waits for.
    pub nnodes: usize,
    /// How long a rendezvous waits for all nodes (each waiter, from its own join).
    pub rdzv_timeout: Duration,
    /// A client silent this long (no heartbeat, no packet) is declared dead.
    pub heartbeat_timeout: Duration,
    /// How many failures may restart the job before one aborts it.
    pub max_restarts: u32,
}

/// The running control-plane service. Dropping it shuts it down like [`ControlServer::shutdown`].
pub struct ControlServer {
    runtime: Option<tokio::runtime::Runtime>,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

impl ControlServer {
    /// Binds `config.bind` (the error names the address) and serves on a runtime of its own
    /// (two threads), until [`ControlServer::shutdown`] or drop.
    pub fn start(config: ServerConfig) -> Result<ControlServer> {
        if config.nnodes == 0 {
            bail!("the control plane needs nnodes >= 1");
        }
        if config.heartbeat_timeout.is_zero() || config.rdzv_timeout.is_zero() {
            bail!("the control plane's heartbeat and rendezvous timeouts must be positive");
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("coca-control-server")
            .enable_all()
            .build()
            .context("cannot start the control plane's runtime")?;
        let quic = tls::server_config(config.heartbeat_timeout)?;
        let endpoint = {
            let _guard = runtime.enter();
            quinn::Endpoint::server(quic, config.bind)
                .with_context(|| format!("cannot bind the control plane to UDP {}", config.bind))?
        };
        let local_addr = endpoint
            .local_addr()
            .context("the control plane's socket has no local address")?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
            next_id: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            writers: Mutex::new(Vec::new()),
            local_addr,
            config,
        });
        info!(
            %local_addr,
            nnodes = shared.config.nnodes,
            max_restarts = shared.config.max_restarts,
            "control plane listening"
        );
        runtime.spawn(accept_loop(shared.clone(), endpoint.clone()));
        Ok(ControlServer {
            runtime: Some(runtime),
            endpoint,
            local_addr,
            shared,
        })
    }

    /// The address actually bound (with the real port when `bind` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Delivers the events already queued (briefly), closes every connection and the socket, and
    /// stops the runtime's threads, in bounded time (a few seconds at worst).
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Tests: die without closing anything, as a killed process would.
    #[cfg(test)]
    pub(crate) fn vanish(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    fn stop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        let shared = self.shared.clone();
        let endpoint = self.endpoint.clone();
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            shared.closing.store(true, Ordering::SeqCst);
            // Closing the event queues ends the writers, which finish their streams.
            let writers = {
                let mut st = shared.lock();
                for client in st.clients.values_mut() {
                    client.events = None;
                }
                std::mem::take(&mut *shared.writers.lock().unwrap_or_else(|e| e.into_inner()))
            };
            let _ = timeout(FLUSH_TIMEOUT, async {
                for w in writers {
                    let _ = w.await;
                }
            })
            .await;
            endpoint.close(close_code::SHUTDOWN.into(), b"the control plane shut down");
            let _ = timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
            let _ = done_tx.send(());
        });
        let _ = done_rx.recv_timeout(Duration::from_secs(3));
        if tokio::runtime::Handle::try_current().is_ok() {
            runtime.shutdown_background(); // blocking is not allowed inside another runtime
        } else {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
        info!(local_addr = %self.local_addr, "control plane stopped");
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Everything the server's tasks share.
struct Shared {
    config: ServerConfig,
    local_addr: SocketAddr,
    state: Mutex<State>,
    /// Bumped after every change of `state`; blocking requests wait on it.
    changed: watch::Sender<u64>,
    next_id: AtomicU64,
    /// Set by shutdown: connections ending now are not failures.
    closing: AtomicBool,
    /// The event writers, awaited (briefly) at shutdown so queued events get out.
    writers: Mutex<Vec<JoinHandle<()>>>,
}

/// The job as the server sees it.
#[derive(Default)]
struct State {
    generation: u64,
    restarts: u32,
    /// Nodes that joined the current generation's rendezvous, by node rank.
    joined: BTreeMap<usize, Joined>,
    /// When the current rendezvous round (started by its first node) times out.
    rdzv_deadline: Option<Instant>,
    /// Rounds abandoned so far, and why the last one was: its waiters all get that message.
    rdzv_round: u64,
    rdzv_failure: String,
    /// The current generation's plan, once every node joined.
    plan: Option<Plan>,
    /// Nodes that reported done in the current generation.
    done: BTreeMap<usize, ()>,
    /// Abort or Finished, once the job ended; later clients get it on connect.
    terminal: Option<Event>,
    kv: HashMap<String, Vec<u8>>,
    barriers: HashMap<String, Barrier>,
    clients: HashMap<u64, Client>,
}

struct Joined {
    client: u64,
    info: NodeInfo,
}

struct Barrier {
    participants: usize,
    arrived: usize,
    /// Completed rounds: a waiter of round `r` is released when this exceeds `r`.
    round: u64,
}

struct Client {
    identity: Identity,
    remote: SocketAddr,
    /// Events to push; `None` once shutdown closed the queue.
    events: Option<mpsc::UnboundedSender<Event>>,
    /// A node that joined a rendezvous: losing it is a failure of the job.
    registered: bool,
}

/// How a client's session ended.
enum SessionEnd {
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
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Waits until `check` returns `Some` (re-checked after every state change) or `deadline`.
    async fn wait_for<T>(
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

    fn broadcast(st: &mut State, event: &Event) {
        for client in st.clients.values() {
            if let Some(tx) = &client.events {
                let _ = tx.send(event.clone());
            }
        }
    }

    /// The failure policy: the first failure of the current generation restarts the job (while
    /// restarts are left) or aborts it; anything later or older is collateral.
    fn on_failure(&self, st: &mut State, report: FailureReport) -> std::result::Result<(), String> {
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
        if st.restarts < max {
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
            let reason = if max == 0 {
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

    fn aborted(st: &State) -> Option<String> {
        match &st.terminal {
            Some(Event::Abort { reason, .. }) => Some(format!("the job was aborted: {reason}")),
            Some(Event::Finished) => Some("the job already finished".into()),
            _ => None,
        }
    }

    async fn process(&self, id: u64, request: Request) -> Response {
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

    async fn rendezvous(
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
            if st.joined.len() == nnodes {
                let nodes: Vec<NodeInfo> = st.joined.values().map(|j| j.info.clone()).collect();
                let world = nodes.iter().map(|n| n.nproc).sum();
                info!("rendezvous of generation {generation} complete: {nnodes} node(s), world {world}");
                st.plan = Some(Plan {
                    generation,
                    nodes,
                    world,
                });
                st.rdzv_deadline = None;
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
            if let Some(plan) = &st.plan {
                return Some(Ok(plan.clone()));
            }
            if st.rdzv_round != round {
                return Some(Err(st.rdzv_failure.clone()));
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

    fn report_done(&self, id: u64, identity: &Identity) -> std::result::Result<(), String> {
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
        info!(
            "node {node_rank} done ({} of {})",
            st.done.len(),
            self.config.nnodes
        );
        if st.done.len() == self.config.nnodes {
            info!("every node is done: the job finished");
            Self::broadcast(&mut st, &Event::Finished);
            st.terminal = Some(Event::Finished);
            drop(st);
            self.bump();
        }
        Ok(())
    }

    async fn get(
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

    async fn barrier(
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

    /// A session ended: forget the client, and treat a lost node or a silent worker as a
    /// failure.
    fn session_ended(&self, id: u64, end: SessionEnd, conn: &quinn::Connection) {
        let hb = fmt_secs(self.config.heartbeat_timeout);
        let mut st = self.lock();
        let Some(client) = st.clients.remove(&id) else {
            return;
        };
        let remote = client.remote;
        if st.plan.is_none() {
            st.joined.retain(|_, j| j.client != id);
            if st.joined.is_empty() {
                st.rdzv_deadline = None;
            }
        }
        let closing = self.closing.load(Ordering::SeqCst);
        let who = &client.identity;
        let cause = match end {
            SessionEnd::Goodbye => {
                info!(%remote, "{who} said goodbye");
                None
            }
            SessionEnd::Local => None,
            _ if closing => None,
            SessionEnd::Silent => {
                conn.close(
                    close_code::DEAD.into(),
                    format!("declared dead: no heartbeat for {hb}").as_bytes(),
                );
                Some((
                    format!("no heartbeat for {hb} (stopped, hung or cut off)"),
                    true,
                ))
            }
            SessionEnd::Lost { cause, timed_out } => Some((cause, timed_out)),
        };
        let Some((cause, silent)) = cause else {
            drop(st);
            self.bump();
            return;
        };
        let report = match who {
            Identity::Node {
                node_rank, host, ..
            } => {
                if !client.registered {
                    info!(%remote, "{who} left before joining a rendezvous: {cause}");
                    None
                } else {
                    Some(FailureReport {
                        generation: st.generation,
                        node_rank: *node_rank,
                        rank: None,
                        pid: None,
                        exit: ExitKind::Lost,
                        cause: format!("lost node {node_rank} ({host}, control connection from {remote}): {cause}"),
                        last_lines: Vec::new(),
                        unix_time_s: unix_time_s(),
                    })
                }
            }
            Identity::Worker { rank, generation } => {
                let node_rank = st
                    .plan
                    .as_ref()
                    .filter(|p| p.generation == *generation)
                    .and_then(|p| p.node_of_rank(*rank));
                let node_done = node_rank.is_some_and(|n| st.done.contains_key(&n));
                if !silent || node_done {
                    // A closed connection: its launcher reports how the process ended. Silence
                    // after its node is done: a worker that exited 0 without a goodbye.
                    info!(%remote, "{who} disconnected: {cause}");
                    None
                } else {
                    let whereabouts = match node_rank {
                        Some(n) => format!("on node {n}"),
                        None => "on an unknown node".to_string(),
                    };
                    Some(FailureReport {
                        generation: *generation,
                        node_rank: node_rank.unwrap_or(0),
                        rank: Some(*rank),
                        pid: None,
                        exit: ExitKind::Lost,
                        cause: format!("lost worker rank {rank} {whereabouts} (control connection from {remote}): {cause}"),
                        last_lines: Vec::new(),
                        unix_time_s: unix_time_s(),
                    })
                }
            }
        };
        if let Some(report) = report {
            warn!(%remote, "{}", report.cause);
            if let Err(e) = self.on_failure(&mut st, report) {
                warn!("{e}");
            }
        }
        drop(st);
        self.bump();
    }
}

/// A worker of an older generation (a straggler of a restart) may not touch the store.
fn stale_worker(st: &State, identity: &Identity) -> Option<String> {
    match identity {
        Identity::Worker { rank, generation } if *generation != st.generation => Some(format!(
            "worker rank {rank} belongs to generation {generation}, but the job is at \
             generation {}",
            st.generation
        )),
        _ => None,
    }
}

fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait.min(MAX_WAIT))
        .unwrap_or_else(|| now + Duration::from_secs(3600))
}

fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => format!(
            "the peer closed the connection (code {}: {})",
            c.error_code,
            String::from_utf8_lossy(&c.reason)
        ),
        quinn::ConnectionError::TimedOut => {
            "the connection timed out (no packets for the idle timeout)".into()
        }
        quinn::ConnectionError::Reset => "the peer reset the connection".into(),
        other => other.to_string(),
    }
}

async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        if shared.closing.load(Ordering::SeqCst) {
            incoming.refuse();
            continue;
        }
        tokio::spawn(handle_connection(shared.clone(), incoming));
    }
}

/// Logs and answers a refused peer, then closes its connection. The job is not affected.
async fn refuse(
    conn: &quinn::Connection,
    send: Option<&mut quinn::SendStream>,
    remote: SocketAddr,
    reason: &str,
) {
    warn!(%remote, "refused a control-plane client: {reason}");
    if let Some(send) = send {
        let reply = HelloReply::Refused {
            reason: reason.to_string(),
        };
        if write_frame(send, &reply).await.is_ok() {
            let _ = send.finish();
            // Let the refusal arrive; the client closes first when it has read it.
            let _ = timeout(REFUSAL_LINGER, conn.closed()).await;
        }
    }
    conn.close(close_code::REFUSED.into(), reason.as_bytes());
}

async fn handle_connection(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, "dropped a connection attempt: {e}");
            return;
        }
    };
    let conn = match timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(quinn::ConnectionError::ApplicationClosed(_))) => {
            // A client that gave up on this attempt (it retries with a fresh one).
            debug!(%remote, "a client abandoned its handshake");
            return;
        }
        Ok(Err(e)) => {
            warn!(%remote, "refused a control-plane connection: QUIC/TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            warn!(%remote, "refused a control-plane connection: handshake timed out");
            return;
        }
    };
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    if alpn.as_deref() != Some(ALPN) {
        refuse(
            &conn,
            None,
            remote,
            "wrong or missing ALPN (not a coca control client)",
        )
        .await;
        return;
    }
    let (mut send, mut recv) = match timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            debug!(%remote, "connection ended before its hello: {}", describe_connection_error(&e));
            return;
        }
        Err(_) => {
            refuse(&conn, None, remote, "no hello within the handshake timeout").await;
            return;
        }
    };
    let payload = match timeout(HANDSHAKE_TIMEOUT, read_frame(&mut recv, MAX_HELLO_BYTES)).await {
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            refuse(&conn, Some(&mut send), remote, &format!("bad hello: {e}")).await;
            return;
        }
        Err(_) => {
            let reason = "no hello within the handshake timeout";
            refuse(&conn, Some(&mut send), remote, reason).await;
            return;
        }
    };
    // The version first, alone: a peer of another version may not even decode as our Hello.
    match decode::<u32>(&payload) {
        Ok(PROTOCOL_VERSION) => {}
        Ok(v) => {
            let reason = format!(
                "wrong protocol version {v} (this control plane speaks version \
                 {PROTOCOL_VERSION}: launcher and workers must be built from the same sources)"
            );
            refuse(&conn, Some(&mut send), remote, &reason).await;
            return;
        }
        Err(e) => {
            refuse(&conn, Some(&mut send), remote, &format!("bad hello: {e}")).await;
            return;
        }
    }
    let hello: Hello = match decode(&payload) {
        Ok(h) => h,
        Err(e) => {
            refuse(&conn, Some(&mut send), remote, &format!("bad hello: {e}")).await;
            return;
        }
    };
    let ekm = match tls::session_secret(&conn) {
        Ok(ekm) => ekm,
        Err(e) => {
            refuse(&conn, Some(&mut send), remote, &e.to_string()).await;
            return;
        }
    };
    if !tls::verify_client_proof(&shared.config.token, &ekm, &hello.proof) {
        let reason = "bad token (check --rdzv-token / COCA_RDZV_TOKEN)";
        refuse(&conn, Some(&mut send), remote, reason).await;
        return;
    }
    let identity = hello.identity;

    // Register, and answer the hello, under the lock so no event slips between the two.
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let welcome = {
        let mut st = shared.lock();
        match &identity {
            Identity::Worker { rank, generation } if *generation > st.generation => Err(format!(
                "worker rank {rank} claims generation {generation}, but the job is at \
                     generation {}",
                st.generation
            )),
            _ => {
                if let Some(terminal) = &st.terminal {
                    let _ = events_tx.send(terminal.clone());
                }
                st.clients.insert(
                    id,
                    Client {
                        identity: identity.clone(),
                        remote,
                        events: (!shared.closing.load(Ordering::SeqCst)).then_some(events_tx),
                        registered: false,
                    },
                );
                Ok(HelloReply::Welcome {
                    proof: tls::server_proof(&shared.config.token, &ekm),
                    heartbeat_timeout_ms: super::protocol::millis(shared.config.heartbeat_timeout),
                    generation: st.generation,
                })
            }
        }
    };
    let welcome = match welcome {
        Ok(welcome) => welcome,
        Err(reason) => {
            refuse(&conn, Some(&mut send), remote, &reason).await;
            return;
        }
    };
    if let Err(e) = write_frame(&mut send, &welcome).await {
        debug!(%remote, "could not welcome {identity}: {e}");
        shared.session_ended(id, SessionEnd::Local, &conn);
        return;
    }
    info!(%remote, "{identity} connected");
    let writer = tokio::spawn(event_writer(send, events_rx));
    shared
        .writers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(writer);
    let requests = tokio::spawn(request_loop(shared.clone(), conn.clone(), id));
    let end = session_reader(&shared, &conn, &mut recv).await;
    requests.abort();
    shared.session_ended(id, end, &conn);
}

/// Reads heartbeats until the session ends, and says how it ended.
async fn session_reader(
    shared: &Shared,
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
) -> SessionEnd {
    let hb = shared.config.heartbeat_timeout;
    loop {
        match timeout(hb, read_frame(recv, MAX_HELLO_BYTES)).await {
            Err(_) => return SessionEnd::Silent,
            Ok(Ok(Some(payload))) => match decode::<SessionUp>(&payload) {
                Ok(SessionUp::Heartbeat { .. }) => {}
                Err(e) => {
                    conn.close(close_code::PROTOCOL.into(), b"undecodable session frame");
                    return SessionEnd::Lost {
                        cause: format!("protocol error on the session stream: {e}"),
                        timed_out: false,
                    };
                }
            },
            Ok(Ok(None)) | Ok(Err(_)) => {
                // The stream ended: the connection is ending; learn why (bounded).
                let reason = match timeout(hb, conn.closed()).await {
                    Ok(reason) => reason,
                    Err(_) => {
                        conn.close(close_code::PROTOCOL.into(), b"session stream closed");
                        return SessionEnd::Lost {
                            cause: "the client closed its session stream".into(),
                            timed_out: false,
                        };
                    }
                };
                return match reason {
                    quinn::ConnectionError::ApplicationClosed(c)
                        if c.error_code == close_code::GOODBYE.into() =>
                    {
                        SessionEnd::Goodbye
                    }
                    quinn::ConnectionError::LocallyClosed => SessionEnd::Local,
                    e => SessionEnd::Lost {
                        timed_out: matches!(e, quinn::ConnectionError::TimedOut),
                        cause: describe_connection_error(&e),
                    },
                };
            }
        }
    }
}

/// Pushes the client's events down its session stream; finishes the stream when the queue
/// closes (shutdown).
async fn event_writer(mut send: quinn::SendStream, mut events: mpsc::UnboundedReceiver<Event>) {
    while let Some(event) = events.recv().await {
        if write_frame(&mut send, &event).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
    let _ = timeout(FLUSH_TIMEOUT, send.stopped()).await;
}

/// Serves the client's requests, each on its own stream and task.
async fn request_loop(shared: Arc<Shared>, conn: quinn::Connection, id: u64) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(handle_request(shared.clone(), conn.clone(), id, send, recv));
    }
}

async fn handle_request(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    id: u64,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let response = match timeout(
        REQUEST_READ_TIMEOUT,
        read_msg::<_, Request>(&mut recv, MAX_FRAME_BYTES),
    )
    .await
    {
        Ok(Ok(request)) => {
            tokio::select! {
                response = shared.process(id, request) => response,
                _ = conn.closed() => return,
            }
        }
        Ok(Err(e)) => {
            warn!(remote = %conn.remote_address(), "bad control-plane request: {e:#}");
            Response::Error(format!("bad request: {e:#}"))
        }
        Err(_) => Response::Error("request not received in time".into()),
    };
    if write_frame(&mut send, &response).await.is_ok() {
        let _ = send.finish();
    }
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("local_addr", &self.shared.local_addr)
            .finish_non_exhaustive()
    }
}
