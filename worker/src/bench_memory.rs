//! `coca-worker bench-memory`: bytes of parameters, kept gradients and optimizer state one rank
//! holds under each ZeRO and tensor-parallel layout, read from the buffers of a real
//! [`Trainer`] built for that layout, next to the ideal (the one-process figure ÷ the degrees
//! that split it) and to [`crate::memory_estimate`]'s estimate at the given batch and
//! activation checkpointing.
//!
//! With a batch, a one-process training step is also measured, and one member's step of each
//! tensor-parallel degree asked for (its peers stood in for, see [`EchoGroup`]): the peak
//! resident bytes of a step (after a warm-up step, with the allocator's free memory handed back
//! and the kernel's peak reset) beside the estimate of the same figures.
//!
//! Building a model or a trainer only asks its groups for their rank and size, so a rank of an
//! 8-way sharding group is built here without the other seven: [`LayoutOnly`] answers rank and size
//! and refuses every collective.

use crate::bench::random_batch;
use crate::comm::HostTransport;
use crate::memory_estimate::{estimate, MemoryEstimate, OpsPath};
use crate::model::autocast::Autocast;
use crate::model::tensor_parallel::TensorParallel;
use crate::model::{CoCa, CocaConfig, CocaLossConfig};
use crate::resident_memory::{peak_resident_bytes, reset_peak, resident_bytes};
use crate::train::adamw::AdamWConfig;
use crate::train::groups::TowerGroups;
use crate::train::schedule::CosineSchedule;
use crate::train::trainable::{trainable_model_parallel, TrainableWeights};
use crate::train::trainer::{Trainer, TrainerConfig, TrainerGroups, TrainerMemory, ZeroStage};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use coca_common::collective::{Collective, LayoutOnly, ReduceOp, SingleProcess};
use std::sync::Arc;

/// One parallel layout of the report.
#[derive(Debug, Clone, Copy)]
struct Layout {
    tp: usize,
    sharding: usize,
    stage: Option<ZeroStage>,
}

impl Layout {
    fn name(&self) -> String {
        let zero = match self.stage {
            None => "unsharded".to_string(),
            Some(ZeroStage::One) => format!("stage1 x{}", self.sharding),
            Some(ZeroStage::Two) => format!("stage2 x{}", self.sharding),
        };
        match self.tp {
            1 => zero,
            tp => format!("tp {tp}, {zero}"),
        }
    }
}

/// Member 0 of a tensor-parallel group of `size` whose peers are taken to hold this member's
/// own values, so that one process runs one member's training step: an all-reduce leaves the
/// buffer as it is, an all-gather repeats this member's part, a reduce-scatter keeps its
/// slice. The numbers are not a real group's; the shapes, and so every buffer of the step,
/// are. For measuring one member's memory only.
#[derive(Debug, Clone, Copy)]
struct EchoGroup {
    size: usize,
}

impl Collective for EchoGroup {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, _: &mut [f32], _: ReduceOp) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()> {
        for part in output.chunks_mut(input.len().max(1)) {
            part.copy_from_slice(&input[..part.len()]);
        }
        Ok(())
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], _: ReduceOp) -> Result<()> {
        output.copy_from_slice(&input[..output.len()]);
        Ok(())
    }

    fn broadcast(&self, _: &mut [f32], _: usize) -> Result<()> {
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// A group of `size` seen from its member 0 (a group of one needs no stand-in).
fn stand_in(size: usize) -> Arc<dyn Collective> {
    if size == 1 {
        Arc::new(SingleProcess)
    } else {
        Arc::new(LayoutOnly { rank: 0, size })
    }
}

/// What `bench-memory` reports on.
#[derive(Debug, Clone)]
pub struct MemoryBenchOptions {
    /// A built-in config name or a config JSON file.
    pub model: String,
    /// Sharding degrees to report.
    pub sharding: Vec<usize>,
    /// Tensor-parallel degrees to report.
    pub tensor_parallel: Vec<usize>,
    /// Samples per micro-batch: the estimate's activations, and (above 0) a measured step.
    pub batch: usize,
    /// Activation checkpointing (`--grad_checkpointing`), for the estimate and the step.
    pub grad_checkpointing: bool,
    /// The matrix products' dtype (`--bf16`/`--fp16`: autocast), for the estimate and the step.
    pub compute: DType,
    /// Where the measured step runs (`--device`): resident bytes on the CPU, the memory pool's
    /// bytes on a GPU.
    pub device: Device,
}

/// The optimizer settings of the report's trainers (they do not change any buffer's size).
fn trainer_config() -> TrainerConfig {
    TrainerConfig {
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        schedule: CosineSchedule {
            warmup_steps: 0,
            total_steps: 2,
        },
        loss: CocaLossConfig::default(),
        span: Default::default(),
        buffers: crate::comm::PlacementRule::Auto,
    }
}

/// The report, one JSON line per layout (rank 0 of each; the others differ by < 1 block): every
/// ZeRO stage at each of `sharding` degrees, each of `tensor_parallel` degrees unsharded and
/// with stage 2 at the largest sharding degree. The ideal is the one-process figure ÷ the
/// degrees that split it; the estimate is [`estimate`]'s at the batch. With a batch, the
/// one-process line also has the measured step (see [`measure_step`]).
pub fn run(opts: &MemoryBenchOptions) -> Result<Vec<serde_json::Value>> {
    let config = CocaConfig::resolve(&opts.model)?;
    // First, while the heap holds nothing else: one process's step, and one member's of each
    // tensor-parallel degree (its peers stood in for by [`EchoGroup`]).
    let mut measured = Vec::new();
    if opts.batch > 0 {
        let degrees = std::iter::once(1).chain(opts.tensor_parallel.iter().copied());
        for tp in degrees.filter(|&t| t > 0) {
            if measured.iter().all(|&(t, _)| t != tp) {
                let step = measure_step(
                    &config,
                    opts.batch,
                    opts.grad_checkpointing,
                    opts.compute,
                    &opts.device,
                    tp,
                )
                .with_context(|| format!("tensor-parallel degree {tp}"))?;
                measured.push((tp, step));
            }
        }
    }
    let rule = TowerGroups::uniform(1e-5, 0.1);
    let mut layouts = vec![Layout {
        tp: 1,
        sharding: 1,
        stage: None,
    }];
    for &d in opts.sharding.iter().filter(|&&d| d > 1) {
        for stage in [ZeroStage::One, ZeroStage::Two] {
            layouts.push(Layout {
                tp: 1,
                sharding: d,
                stage: Some(stage),
            });
        }
    }
    let widest = opts.sharding.iter().copied().max().unwrap_or(1);
    for &tp in opts.tensor_parallel.iter().filter(|&&t| t > 1) {
        layouts.push(Layout {
            tp,
            sharding: 1,
            stage: None,
        });
        if widest > 1 {
            layouts.push(Layout {
                tp,
                sharding: widest,
                stage: Some(ZeroStage::Two),
            });
        }
    }
    let mut lines = Vec::new();
    let mut unsharded = None;
    let mut built: Option<(usize, CoCa, TrainableWeights)> = None;
    for layout in layouts {
        if built.as_ref().map(|b| b.0) != Some(layout.tp) {
            drop(built.take()); // free the previous model before building the next
            let tp = TensorParallel::layout_only(0, layout.tp);
            let (coca, vars) =
                trainable_model_parallel(&config, None, 0, DType::F32, &Device::Cpu, &tp)?;
            built = Some((layout.tp, coca, vars));
        }
        let Some((_, coca, vars)) = &built else {
            unreachable!("built above")
        };
        let groups = TrainerGroups {
            data: HostTransport::shared(stand_in(layout.sharding)),
            sharding: HostTransport::shared(stand_in(layout.sharding)),
            replicas: HostTransport::single(),
            stage: layout.stage,
        };
        let trainer = Trainer::in_groups(coca.clone(), vars, &rule, trainer_config(), groups)?;
        let m = trainer.memory();
        drop(trainer);
        let base: TrainerMemory = *unsharded.get_or_insert(m);
        let split = layout.tp * layout.sharding;
        let estimated = estimate(
            &config,
            layout.tp,
            layout.sharding,
            layout.stage,
            opts.batch,
            opts.grad_checkpointing,
            opts.compute,
            OpsPath::for_device(&opts.device),
        )?;
        let mut line = serde_json::json!({
            "model": opts.model,
            "layout": layout.name(),
            "batch": opts.batch,
            "grad_checkpointing": opts.grad_checkpointing,
            "compute_dtype": format!("{:?}", opts.compute).to_lowercase(),
            "device": crate::device::device_name(&opts.device),
            "parameters_bytes": m.parameters,
            "gradients_bytes": m.gradients,
            "optimizer_bytes": m.optimizer_state,
            "ideal_parameters_bytes": base.parameters / layout.tp,
            "ideal_gradients_bytes": match layout.stage {
                Some(ZeroStage::Two) => base.gradients / split,
                _ => base.gradients / layout.tp,
            },
            "ideal_optimizer_bytes": base.optimizer_state / split,
            "estimate": estimated,
        });
        let step = measured.iter().find(|&&(tp, _)| tp == layout.tp);
        if let (Some((_, step)), None) = (step, layout.stage) {
            line["measured_step"] = step.report(&estimated, m.gradients as u64);
        }
        lines.push(line);
    }
    Ok(lines)
}

/// Resident bytes of a one-process training step, measured.
#[derive(Debug, Clone, Copy)]
pub struct StepMemory {
    /// Resident before the model was built (the program itself).
    pub baseline: u64,
    /// Resident between steps, above the baseline: weights, flat buffers, optimizer state.
    pub persistent: u64,
    /// The step's peak above the persistent bytes: activations, the backward pass's gradients
    /// and every temporary.
    pub transient: u64,
}

impl StepMemory {
    /// The peak of a step above the baseline.
    pub fn peak(&self) -> u64 {
        self.persistent + self.transient
    }

    /// The figures beside the estimate's: the whole peak against the estimate's total, and the
    /// step's own bytes against the estimate's total less its weights, `kept` gradients and
    /// moments (the activations or the backward pass's gradient, which the pass trades one for
    /// the other, and any half-precision copies).
    fn report(&self, e: &MemoryEstimate, kept_gradients: u64) -> serde_json::Value {
        let error = |estimated: u64, measured: u64| estimated as f64 / measured.max(1) as f64 - 1.0;
        let held = e.parameter_bytes + kept_gradients + e.optimizer_bytes;
        let step_estimate = e.total_bytes.saturating_sub(held);
        serde_json::json!({
            "baseline_bytes": self.baseline,
            "persistent_bytes": self.persistent,
            "transient_bytes": self.transient,
            "peak_bytes": self.peak(),
            "estimate_peak_error": error(e.total_bytes, self.peak()),
            "estimate_transient_error": error(step_estimate, self.transient),
        })
    }
}

/// Where a step's bytes are counted: the process's resident memory on the CPU, the device
/// memory pool's handed-out bytes on a GPU.
struct Probe<'a>(&'a Device);

impl Probe<'_> {
    fn current(&self) -> Result<u64> {
        match crate::cuda_setup::pool_usage(self.0)? {
            Some((current, _)) => Ok(current),
            None => resident_bytes(),
        }
    }

    fn peak(&self) -> Result<u64> {
        match crate::cuda_setup::pool_usage(self.0)? {
            Some((current, high)) => Ok(high.max(current)),
            None => Ok(peak_resident_bytes()?.max(resident_bytes()?)),
        }
    }

    /// Hands freed memory back (CPU) and restarts the peak from now.
    fn reset(&self) -> Result<()> {
        match self.0.is_cuda() {
            true => crate::cuda_setup::reset_pool_peak(self.0),
            false => reset_peak(),
        }
    }
}

/// Builds a one-process trainer for `config` on `device` (member 0 of a `tp`-way tensor-parallel
/// group above 1, its peers stood in for by [`EchoGroup`]) and measures a training step
/// (forward, backward, update) on a random batch: a warm-up step touches every buffer; then
/// the peak is reset (on the CPU after freed memory went back to the kernel) and a second step
/// is measured.
pub fn measure_step(
    config: &CocaConfig,
    batch: usize,
    grad_checkpointing: bool,
    compute: DType,
    device: &Device,
    tp: usize,
) -> Result<StepMemory> {
    let probe = Probe(device);
    // Memory an earlier measurement freed goes back first.
    probe.reset()?;
    let baseline = probe.current()?;
    let group = match tp {
        1 => TensorParallel::single(),
        size => TensorParallel::new(Arc::new(EchoGroup { size })),
    };
    let (mut model, vars) = trainable_model_parallel(
        config,
        None,
        0,
        DType::F32,
        device,
        &group.with_autocast(Autocast::new(compute)),
    )?;
    model.set_grad_checkpointing(grad_checkpointing);
    let rule = TowerGroups::uniform(1e-5, 0.1);
    let mut trainer = Trainer::new(model, &vars, &rule, trainer_config())?;
    drop(vars);
    let (images, text) = random_batch(config, batch, device)?;
    let mut step = || -> Result<()> {
        trainer.backward(&images, &text, 1.0)?;
        trainer.update()?;
        Ok(())
    };
    step().context("warm-up step")?;
    probe.reset()?;
    let before = probe.current()?;
    step().context("measured step")?;
    let peak = probe.peak()?;
    Ok(StepMemory {
        baseline,
        persistent: before.saturating_sub(baseline),
        transient: peak.saturating_sub(before),
    })
}
