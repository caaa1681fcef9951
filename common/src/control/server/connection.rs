//! The server's network side: accepting connections, the hello and token proofs, each
//! client's session (heartbeats, goodbye, loss) and its requests.

use super::admission::Ticket;
use super::state::*;
use super::*;
use crate::control::protocol::{
    close_code, decode_small, read_frame, read_msg, write_frame, Event, Hello, HelloReply,
    Identity, Request, Response, SessionUp, ALPN, MAX_FRAME_BYTES, MAX_HELLO_BYTES,
    PROTOCOL_VERSION,
};
use crate::control::tls;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at};
use tracing::{debug, info, warn};

pub(super) fn describe_connection_error(e: &quinn::ConnectionError) -> String {
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

pub(super) async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        if shared.closing.load(Ordering::SeqCst) {
            incoming.refuse();
            continue;
        }
        // Over the caps (logged there), the attempt is refused before any state is kept for it;
        // a client of the job retries.
        match shared.admission.admit(incoming.remote_address().ip()) {
            Some(ticket) => {
                tokio::spawn(handle_connection(shared.clone(), incoming, ticket));
            }
            None => incoming.refuse(),
        }
    }
}

/// Logs and answers a refused peer, then closes its connection. The job is not affected.
pub(super) async fn refuse(
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

/// Serves one connection: the handshake under `ticket` (one deadline for the QUIC/TLS handshake
/// and the hello together), then the session.
pub(super) async fn handle_connection(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    ticket: Ticket,
) {
    let remote = incoming.remote_address();
    let deadline = tokio::time::Instant::now() + shared.admission.timeout();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, "dropped a connection attempt: {e}");
            return;
        }
    };
    let conn = match timeout_at(deadline, connecting).await {
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
    let (mut send, mut recv) = match timeout_at(deadline, conn.accept_bi()).await {
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
    let payload = match timeout_at(deadline, read_frame(&mut recv, MAX_HELLO_BYTES)).await {
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
    match decode_small::<u32>(&payload) {
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
    let hello: Hello = match decode_small(&payload) {
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
    drop(ticket); // authenticated: no longer counted against the handshake caps

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
                        last_heard: tokio::time::Instant::now(),
                    },
                );
                Ok(HelloReply::Welcome {
                    proof: tls::server_proof(&shared.config.token, &ekm),
                    heartbeat_timeout_ms: super::super::protocol::millis(
                        shared.config.heartbeat_timeout,
                    ),
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
    let end = session_reader(&shared, id, &conn, &mut recv).await;
    requests.abort();
    shared.session_ended(id, end, &conn);
}

/// Reads heartbeats until the session ends, and says how it ended.
pub(super) async fn session_reader(
    shared: &Shared,
    id: u64,
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
) -> SessionEnd {
    let hb = shared.config.heartbeat_timeout;
    loop {
        match timeout(hb, read_frame(recv, MAX_HELLO_BYTES)).await {
            Err(_) => return SessionEnd::Silent,
            Ok(Ok(Some(payload))) => match decode_small::<SessionUp>(&payload) {
                Ok(SessionUp::Heartbeat { .. }) => {
                    if let Some(c) = shared.lock().clients.get_mut(&id) {
                        c.last_heard = tokio::time::Instant::now();
                    }
                }
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
pub(super) async fn event_writer(
    mut send: quinn::SendStream,
    mut events: mpsc::UnboundedReceiver<Event>,
) {
    while let Some(event) = events.recv().await {
        if write_frame(&mut send, &event).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
    let _ = timeout(FLUSH_TIMEOUT, send.stopped()).await;
}

/// Serves the client's requests, each on its own stream and task.
pub(super) async fn request_loop(shared: Arc<Shared>, conn: quinn::Connection, id: u64) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(handle_request(shared.clone(), conn.clone(), id, send, recv));
    }
}

pub(super) async fn handle_request(
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
