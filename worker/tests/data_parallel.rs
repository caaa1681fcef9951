//! The trainer over process groups, with ranks as threads on loopback ring collectives: data
//! parallelism (every contrastive layout) and ZeRO stage 1/2 give the one-process parameters.

use candle_core::{DType, Device, Tensor};
use coca_common::collective::memory_kv::MemoryKeyValue;
use coca_common::collective::ring::RingCollective;
use coca_common::topology::{GroupKind, Topology};
use coca_worker::comm::{Communicator, HostTransport, PlacementRule};
use coca_worker::compare::{max_abs, max_abs_diff};
use coca_worker::model::group_loss::ContrastiveSpan;
use coca_worker::model::{CocaConfig, CocaLossConfig};
use coca_worker::train::adamw::AdamWConfig;
use coca_worker::train::groups::TowerGroups;
use coca_worker::train::schedule::CosineSchedule;
use coca_worker::train::trainable::trainable_model;
use coca_worker::train::trainer::{Trainer, TrainerConfig, TrainerGroups, ZeroStage};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

const GLOBAL_BATCH: usize = 8;
fn steps() -> usize {
    std::env::var("DP_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}
const TOKEN: &[u8] = b"test-token";

fn config() -> CocaConfig {
    CocaConfig::from_json(include_str!("data/tiny_config.json")).unwrap()
}

/// A deterministic global batch: images, and captions of lengths 3..=15 padded with zeros.
fn global_batch(step: usize, cfg: &CocaConfig) -> (Vec<f32>, Vec<u32>) {
    let s = cfg.vision_cfg.image_size;
    let ctx = cfg.text_cfg.context_length;
    let images = (0..GLOBAL_BATCH * 3 * s * s)
        .map(|i| (((i * 7919 + step * 104_729) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let mut tokens = vec![0u32; GLOBAL_BATCH * ctx];
    for b in 0..GLOBAL_BATCH {
        let len = 3 + (b * 5 + step * 3) % (ctx - 3);
        tokens[b * ctx] = 49406;
        for t in 1..len - 1 {
            tokens[b * ctx + t] = 1 + ((b * 131 + t * 17 + step * 7) % 4000) as u32;
        }
        tokens[b * ctx + len - 1] = 49407;
    }
    (images, tokens)
}

/// A NaN pixel in one sample of the global batch at one step: that step's loss is not finite on
/// every rank, and every rank skips its update.
#[derive(Debug, Clone, Copy)]
struct Poison {
    step: usize,
    sample: usize,
}

/// Trains `STEPS` steps as one rank with its flat buffers placed by `buffers`; returns the
/// final weights.
fn train(
    groups: TrainerGroups,
    span: ContrastiveSpan,
    data_rank: usize,
    data_world: usize,
    buffers: PlacementRule,
    poison: Option<Poison>,
) -> HashMap<String, Tensor> {
    let cfg = config();
    let (model, vars) = trainable_model(&cfg, None, 11, DType::F32, &Device::Cpu).unwrap();
    let trainer_config = TrainerConfig {
        adamw: AdamWConfig {
            eps: 1e-6,
            ..AdamWConfig::default()
        },
        max_grad_norm: Some(1.0),
        schedule: CosineSchedule {
            warmup_steps: 1,
            total_steps: steps() as u64,
        },
        loss: CocaLossConfig::default(),
        span,
        buffers,
    };
    let rule = TowerGroups::uniform(1e-3, 0.1);
    let mut trainer = Trainer::in_groups(model, &vars, &rule, trainer_config, groups).unwrap();
    let (s, ctx) = (cfg.vision_cfg.image_size, cfg.text_cfg.context_length);
    let local = GLOBAL_BATCH / data_world;
    for step in 0..steps() {
        let (mut images, tokens) = global_batch(step, &cfg);
        let poisoned = poison.filter(|p| p.step == step);
        if let Some(p) = poisoned {
            images[p.sample * 3 * s * s] = f32::NAN;
        }
        let img = &images[data_rank * local * 3 * s * s..(data_rank + 1) * local * 3 * s * s];
        let tok = &tokens[data_rank * local * ctx..(data_rank + 1) * local * ctx];
        let images = Tensor::from_slice(img, (local, 3, s, s), &Device::Cpu).unwrap();
        let text = Tensor::from_slice(tok, (local, ctx), &Device::Cpu).unwrap();
        let loss = trainer.backward(&images, &text, 1.0).unwrap();
        assert_eq!(loss.total.is_finite(), poisoned.is_none(), "step {step}");
        let report = match poisoned {
            None => trainer.update().unwrap(),
            Some(_) => trainer.skip_update().unwrap(),
        };
        assert_eq!(report.applied, poisoned.is_none(), "step {step}");
    }
    vars.tensors().into_iter().collect()
}

/// Runs every rank of a `world` with `sharding` degree on threads.
fn train_group(
    world: usize,
    sharding: usize,
    stage: Option<ZeroStage>,
    span: ContrastiveSpan,
    buffers: PlacementRule,
    poison: Option<Poison>,
) -> Vec<HashMap<String, Tensor>> {
    let topology = Topology::new(world, 1, sharding).unwrap();
    let kv = Arc::new(MemoryKeyValue::new());
    let name = format!("w{world}s{sharding}{stage:?}{span:?}{buffers:?}");
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let kv = kv.clone();
            let name = name.clone();
            std::thread::spawn(move || {
                let group = |kind: GroupKind, label: &str| -> Arc<dyn Communicator> {
                    let members = topology.group(rank, kind).unwrap();
                    if members.len() == 1 {
                        return HostTransport::single();
                    }
                    HostTransport::shared(Arc::new(
                        RingCollective::connect(
                            &format!("{name}/{label}/{}", members[0]),
                            &members,
                            rank,
                            IpAddr::V4(Ipv4Addr::LOCALHOST),
                            kv.as_ref(),
                            TOKEN,
                            Duration::from_secs(30),
                        )
                        .unwrap(),
                    ))
                };
                let groups = TrainerGroups {
                    data: group(GroupKind::DataAndSharding, "data"),
                    sharding: group(GroupKind::Sharding, "sharding"),
                    replicas: group(GroupKind::Data, "replicas"),
                    stage,
                };
                train(
                    groups,
                    span,
                    topology.data_rank(rank).unwrap(),
                    topology.data_world(),
                    buffers,
                    poison,
                )
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Every tensor within 1e-5, absolute or relative to the tensor's largest magnitude.
fn assert_close(reference: &HashMap<String, Tensor>, got: &HashMap<String, Tensor>, what: &str) {
    for (name, a) in reference {
        let b = &got[name];
        let diff = max_abs_diff(a, b).unwrap();
        let rel = diff / max_abs(a).unwrap().max(1e-12);
        assert!(
            diff <= 1e-5 || rel <= 1e-5,
            "{what}: {name} differs by {diff:.3e} ({rel:.3e} relative)"
        );
    }
}

#[test]
fn data_parallel_layouts_equal_one_process() {
    let reference = train(
        TrainerGroups::single(),
        ContrastiveSpan::default(),
        0,
        1,
        PlacementRule::Auto,
        None,
    );
    let spans = [
        ContrastiveSpan::default(),
        ContrastiveSpan {
            local_loss: false,
            gather_with_grad: true,
        },
        ContrastiveSpan {
            local_loss: true,
            gather_with_grad: true,
        },
    ];
    for world in [2, 4] {
        for span in spans {
            let ranks = train_group(world, 1, None, span, PlacementRule::Auto, None);
            for (rank, got) in ranks.iter().enumerate() {
                assert_close(&reference, got, &format!("dp {world} {span:?} rank {rank}"));
            }
        }
    }
}

#[test]
fn zero_stages_equal_one_process() {
    let reference = train(
        TrainerGroups::single(),
        ContrastiveSpan::default(),
        0,
        1,
        PlacementRule::Auto,
        None,
    );
    for (world, sharding, stage) in [
        (2, 2, ZeroStage::One),
        (2, 2, ZeroStage::Two),
        (4, 2, ZeroStage::One),
        (4, 2, ZeroStage::Two),
        (4, 4, ZeroStage::Two),
    ] {
        let ranks = train_group(
            world,
            sharding,
            Some(stage),
            ContrastiveSpan::default(),
            PlacementRule::Auto,
            None,
        );
        for (rank, got) in ranks.iter().enumerate() {
            assert_close(
                &reference,
                got,
                &format!("{stage:?} × {sharding} of {world}, rank {rank}"),
            );
        }
    }
}

/// The device code path (flat buffers as tensors, AdamW, clipping and the norm as tensor ops,
/// collectives through host copies), run on the CPU: the same parameters as the host path, one
/// process and in every ZeRO layout.
#[test]
fn device_buffers_equal_host_buffers() {
    let span = ContrastiveSpan::default();
    let reference = train(
        TrainerGroups::single(),
        span,
        0,
        1,
        PlacementRule::Auto,
        None,
    );
    let single = train(
        TrainerGroups::single(),
        span,
        0,
        1,
        PlacementRule::Tensors,
        None,
    );
    assert_close(&reference, &single, "tensors, one process");
    for (world, sharding, stage) in [
        (2, 1, None),
        (2, 2, Some(ZeroStage::One)),
        (4, 2, Some(ZeroStage::Two)),
    ] {
        let ranks = train_group(world, sharding, stage, span, PlacementRule::Tensors, None);
        for (rank, got) in ranks.iter().enumerate() {
            assert_close(
                &reference,
                got,
                &format!("tensors, {stage:?} × {sharding} of {world}, rank {rank}"),
            );
        }
    }
}

/// A NaN in one rank's slice of the batch: every rank reads the same non-finite loss after its
/// backward pass (which runs before the values are read), drops that step's gradients and skips
/// the update, and the runs still end with the one-process parameters — with the gradient
/// gathered with its backward and in ZeRO stage 2, whose reduce-scatter follows the check.
#[test]
fn a_non_finite_loss_on_one_rank_is_skipped_by_every_rank_alike() {
    let poison = Some(Poison { step: 1, sample: 5 });
    let span = ContrastiveSpan::default();
    let reference = train(
        TrainerGroups::single(),
        span,
        0,
        1,
        PlacementRule::Auto,
        poison,
    );
    let clean = train(
        TrainerGroups::single(),
        span,
        0,
        1,
        PlacementRule::Auto,
        None,
    );
    let moved = clean
        .iter()
        .map(|(name, t)| max_abs_diff(t, &reference[name]).unwrap())
        .fold(0f32, f32::max);
    assert!(moved > 0.0, "the skipped step must change the result");
    let with_grad = ContrastiveSpan {
        local_loss: false,
        gather_with_grad: true,
    };
    for (sharding, stage, span) in [(1, None, with_grad), (2, Some(ZeroStage::Two), span)] {
        let ranks = train_group(2, sharding, stage, span, PlacementRule::Auto, poison);
        for (rank, got) in ranks.iter().enumerate() {
            assert_close(
                &reference,
                got,
                &format!("poisoned, {stage:?} {span:?}, rank {rank}"),
            );
        }
    }
}
