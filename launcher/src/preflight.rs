//! Before any worker starts: the worker's own check of its command (`coca-worker check-args`,
//! run once: flags, data, evaluation folder, output folder, layout — everything that needs no
//! model) and, for a training command, its memory estimate against the node's memory.

use crate::memory::{gib, NodeMemory};
use anyhow::{bail, Context, Result};
use coca_common::memory_estimate::MemoryEstimate;
use std::path::Path;
use std::process::{Command, Stdio};

/// The worker refused its command; it has printed why, so the launcher only passes its exit
/// code on.
#[derive(Debug, thiserror::Error)]
#[error("the worker command was refused (exit code {0})")]
pub struct Refused(pub i32);

/// A training command's estimate, as `check-args` prints it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct MemoryAnswer {
    pub estimate: MemoryEstimate,
    pub per_device_train_batch_size: usize,
    pub model: String,
}

#[derive(serde::Deserialize)]
struct Answer {
    memory: Option<MemoryAnswer>,
}

/// Runs `worker check-args -- worker_args` as rank 0 of `world`; its error message goes
/// straight to the launcher's stderr, once.
pub fn check_worker_command(
    worker: &Path,
    worker_args: &[String],
    world: usize,
) -> Result<Option<MemoryAnswer>> {
    check_worker_command_with(worker, worker_args, world, &[])
}

/// [`check_worker_command`] with extra environment variables (as a generation's workers get).
pub fn check_worker_command_with(
    worker: &Path,
    worker_args: &[String],
    world: usize,
    env: &[(&str, String)],
) -> Result<Option<MemoryAnswer>> {
    let out = Command::new(worker)
        .arg("check-args")
        .arg("--")
        .args(worker_args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("WORLD_SIZE", world.to_string())
        .env("RANK", "0")
        .env_remove("COCA_CONTROL_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {} check-args", worker.display()))?;
    if !out.status.success() {
        bail!(Refused(out.status.code().unwrap_or(2)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let answer: Answer = serde_json::from_str(text.lines().last().unwrap_or_default())
        .with_context(|| {
            format!(
                "unexpected answer from {} check-args: {text:?}",
                worker.display()
            )
        })?;
    Ok(answer.memory)
}

/// Refuses a layout whose `nproc` workers cannot fit in `node`, naming the numbers.
pub fn check_memory(answer: &MemoryAnswer, nproc: usize, node: &NodeMemory) -> Result<()> {
    let e = &answer.estimate;
    let need = e.total_bytes.saturating_mul(nproc as u64);
    if need <= node.bytes {
        tracing::info!(
            "memory: {nproc} worker(s) x {} estimated = {} of {} available",
            gib(e.total_bytes),
            gib(need),
            gib(node.bytes)
        );
        return Ok(());
    }
    bail!(
        "this layout does not fit in this node's memory: {nproc} worker(s) x {} = {} needed, {} \
         available ({}).\n  Each worker of {} ({} parameters on it): parameters {}, their second \
         copy in the model {}, gradients {}, AdamW moments {}, activations at batch {} {}.\n  \
         Use fewer workers per node, ZeRO (--sharding stage2 --sharding_parallel_degree N) or \
         --tensor_parallel_degree, a smaller --per_device_train_batch_size, or more memory; \
         --node-memory SIZE overrides the available figure",
        gib(e.total_bytes),
        gib(need),
        gib(node.bytes),
        node.source,
        answer.model,
        e.parameters,
        gib(e.parameter_bytes),
        gib(e.model_copy_bytes),
        gib(e.gradient_bytes),
        gib(e.optimizer_bytes),
        answer.per_device_train_batch_size,
        gib(e.activation_bytes),
    )
}
