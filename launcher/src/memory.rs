//! The node's memory as the launcher sees it: what the workers may use before they start, and
//! whether a worker that died of SIGKILL was killed by the kernel's OOM killer.
//!
//! Available memory is `/proc/meminfo`'s `MemAvailable`, lowered to the headroom of this
//! process's memory cgroup (limit − usage; cgroup v2 `memory.max`/`memory.current`, v1
//! `memory.limit_in_bytes`/`memory.usage_in_bytes`) when it has a limit, as under SLURM or a
//! container. `--node-memory` overrides both.
//!
//! OOM kills are counted, not observed: the kernel log (`/dev/kmsg`) is usually not readable by
//! a job, so the launcher compares counters from before the workers started with those after a
//! worker died of SIGKILL: the cgroup's `oom_kill` (v2 `memory.events`, v1
//! `memory.oom_control`, kernel 4.13+), which counts kills inside this job's cgroup, and
//! `/proc/vmstat`'s `oom_kill`, which counts every kill on the host. The host counter can blame
//! a SIGKILL on another process's OOM kill at the same moment; the cgroup counter cannot, but it
//! only exists where the job has its own cgroup.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Memory the workers of this node may use, and where the figure came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMemory {
    pub bytes: u64,
    pub source: String,
}

/// `MemAvailable` in bytes from the text of `/proc/meminfo`.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This process's memory cgroup folder and whether it is cgroup v2.
fn cgroup_dir() -> Option<(PathBuf, bool)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            let dir = PathBuf::from("/sys/fs/cgroup/memory").join(path);
            if dir.is_dir() {
                return Some((dir, false));
            }
        }
        if id == "0" && controllers.is_empty() {
            let dir = PathBuf::from("/sys/fs/cgroup").join(path);
            if dir.join("memory.max").is_file() {
                return Some((dir, true));
            }
        }
    }
    None
}

fn read_u64(path: PathBuf) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Limit − usage of this process's memory cgroup, when it has a limit below 2^60.
fn cgroup_headroom() -> Option<u64> {
    let (dir, v2) = cgroup_dir()?;
    let (limit, usage) = if v2 {
        (
            read_u64(dir.join("memory.max"))?,
            read_u64(dir.join("memory.current"))?,
        )
    } else {
        (
            read_u64(dir.join("memory.limit_in_bytes"))?,
            read_u64(dir.join("memory.usage_in_bytes"))?,
        )
    };
    (limit < 1 << 60).then(|| limit.saturating_sub(usage))
}

/// The memory this node's workers may use: `--node-memory` when given, else `MemAvailable`
/// lowered to the cgroup's headroom.
pub fn available(flag: Option<&str>) -> Result<NodeMemory> {
    if let Some(v) = flag {
        return Ok(NodeMemory {
            bytes: parse_size(v).with_context(|| format!("--node-memory {v:?}"))?,
            source: "--node-memory".to_string(),
        });
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    let avail = mem_available(&meminfo).context("/proc/meminfo has no MemAvailable")?;
    Ok(match cgroup_headroom() {
        Some(h) if h < avail => NodeMemory {
            bytes: h,
            source: "the memory cgroup's limit minus its usage".to_string(),
        },
        _ => NodeMemory {
            bytes: avail,
            source: "MemAvailable in /proc/meminfo".to_string(),
        },
    })
}

/// `24GiB`, `24G`, `512MiB`, `1.5T` (powers of 1024) or plain bytes.
pub fn parse_size(v: &str) -> Result<u64> {
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("{v:?} is not a size such as 24GiB"))?;
    let shift = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        other => bail!("unknown unit {other:?} in {v:?} (use K, M, G or T)"),
    };
    Ok((number * (1u64 << shift) as f64) as u64)
}

/// `n` bytes in GiB, for messages.
pub fn gib(n: u64) -> String {
    format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64)
}

/// OOM-kill counters at one moment: this cgroup's and the host's (`None` when unreadable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OomCounters {
    pub cgroup: Option<u64>,
    pub host: Option<u64>,
}

/// The `oom_kill N` line of a counters file.
fn oom_kill_line(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

impl OomCounters {
    /// Reads both counters now.
    pub fn read() -> Self {
        let cgroup = cgroup_dir().and_then(|(dir, v2)| {
            let file = if v2 {
                "memory.events"
            } else {
                "memory.oom_control"
            };
            oom_kill_line(&std::fs::read_to_string(dir.join(file)).ok()?)
        });
        let host = std::fs::read_to_string("/proc/vmstat")
            .ok()
            .and_then(|t| oom_kill_line(&t));
        Self { cgroup, host }
    }

    /// Whether an OOM kill happened between `self` (earlier) and `later`.
    pub fn oom_kill_since(&self, later: &OomCounters) -> bool {
        let grew = |a: Option<u64>, b: Option<u64>| matches!((a, b), (Some(a), Some(b)) if b > a);
        grew(self.cgroup, later.cgroup) || grew(self.host, later.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_meminfo_and_counters() {
        assert_eq!(parse_size("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_size("24G").unwrap(), 24 << 30);
        assert_eq!(parse_size("1.5 T").unwrap(), 3 << 39);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("24 parsecs").is_err());
        let meminfo = "MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable:   13410836 kB\n";
        assert_eq!(mem_available(meminfo), Some(13_410_836 * 1024));
        assert_eq!(
            oom_kill_line("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"),
            Some(3)
        );
        let before = OomCounters {
            cgroup: Some(3),
            host: Some(10),
        };
        let same = before;
        assert!(!before.oom_kill_since(&same));
        let cgroup_kill = OomCounters {
            cgroup: Some(4),
            ..before
        };
        assert!(before.oom_kill_since(&cgroup_kill));
        let host_kill = OomCounters {
            cgroup: None,
            host: Some(11),
        };
        assert!(before.oom_kill_since(&host_kill));
        // The real counters read without error and do not move by themselves.
        let now = OomCounters::read();
        assert!(!now.oom_kill_since(&now));
        assert!(available(None).unwrap().bytes > 0);
    }
}
