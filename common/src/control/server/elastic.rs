//! Elastic membership (`coca-launch --nnodes MIN:MAX`): when a rendezvous may start with fewer
//! than all nodes, what a node that is not part of the running generation does (it waits for
//! the next restart and joins that one), and when a node that leaves is not a failure.
//!
//! With `min_nnodes == nnodes` (a fixed-size job) none of this changes anything: a rendezvous
//! needs every node, and losing one is a failure.

use super::state::*;
use crate::control::protocol::{fmt_secs, ExitKind, FailureReport, Identity, NodeInfo, Plan};
use tokio::time::Instant;
use tracing::info;

impl Shared {
    /// Whether the job may run on fewer nodes than `nnodes`.
    pub(super) fn elastic(&self) -> bool {
        self.config.min_nnodes < self.config.nnodes
    }

    /// Makes the current generation's plan when the rendezvous may end: every node joined; or,
    /// elastic, at least `min_nnodes` joined and either the round's time is up (`deadline_passed`)
    /// or, after a restart, every node launcher still connected has joined (the nodes that are
    /// left). Returns whether a plan exists now; the caller bumps the state.
    pub(super) fn try_complete(&self, st: &mut State, deadline_passed: bool) -> bool {
        if st.plan.is_some() {
            return true;
        }
        let (min, max) = (self.config.min_nnodes, self.config.nnodes);
        let joined = st.joined.len();
        let ready = joined == max
            || (joined >= min.max(1)
                && (deadline_passed || (st.generation > 0 && every_connected_node_joined(st))));
        if !ready {
            return false;
        }
        let nodes: Vec<NodeInfo> = st.joined.values().map(|j| j.info.clone()).collect();
        let world = nodes.iter().map(|n| n.nproc).sum();
        let generation = st.generation;
        if joined < max {
            let ranks: Vec<String> = nodes.iter().map(|n| n.node_rank.to_string()).collect();
            info!(
                "elastic rendezvous of generation {generation}: {joined} of {max} node(s) \
                 (nodes {}; at least {min} needed), world {world}",
                ranks.join(", ")
            );
        } else {
            info!("rendezvous of generation {generation} complete: {max} node(s), world {world}");
        }
        st.plan = Some(Plan {
            generation,
            nodes,
            world,
        });
        st.rdzv_deadline = None;
        true
    }

    /// Whether `node_rank` is outside the running generation: a plan exists without it. Such a
    /// node (a launcher started again after its host came back) joins at the next restart.
    pub(super) fn outside_plan(st: &State, node_rank: usize) -> bool {
        st.plan
            .as_ref()
            .is_some_and(|p| !p.nodes.iter().any(|n| n.node_rank == node_rank))
    }

    /// Holds a node that is not part of the running generation until the job restarts (it then
    /// joins that rendezvous) or `deadline`.
    pub(super) async fn wait_for_next_generation(
        &self,
        node_rank: usize,
        deadline: Instant,
    ) -> std::result::Result<(), String> {
        let generation = {
            let st = self.lock();
            let generation = st.generation;
            info!(
                "node {node_rank} is not part of generation {generation}, which runs without it: \
                 it joins at the next restart"
            );
            generation
        };
        let started = Instant::now();
        let check = |st: &mut State| -> Option<std::result::Result<(), String>> {
            if let Some(e) = Self::aborted(st) {
                return Some(Err(e));
            }
            (st.generation != generation).then_some(Ok(()))
        };
        match self.wait_for(deadline, check).await {
            Some(result) => result,
            None => Err(format!(
                "node {node_rank} waited {} for the next restart to join the job: generation \
                 {generation} runs without it",
                fmt_secs(started.elapsed())
            )),
        }
    }

    /// Whether losing node `node_rank` is harmless: the job is elastic and the node is not part
    /// of a running generation (the rendezvous in progress goes on without it).
    pub(super) fn departure_is_harmless(&self, st: &State, node_rank: usize) -> bool {
        self.elastic() && (st.plan.is_none() || Self::outside_plan(st, node_rank))
    }

    /// Why the job cannot go on (elastic, after generation 0): fewer than `min_nnodes` node
    /// launchers are still connected, not counting `lost` (a node just reported lost whose
    /// session may not have ended yet).
    pub(super) fn too_few_nodes(&self, st: &State, lost: Option<usize>) -> Option<String> {
        if !self.elastic() {
            return None;
        }
        let mut left: Vec<usize> = connected_nodes(st)
            .into_iter()
            .map(|(_, n)| n)
            .filter(|n| Some(*n) != lost)
            .collect();
        left.sort_unstable();
        left.dedup();
        let min = self.config.min_nnodes;
        (left.len() < min).then(|| {
            let names: Vec<String> = left.iter().map(|n| format!("node {n}")).collect();
            format!(
                "only {} node(s) left ({}), fewer than the {min} that --nnodes {min}:{} needs",
                left.len(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                },
                self.config.nnodes
            )
        })
    }

    /// The node a failure report says is gone (its launcher, lost), if any.
    pub(super) fn lost_node(report: &FailureReport) -> Option<usize> {
        (report.rank.is_none() && report.exit == ExitKind::Lost).then_some(report.node_rank)
    }
}

/// Node launchers connected now: (client id, node rank).
fn connected_nodes(st: &State) -> Vec<(u64, usize)> {
    st.clients
        .iter()
        .filter_map(|(id, c)| match &c.identity {
            Identity::Node { node_rank, .. } => Some((*id, *node_rank)),
            Identity::Worker { .. } => None,
        })
        .collect()
}

/// Every connected node launcher has joined the current round.
fn every_connected_node_joined(st: &State) -> bool {
    connected_nodes(st)
        .into_iter()
        .all(|(id, n)| st.joined.get(&n).is_some_and(|j| j.client == id))
}
