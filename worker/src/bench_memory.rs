//! `coca-worker bench-memory`: bytes of parameters, kept gradients and optimizer state one rank
//! holds under each ZeRO layout, read from the buffers of a real [`Trainer`] built for that
//! layout, next to the ideal (the unsharded figure ÷ the sharding degree).
//!
//! Building a trainer only asks its groups for their rank and size, so a rank of an 8-way
//! sharding group is built here without the other seven: [`LayoutOnly`] answers rank and size
//! and refuses every collective.

use crate::model::trainable::trainable_model;
use crate::model::{CocaConfig, CocaLossConfig};
use crate::train::adamw::AdamWConfig;
use crate::train::groups::TowerGroups;
use crate::train::schedule::CosineSchedule;
use crate::train::trainer::{Trainer, TrainerConfig, TrainerGroups, ZeroStage};
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use coca_common::collective::{Collective, ReduceOp, SingleProcess};
use std::sync::Arc;

/// A group that has a rank and a size but cannot communicate.
struct LayoutOnly {
    rank: usize,
    size: usize,
}

impl LayoutOnly {
    fn refuse<T>(&self) -> Result<T> {
        bail!("the memory report builds trainers without peers; no collective can run")
    }
}

impl Collective for LayoutOnly {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce(&self, _: &mut [f32], _: ReduceOp) -> Result<()> {
        self.refuse()
    }
    fn all_gather(&self, _: &[f32], _: &mut [f32]) -> Result<()> {
        self.refuse()
    }
    fn reduce_scatter(&self, _: &[f32], _: &mut [f32], _: ReduceOp) -> Result<()> {
        self.refuse()
    }
    fn broadcast(&self, _: &mut [f32], _: usize) -> Result<()> {
        self.refuse()
    }
    fn barrier(&self) -> Result<()> {
        self.refuse()
    }
}

/// The report, one JSON line per layout (rank 0 of each; the others differ by < 1 block).
pub fn run(model: &str, degrees: &[usize]) -> Result<Vec<serde_json::Value>> {
    let config = CocaConfig::resolve(model)?;
    let (coca, vars) = trainable_model(&config, None, 0, DType::F32, &Device::Cpu)?;
    let trainer_config = TrainerConfig {
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        schedule: CosineSchedule {
            warmup_steps: 0,
            total_steps: 1,
        },
        loss: CocaLossConfig::default(),
        span: Default::default(),
    };
    let rule = TowerGroups::uniform(1e-5, 0.1);
    let mut lines = Vec::new();
    let mut unsharded = None;
    let mut layouts = vec![(1, None)];
    for &d in degrees.iter().filter(|&&d| d > 1) {
        layouts.push((d, Some(ZeroStage::One)));
        layouts.push((d, Some(ZeroStage::Two)));
    }
    for (degree, stage) in layouts {
        let groups = TrainerGroups {
            data: Arc::new(LayoutOnly {
                rank: 0,
                size: degree,
            }),
            sharding: if degree == 1 {
                Arc::new(SingleProcess)
            } else {
                Arc::new(LayoutOnly {
                    rank: 0,
                    size: degree,
                })
            },
            replicas: Arc::new(SingleProcess),
            stage,
        };
        let trainer = Trainer::in_groups(coca.clone(), &vars, &rule, trainer_config, groups)?;
        let m = trainer.memory();
        drop(trainer);
        let base = *unsharded.get_or_insert(m);
        let name = match stage {
            None => "unsharded".to_string(),
            Some(ZeroStage::One) => format!("stage1 x{degree}"),
            Some(ZeroStage::Two) => format!("stage2 x{degree}"),
        };
        lines.push(serde_json::json!({
            "model": model,
            "layout": name,
            "parameters_bytes": m.parameters,
            "gradients_bytes": m.gradients,
            "optimizer_bytes": m.optimizer_state,
            "ideal_optimizer_bytes": base.optimizer_state / degree,
            "ideal_gradients_bytes": match stage {
                Some(ZeroStage::Two) => base.gradients / degree,
                _ => base.gradients,
            },
        }));
    }
    Ok(lines)
}
