//! A control-plane client: each launcher and each worker holds one. Blocking methods for the
//! caller's thread; the connection, the heartbeats and the event reader live on the client's own
//! runtime thread, so a busy training thread never starves them.

use super::protocol::{
    close_code, fmt_secs, millis, read_frame, read_msg, write_frame, Event, FailureReport, Hello,
    HelloReply, Identity, Plan, Request, Response, SessionUp, MAX_FRAME_BYTES, MAX_HELLO_BYTES,
    PROTOCOL_VERSION,
};
use super::tls;
use super::token::Token;
use anyhow::{anyhow, bail, Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::time::timeout;
use tracing::{debug, warn};

/// How long one connection attempt waits for the server before a fresh one is made.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the server may take to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a non-blocking request (set, reports) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time given to a blocking request beyond its own timeout, for the server's answer.
const REQUEST_GRACE: Duration = Duration::from_secs(5);
/// The client's own QUIC idle timeout; the server announces the heartbeat timeout, and the
/// smaller applies, so in practice the server's decides when a dead server is noticed.
const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest timeout a caller may ask for (keeps deadline arithmetic far from overflow).
const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long `close` waits for the goodbye to leave.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);

/// What [`ControlClient::connect`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The control plane (the node-rank-0 launcher).
    pub server: SocketAddr,
    /// The job secret.
    pub token: Token,
    /// Connection attempts are retried until this passes (the server may start after the
    /// client), then the error names the address.
    pub connect_timeout: Duration,
    /// Period of heartbeats (and QUIC keep-alives); keep it well under the server's heartbeat
    /// timeout (a third or less).
    pub heartbeat_interval: Duration,
}

/// A connection to the control plane. `Sync`: threads may share it (it is the collectives'
/// [`KeyValue`](crate::collective::KeyValue) store). Dropping it says goodbye like
/// [`ControlClient::close`].
pub struct ControlClient {
    runtime: Option<tokio::runtime::Runtime>,
    inner: Arc<Inner>,
    events: crossbeam_channel::Receiver<Event>,
}

struct Inner {
    server: SocketAddr,
    identity: Identity,
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    /// Why the connection is gone, once it is.
    lost: Mutex<Option<String>>,
    /// Set by `close`: the end of the connection is ours, no Abort is synthesized.
    closing: AtomicBool,
    /// Tests: stop heartbeats as a SIGSTOPped process would (keep-alives go on).
    heartbeats_paused: AtomicBool,
}

impl Inner {
    fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_lost(&self, cause: String) {
        let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        lost.get_or_insert(cause);
    }

    /// The error for a failed request: the lost connection if that is why.
    fn explain(&self, what: &str, e: anyhow::Error) -> anyhow::Error {
        if let Some(reason) = self.conn.close_reason() {
            let cause = self.lost().unwrap_or_else(|| describe_close(&reason));
            return anyhow!("{what}: lost the control plane at {}: {cause}", self.server);
        }
        anyhow!(
            "{what}: request to the control plane at {} failed: {e:#}",
            self.server
        )
    }
}

fn describe_close(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            if reason.is_empty() {
                format!("the server closed the connection (code {})", c.error_code)
            } else {
                format!("the server closed the connection: {reason}")
            }
        }
        quinn::ConnectionError::TimedOut => {
            "no answer for the idle timeout (the server died, hangs or is unreachable)".into()
        }
        quinn::ConnectionError::LocallyClosed => "the client was closed".into(),
        quinn::ConnectionError::Reset => "the server reset the connection".into(),
        other => other.to_string(),
    }
}

impl ControlClient {
    /// Connects (retrying until `config.connect_timeout`), proves the token, checks the server's
    /// proof, and starts heartbeats and the event reader on the client's own runtime thread.
    pub fn connect(config: ClientConfig, identity: Identity) -> Result<ControlClient> {
        Self::connect_with_version(config, identity, PROTOCOL_VERSION)
    }

    /// `connect`, announcing `version` (tests of the version check).
    pub(crate) fn connect_with_version(
        config: ClientConfig,
        identity: Identity,
        version: u32,
    ) -> Result<ControlClient> {
        if config.heartbeat_interval.is_zero() {
            bail!("the control plane's heartbeat interval must be positive");
        }
        let server = config.server;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("coca-control-client")
            .enable_all()
            .build()
            .context("cannot start the control-plane client's runtime")?;
        let connect_timeout = config.connect_timeout.min(MAX_WAIT);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let hello_identity = identity.clone();
        let cfg = config.clone();
        runtime.spawn(async move {
            let _ = tx.send(establish(&cfg, hello_identity, version).await);
        });
        let established = match rx.recv_timeout(connect_timeout + HELLO_TIMEOUT + REQUEST_GRACE) {
            Ok(result) => result,
            Err(_) => Err(anyhow!(
                "connecting to the control plane at {server} did not finish in time"
            )),
        };
        let (endpoint, conn, send, recv) = match established {
            Ok(parts) => parts,
            Err(e) => {
                runtime.shutdown_background();
                return Err(e);
            }
        };
        let inner = Arc::new(Inner {
            server,
            identity,
            endpoint,
            conn,
            lost: Mutex::new(None),
            closing: AtomicBool::new(false),
            heartbeats_paused: AtomicBool::new(false),
        });
        let (events_tx, events) = crossbeam_channel::unbounded();
        runtime.spawn(heartbeats(inner.clone(), send, config.heartbeat_interval));
        runtime.spawn(event_reader(inner.clone(), recv, events_tx));
        Ok(ControlClient {
            runtime: Some(runtime),
            inner,
            events,
        })
    }

    /// The control plane's address.
    pub fn server_addr(&self) -> SocketAddr {
        self.inner.server
    }

    /// Who this client said it is.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// Node clients only: joins the rendezvous of the job's current generation and blocks until
    /// every node joined (or `timeout`, or the server's rendezvous timeout, whichever is
    /// shorter; the error names the nodes that never joined).
    pub fn rendezvous(&self, timeout: Duration) -> Result<Plan> {
        if !matches!(self.inner.identity, Identity::Node { .. }) {
            bail!(
                "rendezvous is for node launchers, not for {}",
                self.inner.identity
            );
        }
        let timeout = timeout.min(MAX_WAIT);
        let request = Request::Rendezvous {
            timeout_ms: millis(timeout),
        };
        match self.call("rendezvous", request, timeout + REQUEST_GRACE)? {
            Response::Plan(plan) => Ok(plan),
            other => Err(unexpected("rendezvous", other)),
        }
    }

    /// Reports a failure of this node or of one of its workers; the server decides between
    /// restart and abort and tells everyone through [`ControlClient::events`].
    pub fn report_failure(&self, failure: FailureReport) -> Result<()> {
        self.call_ok("report_failure", Request::ReportFailure(failure))
    }

    /// Node clients: all my workers of the current generation exited 0. When every node did,
    /// everyone receives [`Event::Finished`].
    pub fn report_done(&self) -> Result<()> {
        self.call_ok("report_done", Request::ReportDone)
    }

    /// Blocks until `participants` clients have entered barrier `name` (each call counts once;
    /// the barrier can be reused after it opens), or `timeout` (an error saying how many came).
    pub fn barrier(&self, name: &str, participants: usize, timeout: Duration) -> Result<()> {
        let timeout = timeout.min(MAX_WAIT);
        let request = Request::Barrier {
            name: name.to_string(),
            participants,
            timeout_ms: millis(timeout),
        };
        let what = format!("barrier '{name}'");
        match self.call(&what, request, timeout + REQUEST_GRACE)? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&what, other)),
        }
    }

    /// Stores `value` under `key` (overwriting). The store is emptied when the job restarts.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.call_ok(
            &format!("set '{key}'"),
            Request::Set {
                key: key.to_string(),
                value: value.to_vec(),
            },
        )
    }

    /// Blocks until `key` has a value (set by anyone) or `timeout` (an error naming the key).
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let timeout = timeout.min(MAX_WAIT);
        let request = Request::Get {
            key: key.to_string(),
            timeout_ms: millis(timeout),
        };
        let what = format!("get '{key}'");
        match self.call(&what, request, timeout + REQUEST_GRACE)? {
            Response::Value(v) => Ok(v),
            other => Err(unexpected(&what, other)),
        }
    }

    /// Events pushed by the server (Abort, Restart, Finished), plus an `Abort` made up here if
    /// the connection to the server is lost ("lost the control plane at ADDR: cause") before
    /// the job ended.
    pub fn events(&self) -> &crossbeam_channel::Receiver<Event> {
        &self.events
    }

    /// Whether the connection to the server ended without our closing it (the server's host
    /// is unreachable, or the server went away).
    pub fn connection_lost(&self) -> bool {
        !self.inner.closing.load(Ordering::SeqCst) && self.inner.conn.close_reason().is_some()
    }

    /// Says goodbye (so the server does not take our departure for a failure) and stops the
    /// client's thread, in bounded time.
    pub fn close(mut self) {
        self.stop(true);
    }

    /// Says goodbye now, although other holders of this client may still use it (a thread
    /// blocked in a `get` for the whole run): their requests then fail at once, and the
    /// client's thread stops when the last holder drops it. Bounded like [`Self::close`].
    pub fn goodbye(&self) {
        if let Some(runtime) = &self.runtime {
            self.send_goodbye(runtime);
        }
    }

    /// Tests: vanish without a goodbye, as a killed process would.
    #[cfg(test)]
    pub(crate) fn vanish(mut self) {
        self.stop(false);
    }

    /// Tests: stop heartbeats, as a SIGSTOPped process would (QUIC keep-alives go on).
    #[cfg(test)]
    pub(crate) fn pause_heartbeats(&self) {
        self.inner.heartbeats_paused.store(true, Ordering::SeqCst);
    }

    fn stop(&mut self, goodbye: bool) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        self.inner.closing.store(true, Ordering::SeqCst);
        if goodbye {
            self.send_goodbye(&runtime);
        }
        if !goodbye || tokio::runtime::Handle::try_current().is_ok() {
            runtime.shutdown_background();
        } else {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }

    /// Closes the connection with the goodbye code and waits (briefly) for it to leave; a
    /// second call finds the connection closed and returns at once.
    fn send_goodbye(&self, runtime: &tokio::runtime::Runtime) {
        self.inner.closing.store(true, Ordering::SeqCst);
        self.inner
            .conn
            .close(close_code::GOODBYE.into(), b"goodbye");
        let endpoint = self.inner.endpoint.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(CLOSE_TIMEOUT + Duration::from_millis(500));
    }

    fn call_ok(&self, what: &str, request: Request) -> Result<()> {
        match self.call(what, request, REQUEST_TIMEOUT)? {
            Response::Ok => Ok(()),
            other => Err(unexpected(what, other)),
        }
    }

    /// One request on its own stream, answered within `wait` (never hangs).
    fn call(&self, what: &str, request: Request, wait: Duration) -> Result<Response> {
        let inner = &self.inner;
        if let Some(cause) = inner.lost() {
            bail!(
                "{what}: lost the control plane at {}: {cause}",
                inner.server
            );
        }
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| anyhow!("{what}: the control-plane client is closed"))?;
        let conn = inner.conn.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let result = timeout(wait, exchange(&conn, &request)).await;
            let _ = tx.send(result);
        });
        let result = rx.recv_timeout(wait + Duration::from_secs(1));
        let response = match result {
            Ok(Ok(Ok(response))) => response,
            Ok(Ok(Err(e))) => return Err(inner.explain(what, e)),
            Ok(Err(_)) | Err(_) => bail!(
                "{what}: the control plane at {} did not answer within {}",
                inner.server,
                fmt_secs(wait)
            ),
        };
        match response {
            Response::Error(message) => Err(anyhow!("{what}: {message}")),
            response => Ok(response),
        }
    }
}

fn unexpected(what: &str, response: Response) -> anyhow::Error {
    anyhow!("{what}: unexpected answer from the control plane: {response:?}")
}

async fn exchange(conn: &quinn::Connection, request: &Request) -> Result<Response> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, request).await?;
    send.finish()?;
    read_msg(&mut recv, MAX_FRAME_BYTES).await
}

type Established = (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
);

/// Connects with retries until the deadline, then runs the hello. A refusal is final.
async fn establish(config: &ClientConfig, identity: Identity, version: u32) -> Result<Established> {
    let server = config.server;
    let bind: SocketAddr = if server.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind)
        .context("cannot open a UDP socket for the control-plane client")?;
    endpoint.set_default_client_config(tls::client_config(
        config.heartbeat_interval,
        CLIENT_IDLE_TIMEOUT,
    )?);
    let start = Instant::now();
    let deadline = start + config.connect_timeout.min(MAX_WAIT);
    let mut last_error = String::from("no answer");
    let conn = loop {
        let now = Instant::now();
        if now >= deadline {
            endpoint.close(0u32.into(), b"");
            bail!(
                "cannot reach the control plane at {server} within {} ({last_error}); is the \
                 node-rank-0 launcher running, and UDP port {} open?",
                fmt_secs(config.connect_timeout),
                server.port()
            );
        }
        let connecting = endpoint
            .connect(server, tls::SERVER_NAME)
            .with_context(|| format!("cannot connect to the control plane at {server}"))?;
        match timeout((deadline - now).min(ATTEMPT_TIMEOUT), connecting).await {
            Ok(Ok(conn)) => break conn,
            Ok(Err(e)) => {
                last_error = describe_close(&e);
                debug!(%server, "control-plane connection attempt failed: {last_error}");
                let pause = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(pause.min(Duration::from_millis(100))).await;
            }
            Err(_) => last_error = "no answer".into(),
        }
    };
    match hello(config, &conn, identity, version).await {
        Ok((send, recv)) => Ok((endpoint, conn, send, recv)),
        Err(e) => {
            conn.close(0u32.into(), b"");
            let _ = timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
            Err(e)
        }
    }
}

/// The session stream: our proof up, the server's verdict and proof down.
async fn hello(
    config: &ClientConfig,
    conn: &quinn::Connection,
    identity: Identity,
    version: u32,
) -> Result<(quinn::SendStream, quinn::RecvStream)> {
    let server = config.server;
    let ekm = tls::session_secret(conn)?;
    let hello = Hello {
        version,
        identity,
        proof: tls::client_proof(&config.token, &ekm),
    };
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, &hello).await?;
        let reply: HelloReply = read_msg(&mut recv, MAX_HELLO_BYTES).await?;
        anyhow::Ok((send, recv, reply))
    };
    let (send, recv, reply) = match timeout(HELLO_TIMEOUT, exchange).await {
        Ok(Ok(parts)) => parts,
        Ok(Err(e)) => {
            if let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.close_reason() {
                if c.error_code == close_code::REFUSED.into() {
                    bail!(
                        "the control plane at {server} refused us: {}",
                        String::from_utf8_lossy(&c.reason)
                    );
                }
            }
            let cause = conn
                .close_reason()
                .map(|r| describe_close(&r))
                .unwrap_or_else(|| format!("{e:#}"));
            bail!("hello to the control plane at {server} failed: {cause}");
        }
        Err(_) => bail!(
            "the control plane at {server} did not answer our hello within {}",
            fmt_secs(HELLO_TIMEOUT)
        ),
    };
    match reply {
        HelloReply::Refused { reason } => {
            bail!("the control plane at {server} refused us: {reason}")
        }
        HelloReply::Welcome {
            proof,
            heartbeat_timeout_ms,
            ..
        } => {
            if !tls::verify_server_proof(&config.token, &ekm, &proof) {
                warn!(%server, "the control plane could not prove it knows the token");
                bail!(
                    "the control plane at {server} could not prove it knows the job token (an \
                     impostor, or another job's control plane); not joining it"
                );
            }
            let heartbeat_timeout = Duration::from_millis(heartbeat_timeout_ms);
            if config.heartbeat_interval.saturating_mul(3) > heartbeat_timeout {
                warn!(
                    %server,
                    "heartbeat interval {} is more than a third of the control plane's \
                     heartbeat timeout {}: a short hiccup may be taken for death",
                    fmt_secs(config.heartbeat_interval),
                    fmt_secs(heartbeat_timeout)
                );
            }
            Ok((send, recv))
        }
    }
}

/// Sends a heartbeat every `interval` until the connection ends.
async fn heartbeats(inner: Arc<Inner>, mut send: quinn::SendStream, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        ticks.tick().await;
        if inner.heartbeats_paused.load(Ordering::Relaxed) {
            continue;
        }
        seq += 1;
        if write_frame(&mut send, &SessionUp::Heartbeat { seq })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Forwards the server's events; when the session ends before the job did, makes up the Abort.
async fn event_reader(
    inner: Arc<Inner>,
    mut recv: quinn::RecvStream,
    events: crossbeam_channel::Sender<Event>,
) {
    let mut ended = false;
    let cause = loop {
        match read_frame(&mut recv, MAX_FRAME_BYTES).await {
            Ok(Some(payload)) => match super::protocol::decode::<Event>(&payload) {
                Ok(event) => {
                    ended |= matches!(event, Event::Abort { .. } | Event::Finished);
                    let _ = events.send(event);
                }
                Err(e) => {
                    inner
                        .conn
                        .close(close_code::PROTOCOL.into(), b"undecodable event");
                    break format!("protocol error: {e:#}");
                }
            },
            Ok(None) => break "the control plane shut down".to_string(),
            Err(e) => {
                break match inner.conn.close_reason() {
                    Some(reason) => describe_close(&reason),
                    None => format!("{e:#}"),
                }
            }
        }
    };
    inner.set_lost(cause.clone());
    if !ended && !inner.closing.load(Ordering::SeqCst) {
        let reason = format!("lost the control plane at {}: {cause}", inner.server);
        warn!("{reason}");
        let _ = events.send(Event::Abort {
            reason,
            failure: None,
        });
    }
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        self.stop(true);
    }
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient")
            .field("server", &self.inner.server)
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

impl crate::collective::KeyValue for ControlClient {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        ControlClient::set(self, key, value)
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        ControlClient::get(self, key, timeout)
    }
}
