//! `coca-worker bench-memory`: bytes of parameters, kept gradients and optimizer state one rank
//! holds under each ZeRO and tensor-parallel layout, read from the buffers of a real
//! [`Trainer`] built for that layout, next to the ideal (the one-process figure ÷ the degrees
//! that split it).
//!
//! Building a model or a trainer only asks its groups for their rank and size, so a rank of an
//! 8-way sharding group is built here without the other seven: [`LayoutOnly`] answers rank and size
//! and refuses every collective.

use crate::comm::HostTransport;
use crate::distributed::tensor_parallel::TensorParallel;
use crate::model::trainable::{trainable_model_parallel, TrainableWeights};
use crate::model::{CoCa, CocaConfig, CocaLossConfig};
use crate::train::adamw::AdamWConfig;
use crate::train::groups::TowerGroups;
use crate::train::schedule::CosineSchedule;
use crate::train::trainer::{Trainer, TrainerConfig, TrainerGroups, TrainerMemory, ZeroStage};
use anyhow::Result;
use candle_core::{DType, Device};
use coca_common::collective::{Collective, LayoutOnly, SingleProcess};
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

/// A group of `size` seen from its member 0 (a group of one needs no stand-in).
fn stand_in(size: usize) -> Arc<dyn Collective> {
    if size == 1 {
        Arc::new(SingleProcess)
    } else {
        Arc::new(LayoutOnly { rank: 0, size })
    }
}

/// The report, one JSON line per layout (rank 0 of each; the others differ by < 1 block): every
/// ZeRO stage at each of `sharding` degrees, each of `tensor_parallel` degrees unsharded and
/// with stage 2 at the largest sharding degree. The ideal is the one-process figure ÷ the
/// degrees that split it.
pub fn run(
    model: &str,
    sharding: &[usize],
    tensor_parallel: &[usize],
) -> Result<Vec<serde_json::Value>> {
    let config = CocaConfig::resolve(model)?;
    let trainer_config = TrainerConfig {
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        schedule: CosineSchedule {
            warmup_steps: 0,
            total_steps: 1,
        },
        loss: CocaLossConfig::default(),
        span: Default::default(),
        buffers: crate::comm::PlacementRule::from_env()?,
    };
    let rule = TowerGroups::uniform(1e-5, 0.1);
    let mut layouts = vec![Layout {
        tp: 1,
        sharding: 1,
        stage: None,
    }];
    for &d in sharding.iter().filter(|&&d| d > 1) {
        for stage in [ZeroStage::One, ZeroStage::Two] {
            layouts.push(Layout {
                tp: 1,
                sharding: d,
                stage: Some(stage),
            });
        }
    }
    let widest = sharding.iter().copied().max().unwrap_or(1);
    for &tp in tensor_parallel.iter().filter(|&&t| t > 1) {
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
        let trainer = Trainer::in_groups(coca.clone(), vars, &rule, trainer_config, groups)?;
        let m = trainer.memory();
        drop(trainer);
        let base: TrainerMemory = *unsharded.get_or_insert(m);
        let split = layout.tp * layout.sharding;
        lines.push(serde_json::json!({
            "model": model,
            "layout": layout.name(),
            "parameters_bytes": m.parameters,
            "gradients_bytes": m.gradients,
            "optimizer_bytes": m.optimizer_state,
            "ideal_parameters_bytes": base.parameters / layout.tp,
            "ideal_gradients_bytes": match layout.stage {
                Some(ZeroStage::Two) => base.gradients / split,
                _ => base.gradients / layout.tp,
            },
            "ideal_optimizer_bytes": base.optimizer_state / split,
        }));
    }
    Ok(lines)
}
