//! Elastic jobs: `--nnodes MIN:MAX`. When a node is lost and restarts remain, the job restarts
//! on the nodes that are left (at least MIN) with the data-parallel degree recomputed and each
//! rank's share of a batch raised so that the global batch — and with it the trajectory — stays
//! what it is on MAX nodes (torchrun's elastic keeps the per-rank batch instead, so there the
//! experiment changes with the node count).
//!
//! Why the per-device batch and not the gradient accumulation: CoCa's losses are not sums over
//! samples. The contrastive loss of a micro-batch contrasts each image with the captions of that
//! micro-batch (over the data-parallel world), and the caption loss is normalised by that
//! micro-batch's token count, so batch 12 is not batch 6 accumulated twice (measured: contrastive
//! loss 3.35 vs 2.65 at the first step of the tiny model). Every micro-batch must keep its
//! samples, so on `n` nodes each of the `dp(n) = n × nproc ÷ tp` data-parallel ranks (dp ×
//! sharding) takes `batch × dp(MAX) ÷ dp(n)` of them and the accumulation is unchanged. The
//! ranks then need more memory per step: at MIN nodes `dp(MAX) ÷ dp(MIN)` times the activations.
//!
//! Every node count MIN..=MAX is checked before any worker starts, so a layout that could not
//! keep the batches on some count is refused at once, naming the counts, rather than failing at
//! a restart hours later.
use crate::memory::NodeMemory;
use crate::preflight;
use anyhow::{bail, Context, Result};
use coca_common::control::{ControlClient, Event};
use coca_common::topology::{Topology, PER_DEVICE_BATCH_ENV};
use std::path::Path;

/// The node counts a job may run on, from `--nnodes N` or `--nnodes MIN:MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeRange {
    /// Fewest nodes the job may continue on.
    pub min: usize,
    /// Nodes the job starts with (and the layout the worker command describes).
    pub max: usize,
}

impl NodeRange {
    /// A fixed-size job of `n` nodes.
    pub fn fixed(n: usize) -> Self {
        Self { min: n, max: n }
    }

    /// Whether the job may run on fewer nodes than it starts with.
    pub fn is_elastic(&self) -> bool {
        self.min < self.max
    }
}

/// Parses `--nnodes`: `N` or `MIN:MAX` (torchrun's syntax), each at least 1, MIN ≤ MAX.
pub fn parse_nnodes(spec: &str) -> Result<NodeRange> {
    let number = |s: &str, what: &str| -> Result<usize> {
        let n: usize = s.trim().parse().with_context(|| {
            format!("--nnodes {spec}: {what} {s:?} is not a number (give N or MIN:MAX)")
        })?;
        if n == 0 {
            bail!("--nnodes {spec}: {what} must be at least 1");
        }
        Ok(n)
    };
    let range = match spec.split_once(':') {
        None => NodeRange::fixed(number(spec, "the node count")?),
        Some((min, max)) => NodeRange {
            min: number(min, "MIN")?,
            max: number(max, "MAX")?,
        },
    };
    if range.min > range.max {
        bail!(
            "--nnodes {spec}: MIN {} is above MAX {} (MIN:MAX is the fewest and the most nodes)",
            range.min,
            range.max
        );
    }
    Ok(range)
}

/// The node counts a job may run on and what its batches need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elastic {
    /// The node counts allowed.
    pub range: NodeRange,
    /// Workers per node.
    pub nproc: usize,
    /// `--tensor_parallel_degree`.
    pub tp: usize,
    /// `--sharding_parallel_degree`.
    pub sharding: usize,
    /// The per-device batch on MAX nodes, for a training command (as the worker's check
    /// resolved it); `None` for other commands (evaluation, benchmarks): no batch to keep.
    pub per_device_batch: Option<usize>,
    /// `--gradient_accumulation_steps`, for the record (it never changes).
    pub accumulation: usize,
}

/// One generation's layout on `nodes` nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationLayout {
    /// Nodes in the generation.
    pub nodes: usize,
    /// World, degrees and rank coordinates.
    pub topology: Topology,
    /// Per-device batch that keeps every micro-batch's samples (`None`: not a training command).
    pub per_device_batch: Option<usize>,
}

impl Elastic {
    /// The layout on `nodes` nodes; an error says why that count cannot keep the batches.
    pub fn layout(&self, nodes: usize) -> Result<GenerationLayout> {
        let topology = Topology::new(nodes * self.nproc, self.tp, self.sharding)
            .with_context(|| format!("{nodes} node(s) × {} worker(s)", self.nproc))?;
        let full = Topology::new(self.range.max * self.nproc, self.tp, self.sharding)
            .with_context(|| format!("{} node(s) × {} worker(s)", self.range.max, self.nproc))?;
        // Sharding ranks read different samples too: the data-parallel world is dp × sharding.
        let (data, full_data) = (data_world(&topology), data_world(&full));
        let per_device_batch = match self.per_device_batch {
            None => None,
            Some(b) if (b * full_data).is_multiple_of(data) => Some(b * full_data / data),
            Some(b) => bail!(
                "{nodes} node(s) give dp {data}, and a micro-batch of {b} × dp {full_data} = {} \
                 samples does not split into {data} equal shares",
                b * full_data
            ),
        };
        Ok(GenerationLayout {
            nodes,
            topology,
            per_device_batch,
        })
    }

    /// Every node count MIN..=MAX must keep the batches: otherwise a one-line error naming each
    /// count that cannot and why (checked before any worker starts).
    pub fn check(&self) -> Result<()> {
        let refused: Vec<String> = (self.range.min..=self.range.max)
            .filter_map(|n| self.layout(n).err().map(|e| format!("{e:#}")))
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        let NodeRange { min, max } = self.range;
        let (nproc, tp, sharding) = (self.nproc, self.tp, self.sharding);
        let what = format!(
            "--nnodes {min}:{max} with {nproc} worker(s) per node, tp {tp} × sharding {sharding}"
        );
        match self.per_device_batch {
            Some(b) => bail!(
                "{what} and per-device batch {b}: the global batch cannot stay the same on every \
                 node count: {}. Raise MIN, or choose --per_device_train_batch_size so that each \
                 count's dp divides the micro-batch",
                refused.join("; ")
            ),
            None => bail!(
                "{what}: not every node count can be laid out: {}. Raise MIN",
                refused.join("; ")
            ),
        }
    }

    /// The line the launcher logs for a generation: `generation 1: 2 nodes, dp 2, per-device
    /// batch 3 × gradient accumulation 2 (global batch 12 unchanged; 2 of 3 nodes)`.
    pub fn describe(&self, generation: u64, layout: &GenerationLayout) -> String {
        let dp = data_world(&layout.topology);
        let nodes = match layout.nodes {
            1 => "1 node".to_string(),
            n => format!("{n} nodes"),
        };
        let head = format!("generation {generation}: {nodes}, dp {dp}");
        let Some(batch) = layout.per_device_batch else {
            return head;
        };
        let change = if layout.nodes == self.range.max {
            String::new()
        } else {
            format!(" unchanged; {} of {} nodes", layout.nodes, self.range.max)
        };
        format!(
            "{head}, per-device batch {batch} × gradient accumulation {} (global batch {}{change})",
            self.accumulation,
            batch * dp * self.accumulation
        )
    }
}

/// Before any worker starts: the workers of the smallest generation (MIN nodes), which take the
/// largest per-device batch, must fit in this node's memory too (the worker's estimate at that
/// batch, from its own check).
pub fn check_memory_at_min(
    elastic: &Elastic,
    worker: &Path,
    worker_args: &[String],
    kind_env: &[(&str, String)],
    node: &NodeMemory,
) -> Result<()> {
    let smallest = elastic.layout(elastic.range.min)?;
    let (Some(batch), Some(full)) = (smallest.per_device_batch, elastic.per_device_batch) else {
        return Ok(());
    };
    if batch == full {
        return Ok(());
    }
    let mut env = vec![(PER_DEVICE_BATCH_ENV, batch.to_string())];
    env.extend(kind_env.iter().cloned());
    let answer =
        preflight::check_worker_command(worker, worker_args, smallest.topology.world, &env)?;
    if let Some(answer) = answer {
        let NodeRange { min, max } = elastic.range;
        preflight::check_memory(&answer, elastic.nproc, node).with_context(|| {
            format!(
                "--nnodes {min}:{max}: on {min} node(s) each worker takes per-device batch {batch} \
                 (the global batch stays the same)"
            )
        })?;
    }
    Ok(())
}

/// How long a node whose rendezvous failed waits for the `Finished` event. The server answers
/// the rendezvous and broadcasts the event at once, on different streams, so the event can
/// arrive just after the answer (a returning node then exited 3 instead of 0: 3 of about 25
/// runs of `elastic_restart`).
const FINISHED_EVENT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether the job finished while this node waited outside it (a returning node of an elastic
/// job is told so by the `Finished` event): then its launcher exits 0. Called after a failed
/// rendezvous; waits at most [`FINISHED_EVENT_WAIT`], less when an abort arrives.
pub fn finished_without_us(client: &ControlClient) -> bool {
    let deadline = std::time::Instant::now() + FINISHED_EVENT_WAIT;
    loop {
        match client.events().recv_deadline(deadline) {
            Ok(Event::Finished) => return true,
            Ok(Event::Abort { .. }) | Err(_) => return false,
            Ok(_) => continue,
        }
    }
}

/// Ranks that read different samples: dp × sharding.
fn data_world(t: &Topology) -> usize {
    t.dp * t.sharding
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elastic(min: usize, max: usize, nproc: usize, tp: usize, batch: usize) -> Elastic {
        Elastic {
            range: NodeRange { min, max },
            nproc,
            tp,
            sharding: 1,
            per_device_batch: Some(batch),
            accumulation: 2,
        }
    }

    #[test]
    fn nnodes_is_n_or_min_max() {
        assert_eq!(parse_nnodes("3").unwrap(), NodeRange::fixed(3));
        assert_eq!(parse_nnodes("2:3").unwrap(), NodeRange { min: 2, max: 3 });
        assert!(!parse_nnodes("3:3").unwrap().is_elastic());
        for (bad, says) in [
            ("3:2", "--nnodes 3:2: MIN 3 is above MAX 2"),
            ("0:2", "MIN must be at least 1"),
            ("0", "at least 1"),
            ("a:2", "MIN \"a\" is not a number"),
            ("2:", "MAX \"\" is not a number"),
            ("two", "not a number"),
        ] {
            let e = format!("{:#}", parse_nnodes(bad).unwrap_err());
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: one line: {e}");
        }
    }

    #[test]
    fn fewer_nodes_raise_the_per_device_batch_to_keep_every_micro_batch() {
        // 3 hosts × 1 worker, batch 2, accumulation 2: global batch 12 on 3 and on 2 nodes.
        let e = elastic(2, 3, 1, 1, 2);
        e.check().unwrap();
        let three = e.layout(3).unwrap();
        let two = e.layout(2).unwrap();
        assert_eq!((three.topology.dp, three.per_device_batch), (3, Some(2)));
        assert_eq!((two.topology.dp, two.per_device_batch), (2, Some(3)));
        assert_eq!(
            e.describe(1, &two),
            "generation 1: 2 nodes, dp 2, per-device batch 3 × gradient accumulation 2 (global \
             batch 12 unchanged; 2 of 3 nodes)"
        );
        assert_eq!(
            e.describe(0, &three),
            "generation 0: 3 nodes, dp 3, per-device batch 2 × gradient accumulation 2 (global \
             batch 12)"
        );
        // tp 2 over 2 workers per node: 4 nodes are dp 4, 2 nodes dp 2 (batch × 2); 3 nodes
        // (dp 3) cannot split a micro-batch of 1 × 4, so 2:4 is refused at batch 1.
        let e = elastic(2, 4, 2, 2, 1);
        assert_eq!(e.layout(2).unwrap().per_device_batch, Some(2));
        let refused = format!("{:#}", e.check().unwrap_err());
        assert!(refused.contains("3 node(s) give dp 3"), "{refused}");
        elastic(2, 4, 2, 2, 3).check().unwrap();
        // A command without a batch (evaluation) only needs every count to be laid out.
        let e = Elastic {
            per_device_batch: None,
            ..elastic(2, 3, 1, 1, 1)
        };
        e.check().unwrap();
        assert_eq!(
            e.describe(1, &e.layout(2).unwrap()),
            "generation 1: 2 nodes, dp 2"
        );
    }

    #[test]
    fn counts_that_cannot_keep_the_batches_are_refused_at_start_naming_them() {
        // 3 → 2 nodes with batch 1: a micro-batch of 3 does not split in 2.
        let e = format!("{:#}", elastic(1, 3, 1, 1, 1).check().unwrap_err());
        assert!(e.contains("--nnodes 1:3"), "{e}");
        assert!(e.contains("2 node(s) give dp 2"), "{e}");
        assert!(!e.contains("1 node(s) give"), "1 node keeps it: {e}");
        assert!(!e.contains('\n'), "{e}");
        // MIN below what tp × sharding needs: 1 node of 2 workers cannot hold tp 4.
        let e = format!("{:#}", elastic(1, 2, 2, 4, 1).check().unwrap_err());
        assert!(
            e.contains("1 node(s) × 2 worker(s): the world of 2 processes cannot be split"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
}
