//! The seed's precision flags (`--bf16`, `--fp16`, `--fp16_opt_level`), shared by `pretrain`
//! and `eval`, and the loss-scaling test hooks.

use super::parse_bool;
use crate::model::autocast::Autocast;
use crate::train::loss_scaler::{LossScaler, GROWTH_INTERVAL, INIT_SCALE};
use anyhow::{bail, Result};
use candle_core::DType;
use clap::Args;

/// `--fp16_opt_level`: the seed's (Paddle AMP) levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp16OptLevel {
    /// Cast per op: each product casts its float32 weight to float16 when it runs.
    O1,
    /// float16 weight copies for compute, float32 masters (see the README's Precision section
    /// for how this build realises it).
    O2,
}

/// The seed's precision flags (`run_pretrain_dist.py` and `run_zero_shot_eval.py` both take
/// them): PyTorch autocast semantics in bf16 or float16 over float32 master weights.
#[derive(Debug, Clone, Args, serde::Serialize, serde::Deserialize)]
pub struct PrecisionArgs {
    /// Matrix products in bfloat16 (autocast); everything else float32.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub bf16: bool,
    /// Matrix products in float16 (autocast) with dynamic loss scaling (GradScaler's rules).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = parse_bool)]
    pub fp16: bool,
    /// `O1` or `O2` (the seed's); only meaningful with `--fp16 True`.
    #[arg(long, default_value = "O1")]
    #[serde(default = "default_opt_level")]
    pub fp16_opt_level: String,
    /// Test hook: clean steps before the loss scale doubles (GradScaler's 2000).
    #[arg(long, default_value_t = GROWTH_INTERVAL, hide = true)]
    #[serde(default = "default_growth_interval")]
    pub fp16_growth_interval: u64,
    /// Test hook: GradScaler's `init_scale` (2^16).
    #[arg(long, default_value_t = INIT_SCALE, hide = true)]
    #[serde(default = "default_init_scale")]
    pub fp16_init_scale: f64,
    /// Test hook: make the gradients of this (0-based) step non-finite, as an overflow would.
    #[arg(long, hide = true)]
    #[serde(default)]
    pub fp16_inject_overflow_step: Option<u64>,
}

fn default_opt_level() -> String {
    "O1".into()
}

fn default_init_scale() -> f64 {
    INIT_SCALE
}

fn default_growth_interval() -> u64 {
    GROWTH_INTERVAL
}

impl PrecisionArgs {
    /// Refuses contradictory or unknown precision flags, naming the flag (one line).
    pub fn check(&self) -> Result<()> {
        if self.bf16 && self.fp16 {
            bail!("--bf16 True and --fp16 True: choose one mixed precision");
        }
        self.opt_level()?;
        if !(self.fp16_init_scale.is_finite() && self.fp16_init_scale > 0.0) {
            bail!("--fp16_init_scale must be a positive number");
        }
        if self.fp16_growth_interval == 0 {
            bail!("--fp16_growth_interval must be at least 1");
        }
        Ok(())
    }

    /// The parsed `--fp16_opt_level`.
    pub fn opt_level(&self) -> Result<Fp16OptLevel> {
        match self.fp16_opt_level.as_str() {
            "O1" | "o1" => Ok(Fp16OptLevel::O1),
            "O2" | "o2" => Ok(Fp16OptLevel::O2),
            other => bail!("--fp16_opt_level {other:?}: expected O1 or O2"),
        }
    }

    /// The compute dtype of the matrix products.
    pub fn autocast(&self) -> Autocast {
        Autocast::new(self.compute_dtype())
    }

    /// bf16, f16 or f32.
    pub fn compute_dtype(&self) -> DType {
        if self.bf16 {
            DType::BF16
        } else if self.fp16 {
            DType::F16
        } else {
            DType::F32
        }
    }

    /// The loss scaler `--fp16 True` trains with (none otherwise).
    pub fn loss_scaler(&self) -> Option<LossScaler> {
        self.fp16
            .then(|| LossScaler::new(self.fp16_init_scale, self.fp16_growth_interval))
    }

    /// A name for logs, summaries and results files: `fp32`, `bf16 (autocast)` or `fp16 O1|O2 (...)`.
    pub fn describe(&self) -> String {
        match (self.bf16, self.fp16) {
            (true, _) => "bf16 (autocast)".into(),
            (_, true) => format!("fp16 {} (autocast, loss scaling)", self.fp16_opt_level),
            _ => "fp32".into(),
        }
    }
}
