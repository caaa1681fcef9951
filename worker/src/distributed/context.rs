//! This process's place in a job, read from the launcher's environment: its rank, the
//! topology, the control-plane connection and the process groups it communicates over.
//!
//! Without a launcher (`WORLD_SIZE` unset or 1 and no control plane) a worker is a job of one:
//! every group is [`SingleProcess`] and nothing is contacted, so local debugging needs nothing.

use anyhow::{bail, Context, Result};
use coca_common::collective::ring::{RingCollective, StallLimits};
use coca_common::collective::{Collective, SingleProcess};
use coca_common::control::{ClientConfig, ControlClient, Event, Identity, Token};
use coca_common::topology::{GroupKind, Topology};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// How long setting up the process groups may take.
const GROUP_SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// A rank's view of the job.
pub struct RankContext {
    pub topology: Topology,
    pub rank: usize,
    pub local_rank: usize,
    /// Restart generation (0 for the first start).
    pub generation: u64,
    /// Every rank.
    pub world: Arc<dyn Collective>,
    /// Ranks reading different samples (sharding × dp) that reduce gradients together.
    pub data: Arc<dyn Collective>,
    /// Ranks partitioning the optimizer state (ZeRO).
    pub sharding: Arc<dyn Collective>,
    /// Ranks at the same sharding and tensor coordinates in the other data-parallel replicas.
    pub replicas: Arc<dyn Collective>,
    /// Ranks holding slices of the same layers.
    pub tensor: Arc<dyn Collective>,
    /// The control-plane connection (heartbeats run on its own threads); `None` alone.
    pub control: Option<Arc<ControlClient>>,
}

fn env_number(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(None),
    }
}

fn env_required(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: workers of a multi-process job are started by coca-launch")
    })
}

/// This process's world size and rank as the launcher's environment gives them (1 and 0
/// alone), read without connecting to anything: for the checks that run before the model.
pub fn env_world_rank() -> Result<(usize, usize)> {
    let world = env_number("WORLD_SIZE")?.unwrap_or(1);
    let rank = env_number("RANK")?.unwrap_or(0);
    if rank >= world {
        bail!("RANK={rank} is not below WORLD_SIZE={world}");
    }
    Ok((world, rank))
}

impl RankContext {
    /// A job of one process.
    pub fn single() -> Self {
        Self {
            topology: Topology::new(1, 1, 1).expect("a world of one is valid"),
            rank: 0,
            local_rank: 0,
            generation: 0,
            world: Arc::new(SingleProcess),
            data: Arc::new(SingleProcess),
            sharding: Arc::new(SingleProcess),
            replicas: Arc::new(SingleProcess),
            tensor: Arc::new(SingleProcess),
            control: None,
        }
    }

    /// Reads the launcher's environment and connects; `tp` and `sharding` are the degrees the
    /// worker's own flags ask for (they must match the launcher's).
    pub fn from_env(tp: usize, sharding: usize) -> Result<Self> {
        crate::device::check_launched_kind()?;
        let world = env_number("WORLD_SIZE")?.unwrap_or(1);
        // A GPU worker of an NCCL build in a job of several refuses a missing NCCL, or one older
        // than it supports, before anything trains (the message names the version and where a
        // newer one comes from). A job of one GPU trains without NCCL: its groups are of one.
        #[cfg(feature = "nccl")]
        if crate::device::launched_for_gpu() && world > 1 {
            crate::comm::nccl::library_version()?;
        }
        let control_addr = std::env::var("COCA_CONTROL_ADDR").ok();
        if world == 1 && control_addr.is_none() {
            Topology::new(1, tp, sharding)?;
            return Ok(Self::single());
        }
        let rank = env_number("RANK")?.context("RANK is not set")?;
        let local_rank = env_number("LOCAL_RANK")?.unwrap_or(0);
        let generation = env_number("COCA_GENERATION")?.unwrap_or(0) as u64;
        let topology = Topology::new(world, tp, sharding)?;
        for (name, expected) in [
            ("COCA_TENSOR_PARALLEL_DEGREE", tp),
            ("COCA_SHARDING_PARALLEL_DEGREE", sharding),
        ] {
            if let Some(v) = env_number(name)? {
                if v != expected {
                    bail!("the launcher set {name}={v} but this worker's flags ask for {expected}");
                }
            }
        }
        let control_addr: SocketAddr = env_required("COCA_CONTROL_ADDR")?
            .parse()
            .context("COCA_CONTROL_ADDR is not an address")?;
        let token =
            Token::from_hex(&env_required("COCA_CONTROL_TOKEN")?).context("COCA_CONTROL_TOKEN")?;
        let advertise: IpAddr = env_required("COCA_ADVERTISE_HOST")?
            .parse()
            .context("COCA_ADVERTISE_HOST is not an IP address")?;
        let control = Arc::new(
            ControlClient::connect(
                ClientConfig {
                    server: control_addr,
                    token: token.clone(),
                    connect_timeout: Duration::from_secs(60),
                    heartbeat_interval: Duration::from_secs(1),
                },
                Identity::Worker { rank, generation },
            )
            .with_context(|| format!("rank {rank}: connecting to the control plane"))?,
        );
        let stall_limits = StallLimits::from_env().with_context(|| format!("rank {rank}"))?;
        let ring = |name: &str, members: Vec<usize>| -> Result<Arc<dyn Collective>> {
            if members.len() == 1 {
                return Ok(Arc::new(SingleProcess));
            }
            let label = format!("gen{generation}/{name}/{}", members[0]);
            let mut ring = RingCollective::connect(
                &label,
                &members,
                rank,
                advertise,
                control.as_ref(),
                token.as_bytes(),
                GROUP_SETUP_TIMEOUT,
            )
            .with_context(|| format!("rank {rank}: setting up the {name} group {members:?}"))?;
            ring.set_stall_limits(stall_limits)?;
            Ok(Arc::new(ring))
        };
        let group = |kind: GroupKind, name: &str| ring(name, topology.group(rank, kind)?);
        let world_group = ring("world", (0..world).collect())?;
        let data = if topology.data_world() == world {
            world_group.clone()
        } else {
            group(GroupKind::DataAndSharding, "data")?
        };
        let sharding = group(GroupKind::Sharding, "sharding")?;
        let replicas = group(GroupKind::Data, "replicas")?;
        let tensor = group(GroupKind::Tensor, "tensor")?;
        Ok(Self {
            topology,
            rank,
            local_rank,
            generation,
            world: world_group,
            data,
            sharding,
            replicas,
            tensor,
            control: Some(control),
        })
    }

    /// Whether this rank writes shared outputs (checkpoints, metrics, reports).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// After an error: `true` when the control plane says the job is stopping because of
    /// another rank (waits briefly for its verdict), so the error is a consequence, not a cause.
    pub fn peer_failed(&self, wait: Duration) -> bool {
        let Some(control) = &self.control else {
            return false;
        };
        matches!(
            control.events().recv_timeout(wait),
            Ok(Event::Abort {
                failure: Some(_),
                ..
            } | Event::Restart { .. })
        )
    }
}
