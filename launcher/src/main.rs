//! `coca-launch`: starts one `coca-worker` per device and supervises it.
//!
//! This build runs a single local worker (one node, one process); multi-process and multi-node
//! launching arrive with the control plane. Asking for more is an error, never silently ignored.

use anyhow::{bail, Context, Result};
use coca_common::topology::Topology;
use std::process::{Command, ExitCode};

fn parse_count(flag: &str, value: Option<&String>) -> Result<usize> {
    let value = value.with_context(|| format!("{flag} needs a value"))?;
    value
        .parse::<usize>()
        .with_context(|| format!("{flag} must be a positive integer, got {value:?}"))
}

/// The value of a worker flag such as `--tensor_parallel_degree N` (either spelling, `=` or
/// separate), 1 when absent.
fn degree_flag(worker_args: &[String], name: &str) -> Result<usize> {
    let spellings = [format!("--{name}"), format!("--{}", name.replace('_', "-"))];
    let mut value = None;
    for (i, arg) in worker_args.iter().enumerate() {
        for flag in &spellings {
            if arg == flag {
                value = worker_args.get(i + 1).cloned();
            } else if let Some(v) = arg.strip_prefix(&format!("{flag}=")) {
                value = Some(v.to_string());
            }
        }
    }
    match value {
        None => Ok(1),
        Some(v) => v
            .parse()
            .with_context(|| format!("--{name} must be a positive integer, got {v:?}")),
    }
}

fn run() -> Result<i32> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args.iter().position(|a| a == "--");
    let (launcher_args, worker_args) = match split {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => bail!("usage: coca-launch [--nnodes N] [--nproc-per-node N] -- WORKER-COMMAND ..."),
    };
    let mut nnodes = 1;
    let mut nproc = 1;
    let mut it = launcher_args.iter();
    while let Some(flag) = it.next() {
        match flag.replace('_', "-").as_str() {
            "--nnodes" => nnodes = parse_count(flag, it.next())?,
            "--nproc-per-node" => nproc = parse_count(flag, it.next())?,
            other => bail!("unknown launcher flag {other:?}"),
        }
    }
    let tp = degree_flag(worker_args, "tensor_parallel_degree")?;
    let sharding = degree_flag(worker_args, "sharding_parallel_degree")?;
    // Checked before anything starts, so a bad layout fails in the launcher with the arithmetic.
    let topology = Topology::new(nnodes * nproc, tp, sharding)?;
    if topology.world != 1 {
        bail!(
            "this build launches one local worker only (asked for --nnodes {nnodes} × \
             --nproc-per-node {nproc}); multi-process launching is not available yet"
        );
    }
    if worker_args.is_empty() {
        bail!("no worker command after `--`");
    }
    let worker = coca_common::worker_binary::worker_beside_current_exe()?;
    let status = Command::new(&worker)
        .args(worker_args)
        .env("RANK", "0")
        .env("LOCAL_RANK", "0")
        .env("WORLD_SIZE", "1")
        .env("LOCAL_WORLD_SIZE", "1")
        .status()
        .with_context(|| format!("cannot start {}", worker.display()))?;
    Ok(status.code().unwrap_or(1))
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("coca-launch: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
