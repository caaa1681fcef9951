//! The trainer's process groups for the device a worker trains on: NCCL communicators on a
//! CUDA device in an NCCL build (created once per restart generation, their unique ids through
//! the control plane's key-value store, released by the watchdog when the job stops or an
//! operation outlasts `--collective-timeout`), the host transport of the rank's rings otherwise.
//! `COCA_GPU_COLLECTIVES=host` keeps a GPU job on the host transport (device buffers through a
//! host copy): slower, but the same results, for telling an NCCL problem from any other.

use crate::comm::{Communicator, HostTransport};
use crate::distributed::context::RankContext;
use crate::train::trainer::{TrainerGroups, ZeroStage};
use anyhow::{bail, Result};
use candle_core::Device;
use std::sync::Arc;

/// Environment variable choosing a GPU job's collectives: `nccl` (the default in an NCCL
/// build) or `host`.
pub use crate::comm::GPU_COLLECTIVES_ENV;

/// Which backend a GPU job's flat-buffer collectives use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuCollectives {
    /// NCCL on the device's stream (an NCCL build's default).
    Nccl,
    /// The host transport: device buffers copied through the host rings.
    Host,
}

impl GpuCollectives {
    /// The choice of [`GPU_COLLECTIVES_ENV`] (unset: NCCL where the build has it).
    pub fn from_env() -> Result<Self> {
        Self::parse(std::env::var(GPU_COLLECTIVES_ENV).ok().as_deref())
    }

    fn parse(value: Option<&str>) -> Result<Self> {
        match value.map(str::trim) {
            None | Some("") => Ok(if cfg!(feature = "nccl") {
                Self::Nccl
            } else {
                Self::Host
            }),
            Some("host") => Ok(Self::Host),
            Some("nccl") if cfg!(feature = "nccl") => Ok(Self::Nccl),
            Some("nccl") => bail!(
                "{GPU_COLLECTIVES_ENV}=nccl: this build has no NCCL; build with \
                 scripts/cuda/build.sh (features cuda,nccl)"
            ),
            Some(other) => bail!("{GPU_COLLECTIVES_ENV}={other:?}: expected nccl or host"),
        }
    }
}

/// A rank's data, sharding, replica and tensor-parallel communicators, and the watchdog that
/// releases them (NCCL only); keep it alive as long as the trainer.
pub struct JobGroups {
    data: Arc<dyn Communicator>,
    /// The tensor-parallel group, for the model's collectives on activations.
    tensor: Arc<dyn Communicator>,
    sharding: Arc<dyn Communicator>,
    replicas: Arc<dyn Communicator>,
    #[cfg(feature = "nccl")]
    _watchdog: Option<crate::comm::watchdog::Watchdog>,
    /// `"nccl"` or `"host"`, for the start-up log.
    pub backend: &'static str,
}

/// The world group's communicator for `device` (as [`JobGroups::for_device`] chooses), and its
/// watchdog: what `bench-collectives` measures.
pub struct WorldGroup {
    /// Every rank.
    pub comm: Arc<dyn Communicator>,
    #[cfg(feature = "nccl")]
    _watchdog: Option<crate::comm::watchdog::Watchdog>,
    /// `"nccl"` or `"host"`.
    pub backend: &'static str,
}

impl WorldGroup {
    /// The world of `ctx` for buffers on `device`.
    pub fn for_device(ctx: &RankContext, device: &Device) -> Result<Self> {
        #[cfg(feature = "nccl")]
        if uses_nccl(device)? {
            if let Some(mut connector) = nccl::Connector::new(ctx, device)? {
                // NCCL even for a world of one: it is what the bench measures and checks, and
                // on a machine with one GPU the only way to run it.
                let comm = connector.connect_nccl("world", None, &ctx.world)?;
                return Ok(Self {
                    comm,
                    _watchdog: Some(connector.into_watchdog()),
                    backend: "nccl",
                });
            }
        }
        #[cfg(not(feature = "nccl"))]
        uses_nccl(device)?;
        Ok(Self {
            comm: HostTransport::shared(ctx.world.clone()),
            #[cfg(feature = "nccl")]
            _watchdog: None,
            backend: "host",
        })
    }
}

/// Whether a model on `device` reduces over NCCL (a CUDA device, the NCCL build, not
/// [`GPU_COLLECTIVES_ENV`]`=host`); the variable is checked for every CUDA device.
fn uses_nccl(device: &Device) -> Result<bool> {
    Ok(device.is_cuda() && GpuCollectives::from_env()? == GpuCollectives::Nccl)
}

impl JobGroups {
    /// The groups of `ctx` for a model on `device`.
    pub fn for_device(ctx: &RankContext, device: &Device) -> Result<Self> {
        #[cfg(feature = "nccl")]
        if uses_nccl(device)? {
            if let Some(mut connector) = nccl::Connector::new(ctx, device)? {
                use coca_common::topology::GroupKind;
                // The data group is the world when every rank reads different samples.
                let data_kind = (ctx.topology.data_world() != ctx.world.size())
                    .then_some(GroupKind::DataAndSharding);
                let data = connector.connect("data", data_kind, &ctx.data)?;
                let sharding =
                    connector.connect("sharding", Some(GroupKind::Sharding), &ctx.sharding)?;
                let replicas =
                    connector.connect("replicas", Some(GroupKind::Data), &ctx.replicas)?;
                let tensor = connector.connect("tensor", Some(GroupKind::Tensor), &ctx.tensor)?;
                return Ok(Self {
                    data,
                    tensor,
                    sharding,
                    replicas,
                    _watchdog: Some(connector.into_watchdog()),
                    backend: "nccl",
                });
            }
        }
        #[cfg(not(feature = "nccl"))]
        uses_nccl(device)?;
        Ok(Self {
            data: HostTransport::shared(ctx.data.clone()),
            tensor: HostTransport::shared(ctx.tensor.clone()),
            sharding: HostTransport::shared(ctx.sharding.clone()),
            replicas: HostTransport::shared(ctx.replicas.clone()),
            #[cfg(feature = "nccl")]
            _watchdog: None,
            backend: "host",
        })
    }

    /// The tensor-parallel group (for [`crate::model::tensor_parallel::TensorParallel`]).
    pub fn tensor(&self) -> &Arc<dyn Communicator> {
        &self.tensor
    }

    /// The trainer's groups at ZeRO `stage`.
    pub fn trainer_groups(&self, stage: Option<ZeroStage>) -> TrainerGroups {
        TrainerGroups {
            data: self.data.clone(),
            sharding: self.sharding.clone(),
            replicas: self.replicas.clone(),
            stage,
        }
    }
}

#[cfg(feature = "nccl")]
mod nccl {
    use crate::comm::nccl::connect;
    use crate::comm::watchdog::Watchdog;
    use crate::comm::{failure_signal, Communicator, HostTransport};
    use crate::distributed::context::RankContext;
    use anyhow::{Context, Result};
    use candle_core::Device;
    use coca_common::collective::ring::StallLimits;
    use coca_common::collective::Collective;
    use coca_common::control::ControlClient;
    use coca_common::topology::GroupKind;
    use std::sync::Arc;
    use std::time::Duration;

    /// How long the members of a group wait for each other's unique id and `ncclCommInitRank`.
    const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
    /// How often the watchdog looks at the control plane and the operations in flight.
    const TICK: Duration = Duration::from_millis(500);

    /// Creates a rank's NCCL communicators, all watched by one watchdog.
    pub(super) struct Connector<'a> {
        ctx: &'a RankContext,
        control: &'a Arc<ControlClient>,
        device: &'a Device,
        watchdog: Watchdog,
    }

    impl<'a> Connector<'a> {
        /// `None` for a job without a control plane (one process has nothing to reduce).
        pub(super) fn new(ctx: &'a RankContext, device: &'a Device) -> Result<Option<Self>> {
            let Some(control) = &ctx.control else {
                return Ok(None);
            };
            let limits = StallLimits::from_env().with_context(|| format!("rank {}", ctx.rank))?;
            let watchdog =
                Watchdog::start(limits.timeout, TICK, failure_signal::from_control(control))?;
            Ok(Some(Self {
                ctx,
                control,
                device,
                watchdog,
            }))
        }

        /// The watched NCCL communicator of the group `name` whose host collective is
        /// `transport` (members from `kind`; `None`: every rank); a group of one needs none.
        pub(super) fn connect(
            &mut self,
            name: &str,
            kind: Option<GroupKind>,
            transport: &Arc<dyn Collective>,
        ) -> Result<Arc<dyn Communicator>> {
            if transport.size() == 1 {
                return Ok(HostTransport::single());
            }
            self.connect_nccl(name, kind, transport)
        }

        /// [`Self::connect`]'s NCCL communicator, made for a group of one too.
        pub(super) fn connect_nccl(
            &mut self,
            name: &str,
            kind: Option<GroupKind>,
            transport: &Arc<dyn Collective>,
        ) -> Result<Arc<dyn Communicator>> {
            let ctx = self.ctx;
            let members = match kind {
                Some(kind) => ctx.topology.group(ctx.rank, kind)?,
                None => (0..ctx.world.size()).collect(),
            };
            let label = format!("{name}/{}", members[0]);
            let comm = connect(
                self.control.as_ref(),
                ctx.generation,
                &label,
                self.device,
                transport.clone(),
                SETUP_TIMEOUT,
            )
            .with_context(|| format!("rank {}: the {name} group {members:?}", ctx.rank))?;
            Ok(self.watchdog.watch(&label, Arc::new(comm)))
        }

        /// The watchdog, to keep as long as the communicators.
        pub(super) fn into_watchdog(self) -> Watchdog {
            self.watchdog
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_defaults_to_the_build_and_refuses_what_it_cannot_honour() {
        let default = GpuCollectives::parse(None).unwrap();
        assert_eq!(default == GpuCollectives::Nccl, cfg!(feature = "nccl"));
        assert_eq!(
            GpuCollectives::parse(Some("host")).unwrap(),
            GpuCollectives::Host
        );
        let e = format!("{:#}", GpuCollectives::parse(Some("gloo")).unwrap_err());
        assert!(e.contains(GPU_COLLECTIVES_ENV) && e.contains("gloo"), "{e}");
        if !cfg!(feature = "nccl") {
            let e = format!("{:#}", GpuCollectives::parse(Some("nccl")).unwrap_err());
            assert!(e.contains("scripts/cuda/build.sh"), "{e}");
        }
    }

    #[test]
    fn a_cpu_model_reduces_over_the_host_transport() {
        let ctx = RankContext::single();
        let groups = JobGroups::for_device(&ctx, &Device::Cpu).unwrap();
        assert_eq!(groups.backend, "host");
        let t = groups.trainer_groups(Some(ZeroStage::One));
        assert_eq!((t.data.size(), t.sharding.size()), (1, 1));
        assert_eq!(t.stage, Some(ZeroStage::One));
    }
}
