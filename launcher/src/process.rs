//! One worker process: started in its own process group with a parent-death signal, its output
//! copied line by line to `workerlog.<rank>` (and to the console for local rank 0), the last
//! lines kept for the failure summary.

use anyhow::{Context, Result};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Lines of a worker's output kept for the failure summary.
pub const TAIL_LINES: usize = 12;

/// How a worker is started.
pub struct WorkerSpec<'a> {
    pub binary: &'a Path,
    pub args: &'a [String],
    pub env: Vec<(String, String)>,
    pub rank: usize,
    pub log_dir: &'a Path,
    /// Copy the output to the launcher's stdout with a `[rank N]` prefix.
    pub echo: bool,
}

/// A started worker.
pub struct WorkerProcess {
    pub rank: usize,
    pub pid: u32,
    pub log_path: PathBuf,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    pump: Option<JoinHandle<()>>,
    /// Set once the process has been reaped.
    pub status: Option<ExitStatus>,
}

impl WorkerProcess {
    /// Starts the worker. Must be called from a thread that lives as long as the launcher: the
    /// parent-death signal fires when the *thread* that forked the child exits.
    pub fn spawn(spec: WorkerSpec) -> Result<Self> {
        let log_path = spec.log_dir.join(format!("workerlog.{}", spec.rank));
        let mut log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create the log {}", log_path.display()))?;
        let (reader, writer) = std::io::pipe().context("cannot create a pipe for a worker")?;
        let mut command = Command::new(spec.binary);
        command
            .args(spec.args)
            .envs(spec.env)
            .stdin(Stdio::null())
            .stdout(writer.try_clone().context("cannot duplicate a pipe")?)
            .stderr(writer);
        let launcher_pid = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Own process group: signals reach the worker and anything it starts, and a
                // Ctrl-C on the terminal goes to the launcher, which then stops workers in order.
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The launcher may have died before the signal was armed.
                if libc::getppid() != launcher_pid {
                    return Err(std::io::Error::other("the launcher exited"));
                }
                Ok(())
            });
        }
        let child = command.spawn().with_context(|| {
            format!(
                "cannot start {} for rank {}",
                spec.binary.display(),
                spec.rank
            )
        })?;
        // The launcher's copies of the pipe's write end must go, or the pump never sees EOF.
        drop(command);
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let pump_tail = tail.clone();
        let (rank, mut echo) = (spec.rank, spec.echo);
        let echo_log = log_path.clone();
        let pump = std::thread::Builder::new()
            .name(format!("log-rank-{rank}"))
            .spawn(move || {
                let mut reader = BufReader::new(reader);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match reader.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let _ = log.write_all(&line);
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']);
                    // A closed standard output (`coca-launch ... | head`) stops the echo, not
                    // the pump: the worker's lines still reach its log file.
                    if echo && writeln!(std::io::stdout().lock(), "[rank {rank}] {text}").is_err() {
                        echo = false;
                        eprintln!(
                            "coca-launch: standard output is closed; rank {rank}'s output \
                             continues in {}",
                            echo_log.display()
                        );
                    }
                    if let Ok(mut t) = pump_tail.lock() {
                        if t.len() == TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(text.to_string());
                    }
                }
                let _ = log.flush();
            })
            .context("cannot start a log thread")?;
        Ok(Self {
            rank: spec.rank,
            pid: child.id(),
            log_path,
            child,
            tail,
            pump: Some(pump),
            status: None,
        })
    }

    /// The exit status if the worker has exited (reaping it).
    pub fn poll(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for rank {} (pid {})", self.rank, self.pid))?;
            if self.status.is_some() {
                // The pipe closes with the process; let the pump finish the last lines.
                if let Some(pump) = self.pump.take() {
                    let _ = pump.join();
                }
            }
        }
        Ok(self.status)
    }

    /// Sends `signal` to the worker's process group (no-op once reaped).
    pub fn signal(&self, signal: i32) {
        if self.status.is_none() {
            // SAFETY: plain kill(2) on the group this launcher created.
            unsafe {
                libc::kill(-(self.pid as libc::pid_t), signal);
            }
        }
    }

    /// The last lines the worker printed.
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// An exit status in words and as the launcher's exit code (128 + signal, as shells do).
pub fn describe(status: ExitStatus) -> (String, i32) {
    match (status.code(), status.signal()) {
        (Some(code), _) => (format!("exit code {code}"), code),
        (None, Some(sig)) => (format!("signal {sig} ({})", signal_name(sig)), 128 + sig),
        _ => ("unknown exit".to_string(), 1),
    }
}

/// The usual name of a signal number.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}
