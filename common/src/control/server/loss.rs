//! What the end of a client's session means for the job: a goodbye is nothing, a lost node or
//! a silent worker is a failure. A node whose launcher and workers all fall silent together is
//! reported as unreachable (its host went down or off the network), not as a failed worker.

use super::state::*;
use crate::control::protocol::{
    close_code, fmt_secs, unix_time_s, ExitKind, FailureReport, Identity,
};
use std::sync::atomic::Ordering;
use tokio::time::Instant;
use tracing::{info, warn};

impl Shared {
    /// A session ended: forget the client, and treat a lost node or a silent worker as a
    /// failure.
    pub(super) fn session_ended(&self, id: u64, end: SessionEnd, conn: &quinn::Connection) {
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
                } else if self.departure_is_harmless(&st, *node_rank) {
                    info!(
                        %remote,
                        "{who} left outside a running generation (elastic: the job goes on \
                         without it): {cause}"
                    );
                    None
                } else {
                    let what = if silent {
                        format!("node {node_rank} unreachable")
                    } else {
                        format!("lost node {node_rank}")
                    };
                    Some(FailureReport {
                        generation: st.generation,
                        node_rank: *node_rank,
                        rank: None,
                        pid: None,
                        exit: ExitKind::Lost,
                        cause: format!(
                            "{what} ({host}, control connection from {remote}): {cause}"
                        ),
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
                } else if let Some((n, host)) = node_rank.and_then(|n| self.node_silent(&st, n)) {
                    // Its launcher has been silent too: the host, not the worker, is gone.
                    Some(FailureReport {
                        generation: *generation,
                        node_rank: n,
                        rank: None,
                        pid: None,
                        exit: ExitKind::Lost,
                        cause: format!(
                            "node {n} unreachable ({host}): its launcher and worker rank {rank} \
                             (control connection from {remote}) went silent: {cause}"
                        ),
                        last_lines: Vec::new(),
                        unix_time_s: unix_time_s(),
                    })
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

    /// `Some(host)` when node `n`'s launcher has not been heard for half the heartbeat timeout
    /// (it heartbeats every second) or its session is already gone: the whole node is silent.
    fn node_silent(&self, st: &State, n: usize) -> Option<(usize, String)> {
        let launcher = st
            .clients
            .values()
            .find(|c| matches!(&c.identity, Identity::Node { node_rank, .. } if *node_rank == n));
        match launcher {
            Some(c) => {
                let quiet = Instant::now().saturating_duration_since(c.last_heard);
                let host = match &c.identity {
                    Identity::Node { host, .. } => host.clone(),
                    Identity::Worker { .. } => String::new(),
                };
                (quiet > self.config.heartbeat_timeout / 2).then_some((n, host))
            }
            None => {
                let host = st
                    .plan
                    .as_ref()
                    .and_then(|p| p.nodes.iter().find(|i| i.node_rank == n))
                    .map_or_else(String::new, |i| i.host.clone());
                Some((n, host))
            }
        }
    }
}
