//! The control-plane service hosted by the node-rank-0 launcher: rendezvous, key-value store,
//! barriers, liveness, failure decisions and event broadcast, on its own tokio runtime so that
//! the launcher's own work never delays it.
//!
//! All job state sits in one [`State`] behind a mutex (never held across an await); every change
//! bumps a `watch` counter, which blocking requests (rendezvous, get, barrier) wait on and then
//! re-check the state, so a waiter never misses a change.
//!
//! Files: this one (configuration, start, shutdown), `state` (the job and every decision on
//! it), `admission` (caps on unauthenticated connections), `connection` (handshake, sessions,
//! requests), `loss` (what a session's end means for the job).

mod admission;
mod connection;
mod elastic;
mod loss;
mod state;

pub use admission::HandshakeLimits;

use super::protocol::close_code;
use connection::*;
use state::*;

use super::tls;
use super::token::Token;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::timeout;
use tracing::info;

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
    /// Fewest nodes the job may run on (`--nnodes MIN:MAX`; `nnodes` for a fixed-size job):
    /// after a restart the rendezvous starts with the nodes that are left when at least this
    /// many are, and a rendezvous whose time is up starts with at least this many.
    pub min_nnodes: usize,
    /// How long a rendezvous waits for all nodes (each waiter, from its own join).
    pub rdzv_timeout: Duration,
    /// A client silent this long (no heartbeat, no packet) is declared dead.
    pub heartbeat_timeout: Duration,
    /// How many failures may restart the job before one aborts it.
    pub max_restarts: u32,
    /// Caps on connections that have not proved the token yet.
    pub handshake: HandshakeLimits,
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
        if !(1..=config.nnodes).contains(&config.min_nnodes) {
            bail!(
                "the control plane needs 1 <= min_nnodes <= nnodes, got {}:{}",
                config.min_nnodes,
                config.nnodes
            );
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
            admission: admission::Admission::new(config.handshake),
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

    /// Tests: unauthenticated connections in their handshake (and their source addresses), and
    /// clients connected.
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> (usize, usize, usize) {
        let (pending, sources) = self.shared.admission.pending();
        (pending, sources, self.shared.lock().clients.len())
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

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("local_addr", &self.shared.local_addr)
            .finish_non_exhaustive()
    }
}
