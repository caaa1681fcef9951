//! The launcher's life: check the layout, host (node 0) or join the control plane, rendezvous,
//! start this node's workers, and react to the first of: every worker done, a worker failing
//! here, an abort or restart from the control plane, or a signal to the launcher.

use crate::address;
use crate::args::{node_layout, nproc_per_node, CommandLine, LauncherArgs, NodeLayout};
use crate::elastic::{self, Elastic, GenerationLayout, NodeRange};
use crate::gpus;
use crate::memory::{self, OomCounters};
use crate::preempt::Preemption;
use crate::preflight;
use crate::process::{describe, WorkerProcess, WorkerSpec};
use crate::summary;
use crate::worker_flags::degree_flag;
use anyhow::{bail, Context, Result};
use coca_common::collective::ring::COLLECTIVE_TIMEOUT_ENV;
use coca_common::control::{
    ClientConfig, ControlClient, ControlServer, Event, ExitKind, FailureReport, Identity, Plan,
    ServerConfig, Token,
};
use coca_common::preempt::{parse_checkpoint_signal, CHECKPOINT_SIGNAL_ENV, EXIT_PREEMPTED};
use coca_common::topology::Topology;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A failure of the control plane itself (exit code 3), as opposed to a worker's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ControlPlaneError(pub String);

/// How often the launcher looks at its workers, the control plane and signals.
const POLL: Duration = Duration::from_millis(50);
/// How long a launcher that reported a local failure waits for the control plane's verdict
/// before stopping on its own.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(10);
/// A worker's exit code meaning "stopped because another rank failed" (coca-worker's
/// `EXIT_PEER_FAILED`): reported only if no other failure is heard of within
/// [`COLLATERAL_DELAY`], so the summary names the rank that failed first.
const EXIT_PEER_FAILED: i32 = 75;
const COLLATERAL_DELAY: Duration = Duration::from_secs(3);

/// Everything fixed for the job's lifetime on this node.
struct Job {
    args: LauncherArgs,
    worker_args: Vec<String>,
    worker_binary: PathBuf,
    layout: NodeLayout,
    nproc: usize,
    /// The node counts the job may run on and the batch it keeps.
    elastic: Elastic,
    token: Token,
    control_addr: SocketAddr,
    advertise: IpAddr,
    visible_gpus: Vec<String>,
    /// Compute threads each worker gets: this node's cores ÷ its workers.
    threads_per_worker: usize,
    /// One worker per GPU was asked for (`gpu`, or `auto` on a node with GPUs).
    gpu_workers: bool,
    /// `--checkpoint-signal`'s number, `None` for none.
    checkpoint_signal: Option<libc::c_int>,
}

/// SIGINT, SIGTERM and SIGHUP: while workers run, recorded for the supervision loop (which
/// stops the workers in order, or takes a first SIGTERM as a checkpoint request); while none
/// run (rendezvous), the default action — the launcher just ends. The checkpoint signal is
/// recorded at any time and acted on while workers run.
struct Signals {
    received: Arc<AtomicUsize>,
    idle: Arc<AtomicBool>,
    checkpoint: Arc<AtomicBool>,
}

impl Signals {
    fn install(checkpoint_signal: Option<libc::c_int>) -> Result<Self> {
        let received = Arc::new(AtomicUsize::new(0));
        let idle = Arc::new(AtomicBool::new(true));
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            signal_hook::flag::register_conditional_default(sig, idle.clone())
                .context("cannot install signal handlers")?;
            signal_hook::flag::register_usize(sig, received.clone(), sig as usize)
                .context("cannot install signal handlers")?;
        }
        let checkpoint = Arc::new(AtomicBool::new(false));
        if let Some(sig) = checkpoint_signal {
            signal_hook::flag::register(sig, checkpoint.clone())
                .context("cannot install the --checkpoint-signal handler")?;
        }
        Ok(Self {
            received,
            idle,
            checkpoint,
        })
    }
}

/// How one generation of workers ended.
enum Outcome {
    Finished,
    /// Every worker saved its part of the checkpoint and stopped.
    Preempted,
    Restart,
    Failed(i32),
}

/// `COCA_DEVICE_KIND=gpu` for workers started one per GPU (and for their command's check).
fn device_kind_env(gpu_workers: bool) -> Vec<(&'static str, String)> {
    match gpu_workers {
        true => vec![(coca_common::topology::DEVICE_KIND_ENV, "gpu".to_string())],
        false => Vec::new(),
    }
}

/// Runs the launcher; the exit code as described in `main.rs`.
pub fn run(command_line: CommandLine) -> Result<i32> {
    let CommandLine {
        launcher: args,
        worker: worker_args,
    } = command_line;
    // A bad signal name is a usage error before anything is looked at or started.
    let checkpoint_signal = parse_checkpoint_signal(&args.checkpoint_signal)?;
    let layout = node_layout(&args, |k| std::env::var(k).ok())?;
    let visible_gpus = gpus::visible_gpus();
    let node = gpus::node_name(layout.node_rank);
    let nproc =
        nproc_per_node(&args.nproc_per_node, visible_gpus.len()).with_context(|| node.clone())?;
    gpus::check_gpu_count(
        &args.nproc_per_node,
        nproc,
        &visible_gpus,
        gpus::worker_wants_cuda(&worker_args),
        &node,
    )?;
    let tp = degree_flag(&worker_args, "tensor_parallel_degree")?;
    let sharding = degree_flag(&worker_args, "sharding_parallel_degree")?;
    // Checked before anything starts, so a bad layout fails here with the arithmetic.
    let topology = Topology::new(layout.nnodes * nproc, tp, sharding)?;
    let mut elastic = Elastic {
        range: NodeRange {
            min: layout.min_nnodes,
            max: layout.nnodes,
        },
        nproc,
        tp,
        sharding,
        // Set from the worker's check below: only training has a batch to keep.
        per_device_batch: None,
        accumulation: degree_flag(&worker_args, "gradient_accumulation_steps")?,
    };
    // Every node count MIN..=MAX must be laid out (elastic jobs; the batch is checked below).
    elastic.check()?;
    if !nproc.is_multiple_of(tp) {
        tracing::warn!(
            "--tensor_parallel_degree {tp} does not divide --nproc-per-node {nproc}: tensor-parallel \
             groups will span nodes"
        );
    }
    // Addresses before anything is started: a master that does not resolve or a --local-addr
    // on no interface is a usage error (exit 2), not a worker's.
    let (master, advertise) = address::for_node(&args, &layout)?;
    let worker_binary = coca_common::worker_binary::worker_beside_current_exe()?;
    // The worker's checks, once for the whole node, before anything is started (with the
    // device kind its workers will get).
    let gpu_workers =
        args.nproc_per_node == "gpu" || (args.nproc_per_node == "auto" && !visible_gpus.is_empty());
    let kind_env = device_kind_env(gpu_workers);
    if let Some(answer) =
        preflight::check_worker_command(&worker_binary, &worker_args, topology.world, &kind_env)?
    {
        let node = memory::available(args.node_memory.as_deref())?;
        preflight::check_memory(&answer, nproc, &node)?;
        elastic.per_device_batch = Some(answer.per_device_train_batch_size);
        // Every node count MIN..=MAX must keep the global batch (elastic jobs) and fit.
        elastic.check()?;
        elastic::check_memory_at_min(&elastic, &worker_binary, &worker_args, &kind_env, &node)?;
    }
    std::fs::create_dir_all(&args.log_dir)
        .with_context(|| format!("cannot create --log-dir {}", args.log_dir.display()))?;
    let token = job_token(&args, &layout)?;

    let server = if layout.node_rank == 0 {
        let bind_ip = if layout.standalone {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let bind = SocketAddr::new(bind_ip, layout.master_port.unwrap_or(0));
        let server = ControlServer::start(ServerConfig {
            bind,
            token: token.clone(),
            nnodes: layout.nnodes,
            min_nnodes: layout.min_nnodes,
            rdzv_timeout: args.rdzv_timeout(),
            heartbeat_timeout: Duration::from_secs(args.heartbeat_timeout),
            max_restarts: args.max_restarts,
            handshake: Default::default(),
        })
        .with_context(|| format!("cannot host the control plane on {bind}"))?;
        tracing::info!("control plane listening on {}", server.local_addr());
        Some(server)
    } else {
        None
    };
    let control_addr = match (&server, master) {
        (Some(s), _) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), s.local_addr().port()),
        (None, Some(master)) => master,
        (None, None) => bail!("node {} has no master address", layout.node_rank),
    };
    let client = ControlClient::connect(
        ClientConfig {
            server: control_addr,
            token: token.clone(),
            connect_timeout: args.rdzv_timeout(),
            heartbeat_interval: Duration::from_secs(1),
        },
        Identity::Node {
            node_rank: layout.node_rank,
            nproc,
            host: advertise.to_string(),
        },
    )
    .map_err(|e| ControlPlaneError(format!("{e:#}")))?;
    let job = Job {
        args,
        worker_args,
        worker_binary,
        layout,
        nproc,
        elastic,
        token,
        control_addr,
        advertise,
        visible_gpus,
        threads_per_worker: (std::thread::available_parallelism().map_or(1, |n| n.get()) / nproc)
            .max(1),
        gpu_workers,
        checkpoint_signal,
    };
    let signals = Signals::install(checkpoint_signal)?;
    let result = generations(&job, &client, &signals);
    if server.is_some() {
        // Give the other nodes a moment to receive the verdict before node 0's service goes.
        std::thread::sleep(Duration::from_millis(500));
    }
    client.close();
    drop(server);
    result
}

/// Rendezvous, run, and again after each restart.
fn generations(job: &Job, client: &ControlClient, signals: &Signals) -> Result<i32> {
    loop {
        // Connected: the control plane waits for this node (an elastic job's returning node
        // waits here for the next restart).
        tracing::info!(
            "node {}: joining the job's rendezvous",
            job.layout.node_rank
        );
        let plan = match client.rendezvous(job.args.rdzv_timeout()) {
            Ok(plan) => plan,
            // A returning node of an elastic job, waiting for a restart that never came.
            Err(_) if elastic::finished_without_us(client) => {
                tracing::info!(
                    "the job finished without node {} (it was waiting to join at a restart)",
                    job.layout.node_rank
                );
                return Ok(0);
            }
            Err(e) => bail!(ControlPlaneError(format!("{e:#}"))),
        };
        // Checked for every node count at start-up; an error here means the nodes disagree.
        let layout = job
            .elastic
            .layout(plan.nodes.len())
            .map_err(|e| ControlPlaneError(format!("generation {}: {e:#}", plan.generation)))?;
        if plan.world != layout.topology.world {
            bail!(ControlPlaneError(format!(
                "the nodes disagree on the world size: the control plane counts {} workers, this \
                 node expects {}",
                plan.world, layout.topology.world
            )));
        }
        tracing::info!(
            "generation {}: {} node(s), {} worker(s); this node runs ranks {}..{}",
            plan.generation,
            plan.nodes.len(),
            plan.world,
            plan.rank_offset(job.layout.node_rank),
            plan.rank_offset(job.layout.node_rank) + job.nproc
        );
        if job.elastic.range.is_elastic() {
            tracing::info!("{}", job.elastic.describe(plan.generation, &layout));
        }
        signals.idle.store(false, Ordering::SeqCst);
        let oom_before = OomCounters::read();
        let workers = start_workers(job, &plan, &layout)?;
        let outcome = supervise(job, client, &plan, workers, signals, oom_before);
        signals.idle.store(true, Ordering::SeqCst);
        match outcome? {
            Outcome::Finished => return Ok(0),
            Outcome::Preempted => return Ok(EXIT_PREEMPTED),
            Outcome::Failed(code) => return Ok(code),
            Outcome::Restart => continue,
        }
    }
}

/// Starts this node's workers with the torchrun environment plus the control plane's.
fn start_workers(job: &Job, plan: &Plan, layout: &GenerationLayout) -> Result<Vec<WorkerProcess>> {
    let offset = plan.rank_offset(job.layout.node_rank);
    let t = &layout.topology;
    // Node ranks are dense within a generation (an elastic one may lack a node).
    let group_rank = plan
        .nodes
        .iter()
        .position(|n| n.node_rank == job.layout.node_rank)
        .with_context(|| {
            format!(
                "node {} is not part of generation {}",
                job.layout.node_rank, plan.generation
            )
        })?;
    let mut workers = Vec::with_capacity(job.nproc);
    for local_rank in 0..job.nproc {
        let rank = offset + local_rank;
        let c = t.coordinates(rank)?;
        let mut env: Vec<(String, String)> = [
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", local_rank.to_string()),
            ("WORLD_SIZE", t.world.to_string()),
            ("LOCAL_WORLD_SIZE", job.nproc.to_string()),
            ("GROUP_RANK", group_rank.to_string()),
            ("NODE_RANK", group_rank.to_string()),
            ("MASTER_ADDR", job.control_addr.ip().to_string()),
            ("MASTER_PORT", job.control_addr.port().to_string()),
            ("TORCHELASTIC_RESTART_COUNT", plan.generation.to_string()),
            ("COCA_CONTROL_ADDR", job.control_addr.to_string()),
            ("COCA_CONTROL_TOKEN", job.token.to_hex()),
            ("COCA_GENERATION", plan.generation.to_string()),
            ("COCA_ADVERTISE_HOST", job.advertise.to_string()),
            ("COCA_TENSOR_PARALLEL_DEGREE", t.tp.to_string()),
            ("COCA_SHARDING_PARALLEL_DEGREE", t.sharding.to_string()),
            ("COCA_DATA_PARALLEL_DEGREE", t.dp.to_string()),
            ("COCA_TP_RANK", c.tp.to_string()),
            ("COCA_SHARDING_RANK", c.sharding.to_string()),
            ("COCA_DP_RANK", c.dp.to_string()),
            (
                CHECKPOINT_SIGNAL_ENV,
                job.checkpoint_signal.unwrap_or(0).to_string(),
            ),
            (
                COLLECTIVE_TIMEOUT_ENV,
                job.args
                    .collective_timeout
                    .timeout
                    .as_secs_f64()
                    .to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // Like torchrun's OMP_NUM_THREADS: the node's cores shared among its workers, unless
        // the user set it.
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            env.push((
                "RAYON_NUM_THREADS".to_string(),
                job.threads_per_worker.to_string(),
            ));
        }
        if let (true, Some(batch)) = (job.elastic.range.is_elastic(), layout.per_device_batch) {
            env.push((
                coca_common::topology::PER_DEVICE_BATCH_ENV.to_string(),
                batch.to_string(),
            ));
        }
        env.extend(
            device_kind_env(job.gpu_workers)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        if let Some(device) = job.visible_gpus.get(local_rank) {
            env.push(("CUDA_VISIBLE_DEVICES".to_string(), device.clone()));
        }
        workers.push(WorkerProcess::spawn(WorkerSpec {
            binary: &job.worker_binary,
            args: &job.worker_args,
            env,
            rank,
            log_dir: &job.args.log_dir,
            echo: local_rank == 0,
        })?);
    }
    Ok(workers)
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Watches one generation of workers until the job finishes, fails or restarts.
fn supervise(
    job: &Job,
    client: &ControlClient,
    plan: &Plan,
    mut workers: Vec<WorkerProcess>,
    signals: &Signals,
    oom_before: OomCounters,
) -> Result<Outcome> {
    let node_rank = job.layout.node_rank;
    let mut reported: Option<(FailureReport, Instant)> = None;
    let mut collateral: Option<(FailureReport, Instant)> = None;
    let mut done_reported = false;
    let mut preemption = Preemption::new(
        plan.generation,
        node_rank,
        Duration::from_secs(job.args.term_timeout),
    );
    loop {
        if signals.checkpoint.swap(false, Ordering::SeqCst) {
            if let Some(sig) = job.checkpoint_signal {
                preemption.request(client, sig);
            }
        }
        let sig = signals.received.swap(0, Ordering::SeqCst) as i32;
        let running = workers.iter().any(|w| w.status.is_none());
        if sig != 0 && !(sig == libc::SIGTERM && preemption.on_sigterm(client)) {
            let name = crate::process::signal_name(sig);
            let cause = format!("the launcher of node {node_rank} received {name}");
            return Ok(stop_on_signal(job, client, plan, &mut workers, sig, cause));
        }
        if preemption.term_overdue(running) {
            let cause = preemption.overdue_cause();
            return Ok(stop_on_signal(
                job,
                client,
                plan,
                &mut workers,
                libc::SIGTERM,
                cause,
            ));
        }
        for w in workers.iter_mut() {
            let before = w.status.is_some();
            let Some(status) = w.poll()? else { continue };
            if before {
                continue;
            }
            if status.success() {
                tracing::info!("rank {} finished", w.rank);
                continue;
            }
            if status.code() == Some(EXIT_PREEMPTED) {
                preemption.rank_preempted(w.rank);
                continue;
            }
            let (mut words, _) = describe(status);
            if std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL)
                && oom_before.oom_kill_since(&OomCounters::read())
            {
                words = format!("killed: out of memory (the kernel's OOM killer; {words})");
            }
            tracing::error!("rank {} (pid {}) failed: {words}", w.rank, w.pid);
            if reported.is_none() {
                let failure = FailureReport {
                    generation: plan.generation,
                    node_rank,
                    rank: Some(w.rank),
                    pid: Some(w.pid),
                    exit: match (
                        status.code(),
                        std::os::unix::process::ExitStatusExt::signal(&status),
                    ) {
                        (Some(c), _) => ExitKind::Code(c),
                        (None, Some(s)) => ExitKind::Signal(s),
                        _ => ExitKind::Lost,
                    },
                    cause: format!(
                        "rank {} on node {node_rank} ended with {words} (log: {})",
                        w.rank,
                        w.log_path.display()
                    ),
                    last_lines: w.tail(),
                    unix_time_s: now_unix(),
                };
                if status.code() == Some(EXIT_PEER_FAILED) {
                    collateral.get_or_insert((failure, Instant::now()));
                } else {
                    report(client, &failure);
                    reported = Some((failure, Instant::now()));
                }
            }
        }
        if let Some((failure, at)) = &collateral {
            if reported.is_none() && at.elapsed() > COLLATERAL_DELAY {
                report(client, failure);
                reported = Some((failure.clone(), Instant::now()));
            }
        }
        if !done_reported
            && reported.is_none()
            && collateral.is_none()
            && workers.iter().all(|w| w.status.is_some())
        {
            preemption.read_decision(client);
            client
                .report_done()
                .map_err(|e| ControlPlaneError(format!("{e:#}")))?;
            done_reported = true;
        }
        match client.events().try_recv() {
            Ok(Event::Finished) if preemption.preempted() => {
                eprintln!("{}", preemption.summary());
                return Ok(Outcome::Preempted);
            }
            Ok(Event::Finished) => {
                tracing::info!("every worker on every node finished");
                return Ok(Outcome::Finished);
            }
            // The restart this generation came from (heard while a returning node of an
            // elastic job waited for it): nothing to do.
            Ok(Event::Restart { generation, .. }) if generation <= plan.generation => {
                tracing::debug!("ignoring the restart as generation {generation}: running it");
            }
            Ok(Event::Restart {
                generation,
                failure,
            }) => {
                eprintln!("{}", summary::render(&failure));
                eprintln!(
                    "coca-launch: restarting every worker (generation {generation} of at most {})",
                    job.args.max_restarts
                );
                stop_all(&mut workers, job.args.grace_period);
                return Ok(Outcome::Restart);
            }
            Ok(Event::Abort { reason, failure }) => {
                stop_all(&mut workers, job.args.grace_period);
                return Ok(match failure {
                    Some(f) => {
                        eprintln!("{}", summary::render(&f));
                        Outcome::Failed(summary::exit_code(&f))
                    }
                    None if done_reported => {
                        tracing::warn!("{reason} after this node's workers finished");
                        if preemption.preempted() {
                            eprintln!("{}", preemption.summary());
                            Outcome::Preempted
                        } else {
                            Outcome::Finished
                        }
                    }
                    None => bail!(ControlPlaneError(lost_or_aborted(job, client, &reason))),
                });
            }
            Err(e) if e.is_empty() => {}
            Err(_) => {
                stop_all(&mut workers, job.args.grace_period);
                bail!(ControlPlaneError(lost_or_aborted(
                    job,
                    client,
                    "lost the control plane"
                )));
            }
        }
        if let Some((failure, at)) = &reported {
            if at.elapsed() > VERDICT_TIMEOUT {
                tracing::error!("no answer from the control plane; stopping on our own");
                stop_all(&mut workers, job.args.grace_period);
                eprintln!("{}", summary::render(failure));
                return Ok(Outcome::Failed(summary::exit_code(failure)));
            }
        }
        std::thread::sleep(POLL);
    }
}

/// A signal stops the job: reported to the control plane as the launcher's failure (so no
/// restart follows), this node's workers stopped, exit code 128 + `sig`.
fn stop_on_signal(
    job: &Job,
    client: &ControlClient,
    plan: &Plan,
    workers: &mut [WorkerProcess],
    sig: i32,
    cause: String,
) -> Outcome {
    tracing::warn!("{cause}: stopping this node's workers");
    let failure = FailureReport {
        generation: plan.generation,
        node_rank: job.layout.node_rank,
        rank: None,
        pid: Some(std::process::id()),
        exit: ExitKind::Signal(sig),
        cause,
        last_lines: Vec::new(),
        unix_time_s: now_unix(),
    };
    let _ = client.report_failure(failure);
    stop_all(workers, job.args.grace_period);
    Outcome::Failed(128 + sig)
}

/// Why the job stopped without a failure report: "lost node 0 (ADDR): …" when the connection to
/// its control plane is gone (its host is unreachable or its launcher died), else the abort's
/// reason.
fn lost_or_aborted(job: &Job, client: &ControlClient, reason: &str) -> String {
    if job.layout.node_rank != 0 && client.connection_lost() {
        format!(
            "lost node 0 ({}, which hosts the control plane): {reason}",
            job.layout.master_addr
        )
    } else {
        format!("the job was aborted: {reason}")
    }
}

/// Tells the control plane about a local failure (logged when that fails too).
fn report(client: &ControlClient, failure: &FailureReport) {
    if let Err(e) = client.report_failure(failure.clone()) {
        tracing::error!("cannot report the failure to the control plane: {e:#}");
    }
}

/// SIGTERM to every live worker's group, SIGKILL after `grace_s`, and reap them all.
fn stop_all(workers: &mut [WorkerProcess], grace_s: u64) {
    for w in workers.iter() {
        w.signal(libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(grace_s);
    loop {
        let alive = workers
            .iter_mut()
            .map(|w| !matches!(w.poll(), Ok(Some(_)) | Err(_)))
            .filter(|&running| running)
            .count();
        if alive == 0 {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for w in workers.iter() {
        w.signal(libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && workers
            .iter_mut()
            .any(|w| !matches!(w.poll(), Ok(Some(_)) | Err(_)))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The job secret: random for a standalone job, given for a multi-node one.
fn job_token(args: &LauncherArgs, layout: &NodeLayout) -> Result<Token> {
    if let Some(secret) = &args.rdzv_token {
        return Token::from_secret(secret).context("--rdzv-token / COCA_RDZV_TOKEN");
    }
    if let Some(file) = &args.rdzv_token_file {
        return Token::from_file(file);
    }
    if layout.standalone {
        return Token::random();
    }
    bail!(
        "a multi-node job needs its secret: --rdzv-token, COCA_RDZV_TOKEN or --rdzv-token-file \
         (the same on every node; for example `openssl rand -hex 32`)"
    )
}
