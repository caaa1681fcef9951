//! `scripts/slurm/pretrain.sbatch` — the script users copy, run from where it lies — on a real
//! SLURM cluster of two nodes, one per test host (`common::slurm`): with CPU settings through
//! its environment variables, `sbatch --wait` trains the tiny model across both hosts and ends
//! with the one-process parameters and losses; `scancel` of a running job leaves no
//! `coca-launch` or `coca-worker` on either host within 15 s; `scancel --signal=USR1 --batch`
//! checkpoints the job and `scontrol requeue` resumes it to the one-process parameters. The
//! measured times are printed (README, "SLURM"). The tests take turns: each runs its own
//! cluster.

mod common;

use common::slurm::Slurm;
use common::training::{pretrain_flags, with, Reference};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a job of these tests may take, from `sbatch` to its end.
const JOB_LIMIT: Duration = Duration::from_secs(300);
/// What the issue allows from `scancel` until no process of the job is left.
const CANCEL_LIMIT: Duration = Duration::from_secs(15);
const NODES: usize = 2;
/// Workers per node (the script's `COCA_NPROC_PER_NODE`).
const NPROC: usize = 2;
const WORLD: usize = NODES * NPROC;
/// Worker flags of both tests beyond the short run's: the synthetic set rather than the
/// script's coco_karpathy, and the script's weight decay, which the one-process run gets too.
const CPU_JOB: [&str; 4] = ["--task_name", "synthetic", "--weight_decay", "0.05"];

/// One test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The script itself, in the checkout.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm/pretrain.sbatch")
}

/// The script's environment variable for each worker flag it sets; any other flag goes into
/// `COCA_EXTRA_ARGS`.
const SCRIPT_FLAGS: [(&str, &str); 13] = [
    ("--model", "COCA_MODEL"),
    ("--task_name", "COCA_TASK_NAME"),
    ("--per_device_train_batch_size", "COCA_BATCH_SIZE"),
    ("--tensor_parallel_degree", "COCA_TENSOR_PARALLEL_DEGREE"),
    ("--sharding_parallel_degree", "COCA_SHARDING_DEGREE"),
    ("--sharding", "COCA_SHARDING"),
    ("--learning_rate", "COCA_LEARNING_RATE"),
    ("--weight_decay", "COCA_WEIGHT_DECAY"),
    ("--warmup_steps", "COCA_WARMUP_STEPS"),
    ("--num_train_epochs", "COCA_NUM_TRAIN_EPOCHS"),
    ("--max_steps", "COCA_MAX_STEPS"),
    ("--save_steps", "COCA_SAVE_STEPS"),
    ("--output_dir", "COCA_OUTPUT_DIR"),
];

/// The script's environment that makes it run the `pretrain` command `worker` (every flag with
/// a value) on `NPROC` workers per node, ZeRO stage 2 (the script's) over all `WORLD` of them,
/// with this build's binaries and logs in `log_dir`.
fn script_env(worker: &[String], log_dir: &Path) -> Vec<(String, String)> {
    assert_eq!(worker[0], "pretrain", "{worker:?}");
    let bin = common::binary("coca-launch");
    let mut env = vec![
        (
            "COCA_BIN".to_string(),
            bin.parent().unwrap().display().to_string(),
        ),
        ("COCA_NPROC_PER_NODE".into(), NPROC.to_string()),
        ("COCA_LOG_DIR".into(), log_dir.display().to_string()),
        ("COCA_SHARDING_DEGREE".into(), WORLD.to_string()),
    ];
    let mut extra = Vec::new();
    for pair in worker[1..].chunks(2) {
        let [flag, value] = pair else {
            panic!("flag without a value in {worker:?}")
        };
        match SCRIPT_FLAGS.iter().find(|(f, _)| f == flag) {
            Some((_, var)) => env.push((var.to_string(), value.clone())),
            None => extra.extend([flag.as_str(), value.as_str()]),
        }
    }
    env.push(("COCA_EXTRA_ARGS".into(), extra.join(" ")));
    env
}

/// `sbatch` of the script on every node of `slurm` without GPUs, its output in
/// `dir/slurm-<job>.out`; `how` is `--wait` or `--parsable`.
fn sbatch(slurm: &Slurm, dir: &Path, how: &str, env: &[(String, String)]) -> common::jobs::Job {
    let mut c = slurm.command("sbatch");
    c.args([
        how,
        &format!("--nodes={NODES}"),
        "--gpus-per-node=0",
        "--cpus-per-task=1",
    ])
    .arg(format!("--chdir={}", dir.display()))
    .arg(format!("--output={}/slurm-%j.out", dir.display()))
    .arg(script())
    .envs(env.iter().map(|(k, v)| (k, v)));
    common::jobs::Job::spawn(c)
}

/// The job id in `sbatch`'s output (`Submitted batch job 7`, or `7` with `--parsable`).
fn job_id(stdout: &str) -> String {
    let id = stdout
        .split_whitespace()
        .last()
        .and_then(|w| w.split(';').next())
        .unwrap_or_default();
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        "no job id in {stdout:?}"
    );
    id.to_string()
}

/// The job's `coca-launch` and `coca-worker` processes on each host: those of the host's
/// namespace that run one of the two binaries with `marker` (the job's output folder) in
/// their arguments. (host, pid, command) each.
fn job_processes(slurm: &Slurm, marker: &str) -> Vec<(usize, u32, String)> {
    let bins = [common::binary("coca-launch"), common::binary("coca-worker")];
    let hosts = slurm.hosts();
    let mut found = Vec::new();
    for i in 0..hosts.len() {
        for pid in hosts.pids(i) {
            let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
                continue;
            };
            let exe = exe.display().to_string();
            let Some(bin) = bins.iter().find(|b| exe.starts_with(&*b.to_string_lossy())) else {
                continue;
            };
            let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&args).contains(marker) {
                let name = bin.file_name().unwrap().to_string_lossy().into_owned();
                found.push((i, pid, name));
            }
        }
    }
    found
}

/// The job's output file, once written.
fn job_output(dir: &Path, id: &str) -> String {
    std::fs::read_to_string(dir.join(format!("slurm-{id}.out"))).unwrap_or_default()
}

/// A job of `steps` steps of the tiny model at a global batch of 8 over the `WORLD` workers,
/// its one-process reference trained first: (the reference, the job's output folder, the
/// script's environment, logs in `tmp/logs`).
fn compared_job(tmp: &Path, steps: usize) -> (Reference, PathBuf, Vec<(String, String)>) {
    let global_batch = 8;
    let reference = Reference::train_with(tmp, global_batch, steps, &CPU_JOB);
    let out_dir = tmp.join("run");
    let worker = with(
        pretrain_flags(&reference.config, &out_dir, global_batch / WORLD, steps),
        &CPU_JOB,
    );
    let env = script_env(&worker, &tmp.join("logs"));
    (reference, out_dir, env)
}

#[test]
fn sbatch_wait_of_the_script_trains_across_both_hosts_to_the_one_process_parameters() {
    let _turn = serial();
    let Some(slurm) = Slurm::start(NODES) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let steps = 4;
    let (reference, out_dir, env) = compared_job(tmp.path(), steps);
    let started = Instant::now();
    let (code, out, err) = sbatch(&slurm, tmp.path(), "--wait", &env).finish(JOB_LIMIT);
    let took = started.elapsed();
    let id = job_id(&out);
    let log = job_output(tmp.path(), &id);
    assert_eq!(
        code,
        0,
        "sbatch --wait: {out}\n{err}\n{log}\n{}",
        slurm.logs()
    );
    eprintln!(
        "sbatch --wait: {NODES} nodes × {NPROC} workers, {steps} steps in {:.1} s",
        took.as_secs_f64()
    );
    for node in 0..NODES {
        let ip = slurm.hosts().host(node).addr;
        assert!(
            log.contains(&format!("node {node} advertises {ip} (")),
            "node {node} ran on its host ({ip}): {log}"
        );
    }
    assert!(log.contains("every worker on every node finished"), "{log}");
    reference.assert_same_run(&out_dir, "sbatch --wait of pretrain.sbatch on 2 nodes");
    let marker = out_dir.display().to_string();
    let left = job_processes(&slurm, &marker);
    assert!(left.is_empty(), "left after the job: {left:?}");
}

#[test]
fn scancel_of_a_running_job_leaves_no_process_on_either_host_within_15_s() {
    let _turn = serial();
    let Some(slurm) = Slurm::start(NODES) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let out_dir = tmp.path().join("run");
    let log_dir = tmp.path().join("logs");
    let worker = with(pretrain_flags(&config, &out_dir, 2, 100_000), &CPU_JOB);
    let env = script_env(&worker, &log_dir);
    let (code, out, err) = sbatch(&slurm, tmp.path(), "--parsable", &env).finish(JOB_LIMIT);
    assert_eq!(code, 0, "sbatch: {out}\n{err}");
    let id = job_id(&out);

    // Training has started on both hosts: every rank has logged its first step.
    let marker = out_dir.display().to_string();
    let submitted = Instant::now();
    let training = || {
        (0..WORLD).all(|rank| {
            std::fs::read_to_string(log_dir.join(format!("workerlog.{rank}")))
                .is_ok_and(|l| l.contains("step 1 epoch"))
        })
    };
    while !training() {
        let state = slurm.job_state(&id);
        assert!(
            submitted.elapsed() < JOB_LIMIT
                && matches!(state.as_deref(), Some("PENDING" | "RUNNING")),
            "no step on every rank (job {state:?}, {:.0} s): {}\n{}",
            submitted.elapsed().as_secs_f64(),
            job_output(tmp.path(), &id),
            slurm.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let running = job_processes(&slurm, &marker);
    for host in 0..NODES {
        let on_host = running.iter().filter(|(h, _, _)| *h == host).count();
        assert_eq!(
            on_host,
            1 + NPROC,
            "launcher and workers on host {host}: {running:?}"
        );
    }

    slurm.scancel(&id);
    let cancelled = Instant::now();
    let mut left = job_processes(&slurm, &marker);
    while !left.is_empty() && cancelled.elapsed() < CANCEL_LIMIT {
        std::thread::sleep(Duration::from_millis(50));
        left = job_processes(&slurm, &marker);
    }
    let cleared = cancelled.elapsed();
    let log = job_output(tmp.path(), &id);
    assert!(
        left.is_empty(),
        "still running {CANCEL_LIMIT:?} after scancel: {left:?}\n{log}"
    );
    eprintln!(
        "scancel: no coca-launch or coca-worker left on either host after {:.1} s",
        cleared.as_secs_f64()
    );
    // SLURM's SIGTERM reached the launchers (SLURM's SIGKILL comes only after KillWait, 30 s):
    // the job saved one checkpoint and every launcher said so and stopped.
    assert!(
        log.contains("received SIGTERM: every rank saves one checkpoint"),
        "{log}"
    );
    let preempted = log.matches("coca-launch: preempted at step ").count();
    assert_eq!(preempted, NODES, "{log}");
    assert_ne!(slurm.job_state(&id).as_deref(), Some("RUNNING"));
}

#[test]
fn dropping_the_cluster_stops_its_daemons_and_deletes_its_hosts_and_folder_even_on_panic() {
    let _turn = serial();
    let mut made = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Some(slurm) = Slurm::start(NODES) else {
            return;
        };
        let netns: Vec<String> = (0..NODES)
            .map(|i| slurm.hosts().host(i).netns.clone())
            .collect();
        made = Some((slurm.daemon_pids(), slurm.dir().to_path_buf(), netns));
        panic!("a failing test");
    }));
    let Some((pids, dir, netns)) = made else {
        return;
    };
    assert!(result.is_err());
    let alive: Vec<u32> = pids
        .into_iter()
        .filter(|&p| common::jobs::alive(p))
        .collect();
    assert!(alive.is_empty(), "daemons {alive:?} outlived the cluster");
    assert!(!dir.exists(), "{} is left", dir.display());
    for ns in netns {
        assert!(!Path::new("/run/netns").join(&ns).exists(), "{ns} is left");
    }
}

/// Waits (bounded by `limit`) until job `id` has left the states in `from`; its state then
/// (`None`: the controller forgot it).
fn wait_job_leaves(slurm: &Slurm, id: &str, from: &[&str], limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    loop {
        let state = slurm.job_state(id);
        if !state.as_deref().is_some_and(|s| from.contains(&s)) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still {state:?} after {limit:?}\n{}",
            slurm.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn usr1_to_the_batch_shell_checkpoints_the_job_and_the_requeued_job_ends_like_one_process() {
    let _turn = serial();
    let Some(slurm) = Slurm::start(NODES) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (reference, out_dir, env) = compared_job(tmp.path(), 40);
    let (code, out, err) = sbatch(&slurm, tmp.path(), "--parsable", &env).finish(JOB_LIMIT);
    assert_eq!(code, 0, "sbatch: {out}\n{err}");
    let id = job_id(&out);
    common::training::wait_for_steps(&out_dir, 3, JOB_LIMIT);

    // As `--signal=B:USR1@120` delivers it: to the batch shell alone, which forwards it.
    let signalled = Instant::now();
    let status = slurm
        .command("scancel")
        .args(["--signal=USR1", "--batch", &id])
        .status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "scancel: {status:?}"
    );
    let state = wait_job_leaves(
        &slurm,
        &id,
        &["PENDING", "RUNNING", "COMPLETING"],
        Duration::from_secs(60),
    );
    let took = signalled.elapsed();
    let log = job_output(tmp.path(), &id);
    assert_eq!(
        log.matches("coca-launch: preempted at step ").count(),
        NODES,
        "every launcher checkpointed ({state:?}):\n{log}"
    );
    let checkpoints: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("checkpoint"))
        .collect();
    assert_eq!(checkpoints.len(), 1, "one checkpoint: {checkpoints:?}");
    eprintln!(
        "scancel --signal=USR1 --batch: {} after {:.1} s",
        checkpoints[0],
        took.as_secs_f64()
    );

    // The job resumes from it when requeued, and ends like one uninterrupted process.
    let status = slurm.command("scontrol").args(["requeue", &id]).status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "requeue: {status:?}"
    );
    let pending = slurm
        .command("squeue")
        .args(["-h", "-j", &id, "-o", "%T %r %S"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    eprintln!("requeued: {pending:?}");
    // SLURM holds a requeued job back for the credential lifetime (`cred_expire`, 15 s in the
    // test cluster's slurm.conf): the nodes refuse the old job's revoked credential until then,
    // so forcing `StartTime=now` would kill the job instead of starting it.
    let requeued = Instant::now();
    // Its output shows the resume once it runs (squeue may not list it for a moment).
    let deadline = Instant::now() + JOB_LIMIT;
    while !job_output(tmp.path(), &id).contains("resuming from") {
        assert!(
            Instant::now() < deadline,
            "the requeued job {id} never resumed ({:?})\n{}\n{}",
            slurm.job_state(&id),
            job_output(tmp.path(), &id),
            slurm.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let state = wait_job_leaves(
        &slurm,
        &id,
        &["PENDING", "RUNNING", "COMPLETING"],
        JOB_LIMIT,
    );
    assert!(
        matches!(state.as_deref(), Some("COMPLETED") | None),
        "requeued job {id} ended {state:?}\n{}",
        job_output(tmp.path(), &id)
    );
    eprintln!(
        "the requeued job ended {:.1} s after the requeue",
        requeued.elapsed().as_secs_f64()
    );
    reference.assert_same_run(&out_dir, "pretrain.sbatch preempted with USR1 and requeued");
}
