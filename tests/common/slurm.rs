//! A real SLURM cluster on the test hosts (`hosts.rs`): Debian's slurm-wlm (22.05) with one
//! `slurmctld` on this machine and one `slurmd` per host namespace, node `host<i>` at host `i`'s
//! address, authenticated by a `munged` of its own.
//!
//! Everything the cluster needs lives in one temporary folder, named by absolute paths (the
//! daemons change directory to `/`): `slurm.conf` and `cgroup.conf`, the munge key and socket,
//! the controller's state, the nodes' spools, pid files and logs. Nothing outside it is changed:
//! the controller listens on a free port of its own and names the nodes by address, and the
//! hosts' names resolve on the hosts through the harness's per-namespace /etc/hosts, so
//! /etc/hosts, /etc/munge and /etc/slurm are left alone and clusters of concurrent runs never
//! meet. Dropping [`Slurm`] — also while a test panics — cancels every job, stops the daemons
//! (SIGTERM, SIGKILL after a bounded wait), deletes the hosts (and every process left on them)
//! and then the folder. See `../shared/notes/multi-host-testing.md` for the recipe by hand.

use super::hosts::{skip_without, Hosts};
use super::jobs::{alive, kill, Job};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long the nodes may take to report `idle` (~1 s measured).
const START_LIMIT: Duration = Duration::from_secs(60);
/// How long a daemon may take to stop after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(5);
/// Prefix of the cluster's folder in the temporary directory (`coca-slurm-<pid hex>x…`): its
/// daemons' command lines name it, so a later run finds what a run killed outright left.
const DIR_PREFIX: &str = "coca-slurm-";
/// The port every `slurmd` listens on, inside its own namespace.
const SLURMD_PORT: u16 = 6818;

/// A SLURM cluster of one node per test host; everything is stopped and removed on drop.
pub struct Slurm {
    /// `munged`, `slurmctld`, then one `slurmd` per host: stopped in reverse order.
    daemons: Vec<(String, Job)>,
    /// The hosts the nodes run on (deleted after the daemons are stopped).
    hosts: Option<Hosts>,
    /// The cluster's folder (configuration, munge, state, spools, logs), removed last.
    dir: Option<tempfile::TempDir>,
    /// `dir/slurm.conf`.
    conf: PathBuf,
}

/// Whether slurm-wlm and munge are installed; skips (`false`, with a message) where they are
/// not, unless `COCA_REQUIRE_HOSTS=1` makes that a failure.
pub fn slurm_installed() -> bool {
    ["slurmctld", "slurmd", "sbatch", "munged", "mungekey"]
        .iter()
        .all(|tool| !skip_without(tool))
}

/// Kills the daemons of runs whose process is gone (killed before their Drop ran) and removes
/// their folders. (Their hosts' namespaces are swept by `Hosts`.)
fn sweep_stale() {
    let owner = |text: &str| -> Option<u32> {
        let rest = &text[text.find(DIR_PREFIX)? + DIR_PREFIX.len()..];
        u32::from_str_radix(rest.split('x').next()?, 16).ok()
    };
    let dead = |pid: u32| !Path::new(&format!("/proc/{pid}")).exists();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let args = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if owner(&String::from_utf8_lossy(&args)).is_some_and(dead) {
            kill(pid, "-9");
        }
    }
    for entry in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(DIR_PREFIX) && owner(&name).is_some_and(dead) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// This machine's host name (`SlurmctldHost` must be it, or `slurmctld` refuses to start).
fn machine_hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read /proc/sys/kernel/hostname")?;
    Ok(name.trim().to_string())
}

/// A TCP port of this machine that was free a moment ago.
fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("0.0.0.0:0")
        .context("cannot bind a TCP port")?
        .local_addr()?
        .port())
}

/// `slurm.conf` for `hosts`, every path under `dir`, the controller on `port` at `gateway`.
fn slurm_conf(dir: &Path, hosts: &Hosts, port: u16, cluster: &str) -> Result<String> {
    let d = dir.display();
    let mut conf = format!(
        "ClusterName={cluster}
SlurmctldHost={hostname}({gateway})
SlurmctldPort={port}
SlurmdPort={SLURMD_PORT}
AuthType=auth/munge
# cred_expire is also how long SLURM holds a requeued job back (120 s by default); a requeue
# sooner than that finds the nodes still refusing the job's revoked credential.
AuthInfo=socket={d}/munge.socket,cred_expire=15
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ReturnToService=2
# A finished job stays known 5 s: `sbatch --wait` then polls every 2 s (at the default of
# 300 s it sleeps 2, 8, then 32 s between polls).
MinJobAge=5
",
        hostname = machine_hostname()?,
        gateway = hosts.gateway(),
    );
    let mut names = Vec::new();
    for i in 0..hosts.len() {
        let host = hosts.host(i);
        conf.push_str(&format!(
            "NodeName={} NodeAddr={} CPUs=1 State=UNKNOWN\n",
            host.name, host.addr
        ));
        names.push(host.name.clone());
    }
    conf.push_str(&format!(
        "PartitionName=test Nodes={} Default=YES MaxTime=INFINITE State=UP\n",
        names.join(",")
    ));
    Ok(conf)
}

/// Without it `slurmd` looks for a cgroup v2 hierarchy of its own and stops.
const CGROUP_CONF: &str =
    "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nCgroupAutomount=no\n";

/// A SLURM client command (`sbatch`, `sinfo`, …) of the cluster of `conf`: run on this machine
/// with `SLURM_CONF` naming it (a job inherits it) and without the variables of a SLURM job the
/// tests may themselves run in.
fn client(conf: &Path, program: &str) -> Command {
    let mut c = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let prefixes = ["SLURM_", "SBATCH_", "SALLOC_", "SRUN_"];
        if prefixes
            .iter()
            .any(|p| name.to_string_lossy().starts_with(p))
        {
            c.env_remove(&name);
        }
    }
    c.env("SLURM_CONF", conf);
    c
}

/// `sinfo`'s node states of the cluster of `conf`, e.g. `idle 2`.
fn node_states(conf: &Path) -> Result<String> {
    let out = client(conf, "sinfo")
        .args(["-h", "-o", "%T %D"])
        .output()
        .context("cannot run sinfo")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Polls `ready` until it holds, within [`START_LIMIT`]; fails early when one of `daemons`
/// exits.
fn wait_for(
    daemons: &mut [(String, Job)],
    mut ready: impl FnMut() -> Result<bool>,
    what: &str,
) -> Result<()> {
    let deadline = Instant::now() + START_LIMIT;
    let mut last = Ok(false);
    while Instant::now() < deadline {
        last = ready();
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        for (name, daemon) in daemons.iter_mut() {
            if let Some(code) = daemon.wait(Duration::ZERO) {
                bail!("{name} exited with {code}: {}", daemon.output().1);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("no {what} within {START_LIMIT:?} (last: {last:?})")
}

impl Slurm {
    /// Makes `n` hosts and a cluster of one node on each, and waits (bounded) until every node
    /// is idle. `None` (after a message) where slurm-wlm is not installed or namespaces cannot
    /// be made; panics when the cluster does not come up.
    pub fn start(n: usize) -> Option<Slurm> {
        if !slurm_installed() {
            return None;
        }
        let hosts = Hosts::new(n)?;
        sweep_stale();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{:x}x", std::process::id()))
            .tempdir()
            .expect("temporary folder");
        let mut slurm = Slurm {
            daemons: Vec::new(),
            conf: dir.path().join("slurm.conf"),
            hosts: Some(hosts),
            dir: Some(dir),
        };
        // From here on, Drop stops whatever was started.
        let started = Instant::now();
        if let Err(e) = slurm.boot() {
            panic!("the SLURM cluster did not start: {e:#}\n{}", slurm.logs());
        }
        eprintln!(
            "slurm: {n} nodes idle {:.1} s after the start ({})",
            started.elapsed().as_secs_f64(),
            slurm.conf.display()
        );
        Some(slurm)
    }

    fn boot(&mut self) -> Result<()> {
        let dir = self.dir().to_path_buf();
        for sub in ["state", "spool"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot make {}", dir.join(sub).display()))?;
        }
        let cluster = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("coca")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
            .to_ascii_lowercase();
        let conf = slurm_conf(&dir, self.hosts(), free_tcp_port()?, &cluster)?;
        std::fs::write(&self.conf, conf).context("cannot write slurm.conf")?;
        std::fs::write(dir.join("cgroup.conf"), CGROUP_CONF).context("cannot write cgroup.conf")?;

        let key = dir.join("munge.key");
        let out = Command::new("mungekey")
            .arg("--create")
            .arg(format!("--keyfile={}", key.display()))
            .output()
            .context("cannot run mungekey")?;
        if !out.status.success() {
            bail!("mungekey: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let mut munged = Command::new("munged");
        munged.arg("--foreground").args(
            [
                ("socket", "munge.socket"),
                ("key-file", "munge.key"),
                ("pid-file", "munged.pid"),
                ("seed-file", "munged.seed"),
                ("log-file", "munged.log"),
            ]
            .map(|(flag, file)| format!("--{flag}={}", dir.join(file).display())),
        );
        self.daemons.push(("munged".into(), Job::spawn(munged)));
        let socket = dir.join("munge.socket");
        wait_for(&mut self.daemons, || Ok(socket.exists()), "munge's socket")?;

        let mut ctld = Command::new("slurmctld");
        ctld.arg("-D").arg("-f").arg(&self.conf);
        self.daemons.push(("slurmctld".into(), Job::spawn(ctld)));
        for i in 0..self.hosts().len() {
            let name = self.hosts().host(i).name.clone();
            let mut slurmd = self.hosts().command(i, "slurmd");
            slurmd.args(["-D", "-N", &name, "-f"]).arg(&self.conf);
            self.daemons
                .push((format!("slurmd on {name}"), Job::spawn(slurmd)));
        }
        let idle = format!("idle {}", self.hosts().len());
        let conf = self.conf.clone();
        wait_for(
            &mut self.daemons,
            || Ok(node_states(&conf)? == idle),
            "every node to be idle (`sinfo`)",
        )
    }

    /// The hosts the nodes run on.
    pub fn hosts(&self) -> &Hosts {
        self.hosts.as_ref().expect("hosts live until drop")
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("folder lives until drop").path()
    }

    /// A SLURM client command (`sbatch`, `squeue`, `scancel`, …) of this cluster (see
    /// [`client`]).
    pub fn command(&self, program: &str) -> Command {
        client(&self.conf, program)
    }

    /// The state of job `id` (`RUNNING`, `COMPLETING`, …), or `None` once the controller has
    /// forgotten it.
    pub fn job_state(&self, id: &str) -> Option<String> {
        let out = self
            .command("squeue")
            .args(["-h", "-j", id, "-o", "%T"])
            .output()
            .ok()?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!state.is_empty()).then_some(state)
    }

    /// Cancels job `id` (SLURM sends SIGTERM to every step's processes, SIGKILL `KillWait`
    /// = 30 s later).
    pub fn scancel(&self, id: &str) {
        let status = self.command("scancel").arg(id).status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "scancel {id}: {status:?}"
        );
    }

    /// The daemons' process ids (`munged`, `slurmctld`, each `slurmd`).
    pub fn daemon_pids(&self) -> Vec<u32> {
        self.daemons.iter().map(|(_, d)| d.pid()).collect()
    }

    /// The daemons' log files, for a failure's message.
    pub fn logs(&self) -> String {
        let Some(dir) = &self.dir else {
            return String::new();
        };
        let mut text = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default();
        files.sort();
        for file in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "log"))
        {
            let log = std::fs::read_to_string(file).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            text.push_str(&format!("--- {}\n", file.display()));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        if !self.daemons.is_empty() {
            // Every job of this cluster (its controller knows no other).
            let _ = self
                .command("scancel")
                .args(["--user", "root"])
                .stderr(std::process::Stdio::null())
                .status();
        }
        let pids = self.daemon_pids();
        for &pid in pids.iter().rev() {
            kill(pid, "-TERM");
        }
        let deadline = Instant::now() + STOP_LIMIT;
        while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Each Job's drop kills what is left of it (SIGKILL) and reaps it.
        while let Some((_, daemon)) = self.daemons.pop() {
            drop(daemon);
        }
        // The hosts' teardown kills whatever the nodes still run (job steps included).
        self.hosts.take();
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!("slurm: cannot remove {}: {e}", path.display());
            }
        }
    }
}
