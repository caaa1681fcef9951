//! One optimizer step of a [`TrainingRun`]: the micro-batches' forward and backward passes
//! (gradient accumulation), the update (or its skip on a non-finite loss or gradient), float16's
//! loss scaling, and the step's metrics.

use super::metrics::StepMetrics;
use super::setup::TrainingRun;
use crate::data::loader::LoaderPosition;
use crate::memory_estimate::MemoryEstimate;
use anyhow::{bail, Result};
use candle_core::Device;
use std::time::Instant;

/// Bytes in a GiB, for messages.
const GIB: f64 = (1u64 << 30) as f64;

/// Non-finite steps in a row after which training stops.
const MAX_NONFINITE_IN_A_ROW: u32 = 10;

impl TrainingRun<'_> {
    /// Takes the next optimizer step: `accum` micro-batches, then the update; returns what the
    /// step measured. Stops the run after [`MAX_NONFINITE_IN_A_ROW`] skipped updates in a row
    /// (float16 overflows, the loss scaler's business, do not count).
    pub fn step(&mut self) -> Result<StepMetrics> {
        let started = Instant::now();
        let accum = self.accum as f64;
        let image_size = self.config.vision_cfg.image_size;
        let (mut sums, mut samples, mut finite) = ([0f64; 3], 0usize, true);
        for _ in 0..self.accum {
            let b = self.loader.next_batch()?;
            if b.position.epoch != self.skips.epoch {
                self.skips.report(&self.log);
                self.skips = super::skips::EpochSkips::new(b.position.epoch);
            }
            self.skipped_total += b.skipped.len();
            self.skips.add(b.skipped);
            self.position = next_position(b.position, self.batches_per_epoch);
            let Some(inputs) = b.tensors else {
                continue;
            };
            let images = inputs.images.reshape((b.len, 3, image_size, image_size))?;
            let text = &inputs.tokens;
            let loss_scale = self.scaler.map_or(1.0, |s| s.scale);
            let step = self.trainer.step;
            let loss = self
                .trainer
                .backward(&images, text, loss_scale / accum)
                .map_err(|e| step_error(e, step, b.len, &self.memory, &self.device))?;
            finite &= loss.total.is_finite();
            sums[0] += loss.total / accum;
            sums[1] += loss.contrastive / accum;
            sums[2] += loss.caption / accum;
            samples += b.len;
        }
        let report = if finite {
            let step = self.trainer.step;
            let inject = self.args.precision.fp16_inject_overflow_step == Some(step);
            self.trainer
                .update_scaled(self.scaler.map_or(1.0, |s| s.scale), inject)
                .map_err(|e| step_error(e, step, samples, &self.memory, &self.device))?
        } else {
            self.trainer.skip_update()?
        };
        if let Some(s) = self.scaler.as_mut() {
            let before = s.scale;
            s.update(report.applied);
            if s.scale != before {
                self.log.println(format!(
                    "step {}: loss scale {before} -> {}",
                    report.step + 1,
                    s.scale
                ));
            }
        }
        // A float16 overflow (finite loss, non-finite gradients) is the loss scaler's business.
        let overflow = finite && self.scaler.is_some();
        if !report.applied && !overflow {
            self.nonfinite_in_a_row += 1;
            self.log.println(format!(
                "warning: step {}: non-finite loss or gradient, update skipped ({} in a row)",
                report.step + 1,
                self.nonfinite_in_a_row
            ));
            if self.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW {
                bail!(
                    "{MAX_NONFINITE_IN_A_ROW} non-finite steps in a row at step {}: stopping",
                    report.step + 1
                );
            }
        } else if report.applied {
            self.nonfinite_in_a_row = 0;
        }
        let p = self.position;
        Ok(StepMetrics {
            step: self.trainer.step,
            epoch: (p.epoch as f64) + p.batch as f64 / self.batches_per_epoch as f64,
            loss: sums[0],
            contrastive_loss: sums[1],
            caption_loss: sums[2],
            learning_rate: self.base_lr * report.lr_factor,
            grad_norm: report.grad_norm,
            samples_per_s: (samples * self.data_world) as f64 / started.elapsed().as_secs_f64(),
            skipped_samples: self.skipped_total,
        })
    }
}

/// The position after `p`.
fn next_position(p: LoaderPosition, batches_per_epoch: usize) -> LoaderPosition {
    if p.batch + 1 >= batches_per_epoch {
        LoaderPosition {
            epoch: p.epoch + 1,
            batch: 0,
        }
    } else {
        LoaderPosition {
            epoch: p.epoch,
            batch: p.batch + 1,
        }
    }
}

/// A training step's error with the step and the micro-batch named; an out-of-memory (the
/// host's or a GPU's) also gets the per-rank estimate, on a GPU what the device's memory pool
/// held when it failed, and what lowers it. The last checkpoint is untouched: checkpoints are
/// written atomically between steps.
fn step_error(
    e: impl Into<anyhow::Error>,
    step: u64,
    samples: usize,
    memory: &MemoryEstimate,
    device: &Device,
) -> anyhow::Error {
    let e = e.into();
    let text = format!("{e:#}");
    let out_of_memory = text.contains("OUT_OF_MEMORY")
        || text.contains("out of memory")
        || text.contains("memory allocation");
    let what = format!(
        "training step {} ({samples} samples on this rank)",
        step + 1
    );
    if out_of_memory {
        // Best effort: the figures of the pool that could not serve the allocation.
        let held = match crate::cuda_setup::pool_usage(device) {
            Ok(Some((now, peak))) => format!(
                "; the device's memory pool held {:.2} GiB (at most {:.2} GiB since the start)",
                now as f64 / GIB,
                peak as f64 / GIB
            ),
            _ => String::new(),
        };
        e.context(format!(
            "{what} ran out of memory{held}; this rank's estimate: {}. Lower \
             --per_device_train_batch_size, add --grad_checkpointing True or --bf16 True, or \
             raise --sharding_parallel_degree or --tensor_parallel_degree",
            memory.by_part()
        ))
    } else {
        e.context(what)
    }
}

#[cfg(test)]
mod step_error_tests {
    use super::*;
    use crate::comm::peer_failure::PeerFailed;
    use candle_core::DType;

    #[test]
    fn an_out_of_memory_names_the_step_the_estimate_and_the_remedies() {
        let config = crate::model::CocaConfig::resolve("coca_ViT-B-32").unwrap();
        let memory = crate::memory_estimate::estimate(
            &config,
            1,
            1,
            None,
            8,
            false,
            DType::F32,
            crate::memory_estimate::OpsPath::CpuFused,
        )
        .unwrap();
        let oom = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        let text = format!("{:#}", step_error(oom, 2, 8, &memory, &Device::Cpu));
        for needle in [
            "training step 3 (8 samples",
            "ran out of memory",
            "activations",
            "--grad_checkpointing True",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from {text}");
        }
        let other = format!(
            "{:#}",
            step_error(
                anyhow::anyhow!("shape mismatch"),
                0,
                4,
                &memory,
                &Device::Cpu
            )
        );
        assert!(
            other.starts_with("training step 1 (4 samples on this rank): shape mismatch"),
            "{other}"
        );
        // The cause stays reachable for the exit code's classification.
        let peer = step_error(anyhow::Error::new(PeerFailed), 0, 4, &memory, &Device::Cpu);
        assert!(peer.downcast_ref::<PeerFailed>().is_some());
    }
}
