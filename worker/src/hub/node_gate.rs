//! One download per node: in a launched job, local rank 0 of each node fetches a file while
//! the node's other ranks wait for its word through the control plane's key-value store
//! (blocking get), then find the file in the cache. Alone, the process fetches it itself.
//! (Across nodes sharing a file system, and across jobs, the downloader's file lock keeps two
//! writers apart.)

use crate::distributed::context::RankContext;
use anyhow::{bail, Context, Result};
use coca_common::control::ControlClient;
use std::sync::Arc;
use std::time::Duration;

/// How long a rank waits for its node's downloader. A downloader that dies stops the whole
/// job through the launcher long before this.
const WAIT: Duration = Duration::from_secs(24 * 3600);

/// Who fetches on this node.
#[derive(Clone)]
pub struct NodeGate {
    /// `None`: a process alone (it fetches).
    control: Option<Arc<ControlClient>>,
    leader: bool,
    /// Key prefix: generation and node.
    prefix: String,
    rank: usize,
}

impl NodeGate {
    /// A process alone: it fetches everything itself.
    pub fn alone() -> Self {
        Self {
            control: None,
            leader: true,
            prefix: String::new(),
            rank: 0,
        }
    }

    /// Rank `rank` (local rank `local_rank`) of node `node` in restart generation
    /// `generation`; local rank 0 fetches.
    pub fn new(
        control: Arc<ControlClient>,
        rank: usize,
        node: usize,
        local_rank: usize,
        generation: u64,
    ) -> Self {
        Self {
            control: Some(control),
            leader: local_rank == 0,
            prefix: format!("gen{generation}/hub/node{node}"),
            rank,
        }
    }

    /// The gate of a rank: its node from the launcher's `GROUP_RANK` (or `NODE_RANK`).
    pub fn for_rank(ctx: &RankContext) -> Result<Self> {
        let Some(control) = &ctx.control else {
            return Ok(Self::alone());
        };
        let node = ["GROUP_RANK", "NODE_RANK"]
            .iter()
            .find_map(|name| std::env::var(name).ok().map(|v| (name, v)))
            .map(|(name, v)| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("{name}={v:?} is not a number"))
            })
            .transpose()?
            .unwrap_or(0);
        Ok(Self::new(
            control.clone(),
            ctx.rank,
            node,
            ctx.local_rank,
            ctx.generation,
        ))
    }

    /// Runs `fetch(true)` on the node's downloader; the other ranks wait for it to finish, then
    /// run `fetch(false)` (which must find everything cached: it may not download). `what`
    /// names the work (a URL or a model name) and keys it.
    pub fn once<T>(&self, what: &str, fetch: impl FnOnce(bool) -> Result<T>) -> Result<T> {
        let Some(control) = &self.control else {
            return fetch(true);
        };
        let key = format!("{}/{what}", self.prefix);
        if self.leader {
            let result = fetch(true);
            let word = match &result {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("error: {e:#}"),
            };
            control
                .set(&key, word.as_bytes())
                .with_context(|| format!("rank {}: telling the node {what} is ready", self.rank))?;
            return result;
        }
        tracing::info!(
            "rank {}: waiting for local rank 0 to fetch {what}",
            self.rank
        );
        let word = control.get(&key, WAIT).with_context(|| {
            format!(
                "rank {}: waiting for local rank 0 to fetch {what}",
                self.rank
            )
        })?;
        let word = String::from_utf8_lossy(&word);
        if word != "ok" {
            bail!(
                "rank {}: local rank 0 could not fetch {what}: {}",
                self.rank,
                word.trim_start_matches("error: ")
            );
        }
        fetch(false)
    }
}
