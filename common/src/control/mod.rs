//! The control plane of a job: a small QUIC service hosted by the node-rank-0 launcher
//! ([`ControlServer`]) that every launcher and worker joins as a [`ControlClient`].
//!
//! It provides the rendezvous of the nodes (a [`Plan`] per generation), a key-value store with
//! blocking get (workers exchange collective endpoints through it), named barriers, heartbeats,
//! failure reports with the restart-or-abort decision, and the broadcast of [`Event`]s.
//!
//! It must never hang a job: connects, hellos, requests and idle connections all have timeouts,
//! a client that loses the server makes up an [`Event::Abort`], and a bad peer (wrong token,
//! wrong version, garbage datagrams) is refused with a log line without disturbing the job.
//!
//! Security: TLS 1.3 (QUIC) with a self-signed certificate; both sides prove they know the job
//! [`Token`] with an HMAC bound to the TLS session (see `tls`), so nobody joins without the
//! token and a man in the middle or a replay gets nowhere.
//!
//! Files: `token` (the secret), `protocol` (types, messages, framing), `tls` (certificates,
//! verifier, proofs), `server`, `client`.

mod client;
mod protocol;
mod server;
mod tls;
mod token;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_elastic;
#[cfg(test)]
mod tests_hostile;

pub use client::{ClientConfig, ControlClient};
pub use protocol::{
    unix_time_s, Event, ExitKind, FailureReport, Identity, NodeInfo, Plan, ALPN, MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
};
pub use server::{ControlServer, HandshakeLimits, ServerConfig};
pub use token::{Token, MIN_TOKEN_BYTES};
