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
    /// The workers compute on GPUs: `estimate` is of device memory, and only
    /// [`MemoryEstimate::host_bytes`] of it lives on the host.
    #[serde(default)]
    pub on_gpu: bool,
}

#[derive(serde::Deserialize)]
struct Answer {
    memory: Option<MemoryAnswer>,
}

/// Runs `worker check-args -- worker_args` as rank 0 of `world`, with extra environment
/// variables (the device kind the workers will get; a generation's batch); its error message
/// goes straight to the launcher's stderr, once.
pub fn check_worker_command(
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

/// Refuses a layout whose `nproc` workers cannot fit in `node`, naming the numbers. GPU
/// workers are held to what they keep on the host (each checks its device estimate against
/// its own GPU when it starts).
pub fn check_memory(answer: &MemoryAnswer, nproc: usize, node: &NodeMemory) -> Result<()> {
    let e = &answer.estimate;
    let per_worker = e.host_bytes(answer.on_gpu);
    let need = per_worker.saturating_mul(nproc as u64);
    if need <= node.bytes {
        let on_each_gpu = match answer.on_gpu {
            true => format!(" (and an estimated {} on each GPU)", gib(e.total_bytes)),
            false => String::new(),
        };
        tracing::info!(
            "memory: {nproc} worker(s) x {} estimated on the host = {} of {} available{on_each_gpu}",
            gib(per_worker),
            gib(need),
            gib(node.bytes),
        );
        return Ok(());
    }
    if answer.on_gpu {
        bail!(
            "this layout does not fit in this node's memory: {nproc} GPU worker(s) x {} of \
             weights read on the host ({}, {} parameters each) = {} needed, {} available ({}).\n  \
             Use fewer workers per node, --tensor_parallel_degree, or more memory; \
             --node-memory SIZE overrides the available figure",
            gib(per_worker),
            answer.model,
            e.parameters,
            gib(need),
            gib(node.bytes),
            node.source,
        );
    }
    bail!(
        "this layout does not fit in this node's memory: {nproc} worker(s) x {} = {} needed, {} \
         available ({}).\n  Each worker of {} ({} parameters on it): parameters {}, gradients {}, AdamW moments {}, activations at batch {} {}.\n  \
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
        gib(e.gradient_bytes),
        gib(e.optimizer_bytes),
        answer.per_device_train_batch_size,
        gib(e.activation_bytes),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(on_gpu: bool) -> MemoryAnswer {
        // An L-14-sized worker: 2.4 GiB of weights, 60 GiB in all.
        let gib = 1u64 << 30;
        MemoryAnswer {
            estimate: MemoryEstimate {
                parameters: 638_450_177,
                parameter_bytes: 12 * gib / 5,
                gradient_bytes: 24 * gib / 5,
                optimizer_bytes: 24 * gib / 5,
                compute_copy_bytes: 0,
                activation_bytes: 45 * gib,
                total_bytes: 60 * gib,
            },
            per_device_train_batch_size: 64,
            model: "coca_ViT-L-14".to_string(),
            on_gpu,
        }
    }

    #[test]
    fn gpu_workers_are_held_to_the_weights_they_read_on_the_host() {
        let node = NodeMemory {
            bytes: 128 << 30,
            source: "--node-memory".to_string(),
        };
        // Eight GPU workers fit a 128 GiB host (8 × 2.4 GiB) that eight CPU workers do not.
        check_memory(&answer(true), 8, &node).unwrap();
        let cpu = check_memory(&answer(false), 8, &node)
            .unwrap_err()
            .to_string();
        assert!(cpu.contains("8 worker(s) x 60.0 GiB"), "{cpu}");
        // Sixty GPU workers' weights do not.
        let gpu = check_memory(&answer(true), 60, &node)
            .unwrap_err()
            .to_string();
        for needle in [
            "60 GPU worker(s) x 2.4 GiB of weights read on the host",
            "coca_ViT-L-14, 638450177 parameters each",
            "128.0 GiB available (--node-memory)",
        ] {
            assert!(gpu.contains(needle), "{needle:?} missing: {gpu}");
        }
    }
}
