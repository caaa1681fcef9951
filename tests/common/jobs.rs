//! Launcher jobs in tests: started in the background, their output collected, their worker
//! processes found through /proc, and everything killed when the handle is dropped.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `coca-launch` (or any binary) with its output captured.
pub struct Job {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn collect(
    mut from: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
}

impl Job {
    /// Starts `bin` (a workspace binary) with `args`.
    pub fn start(bin: &str, args: &[String]) -> Job {
        Self::start_with_env(bin, args, &[])
    }

    /// Like [`Self::start`], with extra environment variables.
    pub fn start_with_env(bin: &str, args: &[String], env: &[(&str, &str)]) -> Job {
        let mut command = Command::new(super::binary(bin));
        command.args(args).envs(env.iter().copied());
        Self::spawn(command)
    }

    /// Starts `command` (stdin closed, output captured).
    pub fn spawn(mut command: Command) -> Job {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let (stdout, stderr) = (Arc::default(), Arc::default());
        let readers = vec![
            collect(child.stdout.take().unwrap(), Arc::clone(&stdout)),
            collect(child.stderr.take().unwrap(), Arc::clone(&stderr)),
        ];
        Job {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Output so far (stdout, stderr).
    pub fn output(&self) -> (String, String) {
        (
            self.stdout.lock().unwrap().clone(),
            self.stderr.lock().unwrap().clone(),
        )
    }

    /// Waits up to `limit` for the exit code (`None`: still running at the limit).
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                use std::os::unix::process::ExitStatusExt;
                return Some(status.code().unwrap_or(128 + status.signal().unwrap_or(0)));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `limit`, panicking with the output when the job does not end.
    pub fn finish(&mut self, limit: Duration) -> (i32, String, String) {
        match self.wait(limit) {
            Some(code) => {
                let (out, err) = self.output();
                (code, out, err)
            }
            None => {
                let (out, err) = self.output();
                panic!("the job did not end within {limit:?}\n{out}\n{err}");
            }
        }
    }

    /// Sends `signal` to the launcher itself.
    pub fn signal(&self, signal: &str) {
        kill(self.pid(), signal);
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // Workers die with their launcher (parent-death signal); kill the whole tree anyway.
        for pid in descendants(self.pid()) {
            kill(pid, "-9");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal (`-9`, `-TERM`, ...) with kill(1).
pub fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status();
}

/// Parent pid and state letter of a process, from /proc/<pid>/stat.
fn stat(pid: u32) -> Option<(u32, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    matches!(stat(pid), Some((_, s)) if s != 'Z' && s != 'X')
}

/// Every live descendant of `pid`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let mut frontier = vec![pid];
    let procs: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| Some((p, stat(p)?.0)))
                .collect()
        })
        .unwrap_or_default();
    while let Some(parent) = frontier.pop() {
        for &(p, pp) in &procs {
            if pp == parent && alive(p) {
                all.push(p);
                frontier.push(p);
            }
        }
    }
    all
}

/// The value of `name` in the environment of process `pid`.
pub fn env_of(pid: u32, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{name}=")).map(str::to_string)
    })
}

/// The worker process of global `rank` under launcher `launcher_pid`, waiting up to `limit`.
pub fn worker_pid(launcher_pid: u32, rank: usize, limit: Duration) -> u32 {
    let deadline = Instant::now() + limit;
    loop {
        for pid in descendants(launcher_pid) {
            if env_of(pid, "RANK").as_deref() == Some(rank.to_string().as_str()) {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no worker of rank {rank} appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `path` exists.
pub fn wait_for_path(path: &std::path::Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A UDP port that was free a moment ago (for a simulated multi-node job's control plane).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Launcher flags of node `node` of a job of `nnodes` (`N` or `MIN:MAX`) whose nodes all run on
/// this machine, with node 0's control plane on 127.0.0.1:`port`.
pub fn loopback_node_flags(
    nnodes: &str,
    node: usize,
    port: &str,
    token: &str,
    log_dir: &std::path::Path,
    extra: &[&str],
) -> Vec<String> {
    let node = node.to_string();
    let mut flags = vec![
        "--nnodes",
        nnodes,
        "--node-rank",
        &node,
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        port,
        "--rdzv-token",
        token,
        "--log-dir",
        log_dir.to_str().unwrap(),
    ];
    flags.extend_from_slice(extra);
    flags.iter().map(|s| s.to_string()).collect()
}
