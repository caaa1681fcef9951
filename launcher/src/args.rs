//! `coca-launch` flags: torchrun's names in dash or underscore spelling, each also read from
//! torchrun's environment variable (`PET_<NAME>`), with SLURM's variables as the fallback for
//! the node layout when running under `srun`.

use anyhow::{bail, Context, Result};
use clap::Parser;
use coca_common::collective::ring::{StallLimits, COLLECTIVE_TIMEOUT_ENV};
use std::path::PathBuf;
use std::time::Duration;

/// torchrun's default rendezvous port.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// The launcher's own flags (everything before `--`).
#[derive(Debug, Parser)]
#[command(
    name = "coca-launch",
    version,
    about = "Starts one coca-worker per device on this node and supervises the whole job",
    override_usage = "coca-launch [OPTIONS] -- WORKER-COMMAND [ARGS]..."
)]
pub struct LauncherArgs {
    /// Number of nodes, `N` or `MIN:MAX` (elastic: after a lost node the job restarts on the
    /// nodes left, at least MIN, with the same global batch). Default: SLURM_NNODES, else 1.
    #[arg(long, env = "PET_NNODES")]
    pub nnodes: Option<String>,
    /// Workers on this node: a number, `gpu` (visible GPUs), `cpu` (CPU cores) or `auto`
    /// (GPUs when there are any, else CPU cores).
    #[arg(long, env = "PET_NPROC_PER_NODE", default_value = "1")]
    pub nproc_per_node: String,
    /// This node's index, 0..nnodes (default: SLURM_NODEID, else 0).
    #[arg(long, env = "PET_NODE_RANK")]
    pub node_rank: Option<usize>,
    /// Address of node 0, which hosts the control plane (default: the first host of
    /// SLURM_JOB_NODELIST, else 127.0.0.1).
    #[arg(long, env = "PET_MASTER_ADDR")]
    pub master_addr: Option<String>,
    /// The address this node's peers connect to (its ring endpoints), one of this host's own.
    /// Default: the address of the interface that reaches --master-addr.
    #[arg(long, env = "COCA_LOCAL_ADDR")]
    pub local_addr: Option<String>,
    /// The interface whose address this node's peers connect to, in NCCL_SOCKET_IFNAME's
    /// syntax: name prefixes `eth,ib`, an exact name `=eth0`, exclusions `^docker,lo`.
    #[arg(long, env = "COCA_SOCKET_IFNAME")]
    pub socket_ifname: Option<String>,
    /// UDP port of the control plane on node 0 (default 29500; a free port when standalone).
    #[arg(long, env = "PET_MASTER_PORT")]
    pub master_port: Option<u16>,
    /// Seconds to wait for every node to join.
    #[arg(long, env = "PET_RDZV_TIMEOUT", default_value_t = 900)]
    pub rdzv_timeout: u64,
    /// Times the whole job is restarted (from its latest checkpoint) after a failure.
    #[arg(long, env = "PET_MAX_RESTARTS", default_value_t = 0)]
    pub max_restarts: u32,
    /// Directory of the per-rank logs (`workerlog.<rank>`).
    #[arg(long, env = "PET_LOG_DIR", default_value = "log")]
    pub log_dir: PathBuf,
    /// One node on this machine, control plane on loopback with a random port and token.
    #[arg(long, env = "PET_STANDALONE")]
    pub standalone: bool,
    /// The job secret every node must present (multi-node jobs; also COCA_RDZV_TOKEN).
    #[arg(long, env = "COCA_RDZV_TOKEN", hide_env_values = true)]
    pub rdzv_token: Option<String>,
    /// A file holding the job secret (also COCA_RDZV_TOKEN_FILE).
    #[arg(long, env = "COCA_RDZV_TOKEN_FILE")]
    pub rdzv_token_file: Option<PathBuf>,
    /// Seconds a stopped worker gets between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 3)]
    pub grace_period: u64,
    /// Memory this node's workers may use (`24GiB`, `512M`, bytes), checked against a training
    /// command's estimate before any worker starts. Default: MemAvailable, or the memory
    /// cgroup's headroom when smaller.
    #[arg(long, env = "COCA_NODE_MEMORY")]
    pub node_memory: Option<String>,
    /// Seconds without a heartbeat after which a node or worker counts as lost.
    #[arg(long, default_value_t = 10)]
    pub heartbeat_timeout: u64,
    /// Seconds a collective of the CPU ring may go without moving a byte before it fails,
    /// naming the group, the operation and the peer it waits on (a warning comes after 60 s,
    /// or half this). Also COCA_COLLECTIVE_TIMEOUT, which the workers receive.
    #[arg(long, env = COLLECTIVE_TIMEOUT_ENV, default_value = "600", value_parser = collective_timeout)]
    pub collective_timeout: StallLimits,
    /// The signal that makes every rank save one checkpoint at the next step boundary and stop
    /// (exit code 76), as SLURM's `--signal=USR1@120` sends it: USR1, USR2, ALRM, URG, XCPU,
    /// PWR, WINCH (with or without SIG, or the number), or none.
    #[arg(long, default_value = coca_common::preempt::DEFAULT_CHECKPOINT_SIGNAL)]
    pub checkpoint_signal: String,
    /// Seconds a SIGTERM leaves the job to save that checkpoint before the workers are
    /// stopped (under SLURM's default KillWait of 30 s); 0: SIGTERM stops the workers at once.
    #[arg(long, env = "COCA_TERM_TIMEOUT", default_value_t = 25)]
    pub term_timeout: u64,
}

fn collective_timeout(v: &str) -> std::result::Result<StallLimits, String> {
    StallLimits::parse(v, "--collective-timeout").map_err(|e| format!("{e:#}"))
}

/// The parsed command line: launcher flags and the worker command after `--`.
pub struct CommandLine {
    pub launcher: LauncherArgs,
    pub worker: Vec<String>,
}

/// Splits at `--` and parses the launcher's part (`--nproc_per_node` and `--nproc-per-node`
/// both reach one flag).
pub fn parse(args: Vec<String>) -> Result<CommandLine> {
    let split = args.iter().position(|a| a == "--");
    let (launcher, worker) = match split {
        Some(i) => (args[..i].to_vec(), args[i + 1..].to_vec()),
        None => (args, Vec::new()),
    };
    let launcher = launcher.into_iter().map(|a| dash_spelling(&a));
    let launcher =
        LauncherArgs::try_parse_from(std::iter::once("coca-launch".to_string()).chain(launcher))
            .map_err(|e| {
                if matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                ) {
                    let _ = e.print();
                    std::process::exit(0);
                }
                anyhow::anyhow!("{}", e.render().to_string().trim_end())
            })?;
    if worker.is_empty() {
        bail!("no worker command: usage: coca-launch [OPTIONS] -- pretrain ...");
    }
    Ok(CommandLine { launcher, worker })
}

/// `--some_flag[=v]` → `--some-flag[=v]`.
fn dash_spelling(arg: &str) -> String {
    match arg.strip_prefix("--") {
        Some(rest) => match rest.split_once('=') {
            Some((name, value)) => format!("--{}={value}", name.replace('_', "-")),
            None => format!("--{}", rest.replace('_', "-")),
        },
        None => arg.to_string(),
    }
}

/// Where this node sits in the job, after SLURM fallbacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLayout {
    /// Nodes the job starts with (MAX of `--nnodes MIN:MAX`).
    pub nnodes: usize,
    /// Fewest nodes the job may continue on (`nnodes` unless elastic).
    pub min_nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// `None`: pick a free port (standalone).
    pub master_port: Option<u16>,
    pub standalone: bool,
}

/// Reads the node layout from the flags, then SLURM's variables (`env` looks them up).
pub fn node_layout(
    args: &LauncherArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<NodeLayout> {
    let slurm_number = |name: &str| -> Result<Option<usize>> {
        env(name)
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("{name}={v:?} is not a number"))
            })
            .transpose()
    };
    let range = match &args.nnodes {
        Some(spec) => crate::elastic::parse_nnodes(spec)?,
        None => crate::elastic::NodeRange::fixed(slurm_number("SLURM_NNODES")?.unwrap_or(1)),
    };
    let nnodes = range.max;
    if nnodes == 0 {
        bail!("--nnodes must be at least 1");
    }
    let standalone = args.standalone || nnodes == 1;
    if args.standalone && nnodes != 1 {
        bail!("--standalone runs one node, but --nnodes is {nnodes}");
    }
    let node_rank = match args.node_rank {
        Some(r) => r,
        None if standalone => 0,
        None => slurm_number("SLURM_NODEID")?.with_context(|| {
            format!("--nnodes {nnodes} needs --node-rank (or SLURM_NODEID under srun)")
        })?,
    };
    if node_rank >= nnodes {
        bail!("--node-rank {node_rank} is outside 0..{nnodes} (--nnodes {nnodes})");
    }
    let master_addr = match &args.master_addr {
        Some(a) => a.clone(),
        None if standalone => "127.0.0.1".to_string(),
        None => match env("SLURM_JOB_NODELIST").or_else(|| env("SLURM_NODELIST")) {
            Some(list) => first_slurm_host(&list)?,
            None => {
                bail!("--nnodes {nnodes} needs --master-addr (or SLURM_JOB_NODELIST under srun)")
            }
        },
    };
    let master_port = match args.master_port {
        Some(p) => Some(p),
        None if standalone => None,
        None => Some(DEFAULT_MASTER_PORT),
    };
    Ok(NodeLayout {
        nnodes,
        min_nnodes: range.min,
        node_rank,
        master_addr,
        master_port,
        standalone,
    })
}

/// The first host of a SLURM host list: `gpu[03-05,9],cpu1` → `gpu03`.
pub fn first_slurm_host(list: &str) -> Result<String> {
    let list = list.trim();
    let first = match (list.find(','), list.find('[')) {
        (Some(comma), Some(bracket)) if comma < bracket => &list[..comma],
        (Some(comma), None) => &list[..comma],
        _ => list,
    };
    let Some(open) = first.find('[') else {
        if first.is_empty() {
            bail!("SLURM_JOB_NODELIST is empty");
        }
        return Ok(first.to_string());
    };
    let prefix = &first[..open];
    let inside = first[open + 1..]
        .split(']')
        .next()
        .filter(|s| !s.is_empty())
        .with_context(|| format!("cannot read the host list {list:?}"))?;
    let range = inside.split(',').next().unwrap_or(inside);
    let start = range.split('-').next().unwrap_or(range);
    Ok(format!("{prefix}{start}"))
}

/// `--nproc-per-node`: a number, or `gpu` / `cpu` / `auto` counted on this machine.
pub fn nproc_per_node(spec: &str, visible_gpus: usize) -> Result<usize> {
    let cpus = || std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = match spec {
        "gpu" => {
            if visible_gpus == 0 {
                bail!("--nproc-per-node gpu: no GPU is visible on this node");
            }
            visible_gpus
        }
        "cpu" => cpus(),
        "auto" => {
            if visible_gpus > 0 {
                visible_gpus
            } else {
                cpus()
            }
        }
        n => n.parse::<usize>().with_context(|| {
            format!("--nproc-per-node must be a number, gpu, cpu or auto, got {n:?}")
        })?,
    };
    if n == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    Ok(n)
}

impl LauncherArgs {
    /// The rendezvous timeout as a duration.
    pub fn rdzv_timeout(&self) -> Duration {
        Duration::from_secs(self.rdzv_timeout)
    }

    /// How long a `--master-addr` that does not resolve is retried.
    pub fn resolve_limit(&self) -> Duration {
        self.rdzv_timeout().min(crate::address::RESOLVE_LIMIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> LauncherArgs {
        let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        v.extend(["--".to_string(), "pretrain".to_string()]);
        parse(v).unwrap().launcher
    }

    #[test]
    fn both_spellings_reach_one_flag() {
        assert_eq!(args(&["--nproc_per_node", "4"]).nproc_per_node, "4");
        assert_eq!(args(&["--nproc-per-node=3"]).nproc_per_node, "3");
        assert_eq!(args(&["--max_restarts=2"]).max_restarts, 2);
        assert_eq!(args(&[]).checkpoint_signal, "USR1");
        assert_eq!(
            args(&["--checkpoint_signal", "USR2"]).checkpoint_signal,
            "USR2"
        );
        assert_eq!(args(&["--term-timeout", "0"]).term_timeout, 0);
    }

    #[test]
    fn collective_timeout_flag() {
        let default = args(&[]).collective_timeout;
        assert_eq!(default.timeout, Duration::from_secs(600));
        let short = args(&["--collective_timeout", "2.5"]).collective_timeout;
        assert_eq!(short.timeout, Duration::from_millis(2500));
        let bad = ["--collective-timeout", "0", "--", "pretrain"].map(String::from);
        let e = parse(bad.to_vec())
            .err()
            .expect("a timeout of 0 is refused");
        assert!(format!("{e:#}").contains("--collective-timeout"), "{e:#}");
    }

    #[test]
    fn slurm_fills_what_flags_leave_out() {
        let env = |k: &str| match k {
            "SLURM_NNODES" => Some("4".to_string()),
            "SLURM_NODEID" => Some("2".to_string()),
            "SLURM_JOB_NODELIST" => Some("gpu[07-10],login1".to_string()),
            _ => None,
        };
        let l = node_layout(&args(&[]), env).unwrap();
        assert_eq!(
            l,
            NodeLayout {
                nnodes: 4,
                min_nnodes: 4,
                node_rank: 2,
                master_addr: "gpu07".into(),
                master_port: Some(DEFAULT_MASTER_PORT),
                standalone: false
            }
        );
        let l = node_layout(&args(&["--node-rank", "1", "--master-addr", "h0"]), env).unwrap();
        assert_eq!((l.node_rank, l.master_addr.as_str()), (1, "h0"));
    }

    #[test]
    fn slurm_host_lists() {
        assert_eq!(first_slurm_host("node1").unwrap(), "node1");
        assert_eq!(first_slurm_host("a1,b[2-3]").unwrap(), "a1");
        assert_eq!(first_slurm_host("gpu[003,005-7]").unwrap(), "gpu003");
        assert!(first_slurm_host("").is_err());
        assert!(first_slurm_host("gpu[]").is_err());
    }

    #[test]
    fn bad_layouts_are_errors() {
        let none = |_: &str| None;
        assert!(node_layout(&args(&["--nnodes", "2"]), none)
            .unwrap_err()
            .to_string()
            .contains("--node-rank"));
        assert!(node_layout(&args(&["--nnodes", "2", "--node-rank", "2"]), none).is_err());
        assert!(node_layout(&args(&["--nnodes", "0"]), none).is_err());
        let e = node_layout(&args(&["--nnodes", "3:2", "--node-rank", "0"]), none).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "--nnodes 3:2: MIN 3 is above MAX 2 (MIN:MAX is the fewest and the most nodes)"
        );
        let l = node_layout(
            &args(&["--nnodes", "2:3", "--node-rank", "2", "--master-addr", "h0"]),
            none,
        )
        .unwrap();
        assert_eq!((l.min_nnodes, l.nnodes, l.standalone), (2, 3, false));
        assert!(nproc_per_node("gpu", 0).is_err());
        assert_eq!(nproc_per_node("auto", 2).unwrap(), 2);
        assert!(nproc_per_node("0", 0).is_err());
        assert!(nproc_per_node("many", 0).is_err());
    }
}
