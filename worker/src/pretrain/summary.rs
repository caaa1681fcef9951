//! The block rank 0 prints before step 1: what is about to be trained, on what, how, and where
//! the results go, so that a wrong model, data set or layout shows before the first step.

use coca_common::memory_estimate::MemoryEstimate;
use std::fmt;

/// Where the starting weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightsOrigin {
    /// Initialised from the seed.
    Random { seed: u64 },
    /// Loaded from a checkpoint file (or named source).
    Loaded { from: String },
    /// Resumed from a training checkpoint.
    Resumed { dir: String, step: u64 },
}

impl fmt::Display for WeightsOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Random { seed } => write!(f, "random initialisation (seed {seed})"),
            Self::Loaded { from } => write!(f, "loaded from {from}"),
            Self::Resumed { dir, step } => write!(f, "resumed from {dir} (step {step})"),
        }
    }
}

/// Everything the block shows.
#[derive(Debug, Clone)]
pub struct StartupSummary {
    pub model: String,
    pub parameters: usize,
    pub weights: WeightsOrigin,
    pub data: String,
    /// Samples this rank's source holds.
    pub samples: usize,
    /// Whether `samples` is only rank 0's share (sets split by file).
    pub samples_per_rank: bool,
    pub world: usize,
    pub dp: usize,
    pub sharding: usize,
    /// `stage1`, `stage2` or empty.
    pub zero_stage: String,
    pub tp: usize,
    pub per_device_batch: usize,
    pub accumulation: usize,
    /// Samples per optimizer step over the whole job.
    pub global_batch: usize,
    pub start_step: u64,
    pub total_steps: u64,
    pub steps_per_epoch: usize,
    /// `fp32`, `bf16 (autocast)` or `fp16 O1 (autocast, loss scaling)`.
    pub precision: String,
    /// Activation checkpointing (`--grad_checkpointing`).
    pub grad_checkpointing: bool,
    /// This rank's memory estimate for the precision, checkpointing, batch and layout.
    pub memory: MemoryEstimate,
    pub output_dir: String,
}

impl fmt::Display for StartupSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let share = if self.samples_per_rank {
            " on rank 0 (split by file)"
        } else {
            ""
        };
        let zero = if self.zero_stage.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.zero_stage)
        };
        writeln!(f, "pretrain:")?;
        writeln!(
            f,
            "  model       {} ({} parameters)",
            self.model,
            thousands(self.parameters)
        )?;
        writeln!(f, "  weights     {}", self.weights)?;
        writeln!(f, "  data        {}", self.data)?;
        writeln!(f, "  samples     {}{share}", thousands(self.samples))?;
        writeln!(
            f,
            "  layout      world {} = dp {} x sharding {}{zero} x tp {}",
            self.world, self.dp, self.sharding, self.tp
        )?;
        writeln!(
            f,
            "  batch       global {} = {} per device x {} data ranks x {} accumulation",
            self.global_batch,
            self.per_device_batch,
            self.dp * self.sharding,
            self.accumulation
        )?;
        let resumed = if self.start_step > 0 {
            format!(", from step {}", self.start_step)
        } else {
            String::new()
        };
        writeln!(
            f,
            "  steps       {} ({} per epoch{resumed})",
            self.total_steps, self.steps_per_epoch
        )?;
        writeln!(f, "  precision   {}", self.precision)?;
        let activations = match self.grad_checkpointing {
            true => "recomputed in the backward pass (--grad_checkpointing True)",
            false => "kept for the backward pass",
        };
        writeln!(f, "  activations {activations}")?;
        writeln!(
            f,
            "  memory      per rank (estimate): {}",
            self.memory.by_part()
        )?;
        write!(f, "  output      {}", self.output_dir)
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_names_every_setting() {
        let s = StartupSummary {
            model: "coca_ViT-L-14".into(),
            parameters: 638_450_177,
            weights: WeightsOrigin::Random { seed: 42 },
            data: "COCO".into(),
            samples: 566_747,
            samples_per_rank: false,
            world: 8,
            dp: 1,
            sharding: 8,
            zero_stage: "stage2".into(),
            tp: 1,
            per_device_batch: 16,
            accumulation: 1,
            global_batch: 128,
            start_step: 0,
            total_steps: 885_600,
            steps_per_epoch: 4_428,
            precision: "fp32".into(),
            grad_checkpointing: true,
            memory: crate::memory_estimate::estimate(
                &crate::model::CocaConfig::resolve("coca_ViT-L-14").unwrap(),
                1,
                8,
                Some(crate::train::trainer::ZeroStage::Two),
                16,
                true,
                candle_core::DType::F32,
                crate::memory_estimate::OpsPath::CpuFused,
            )
            .unwrap(),
            output_dir: "./output".into(),
        };
        let text = s.to_string();
        for needle in [
            "coca_ViT-L-14 (638,450,177 parameters)",
            "random initialisation (seed 42)",
            "data        COCO\n  samples     566,747\n",
            "world 8 = dp 1 x sharding 8 (stage2) x tp 1",
            "global 128 = 16 per device x 8 data ranks x 1 accumulation",
            "885600 (4428 per epoch)",
            "fp32",
            "activations recomputed in the backward pass",
            "memory      per rank (estimate): weights 2.38 + gradients",
            "./output",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from\n{text}");
        }
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(999), "999");
    }
}
