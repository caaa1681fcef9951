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
use anyhow::Result;
use candle_core::{DType, Device};
use coca_common::collective::{LayoutOnly, SingleProcess};
use std::sync::Arc;

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
