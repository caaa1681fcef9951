//! The model's variables are views of the trainer's one flat parameter buffer: an update moves
//! them without a copy written back, and the trainer holds the weights once.

use candle_core::{DType, Device, Tensor};
use coca_worker::comm::PlacementRule;
use coca_worker::compare::max_abs_diff;
use coca_worker::model::group_loss::ContrastiveSpan;
use coca_worker::model::{CocaConfig, CocaLossConfig};
use coca_worker::train::adamw::AdamWConfig;
use coca_worker::train::groups::TowerGroups;
use coca_worker::train::schedule::CosineSchedule;
use coca_worker::train::trainable::trainable_model;
use coca_worker::train::trainer::{Trainer, TrainerConfig};
use std::collections::HashMap;

fn config() -> CocaConfig {
    CocaConfig::from_json(include_str!("data/tiny_config.json")).unwrap()
}

fn trainer_config(buffers: PlacementRule) -> TrainerConfig {
    TrainerConfig {
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        schedule: CosineSchedule {
            warmup_steps: 1,
            total_steps: 2,
        },
        loss: CocaLossConfig::default(),
        span: ContrastiveSpan::default(),
        buffers,
    }
}

/// Every variable's values, copied out of the shared buffer.
fn snapshot(vars: &coca_worker::train::trainable::TrainableWeights) -> HashMap<String, Tensor> {
    vars.tensors()
        .into_iter()
        .map(|(n, t)| (n, t.copy().unwrap()))
        .collect()
}

#[test]
fn the_models_variables_view_one_flat_buffer() {
    let (model, vars) = trainable_model(&config(), None, 3, DType::F32, &Device::Cpu).unwrap();
    let flat = vars.flat().expect("float32 variables live in one buffer");
    let total: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(flat.dims(), [total]);
    // Writing the buffer where logit_scale lives changes the variable and the model's tensor.
    let at = vars
        .get("logit_scale")
        .unwrap()
        .as_tensor()
        .layout()
        .start_offset();
    flat.slice_set(&Tensor::new(&[0.25f32], &Device::Cpu).unwrap(), 0, at)
        .unwrap();
    let read = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(read(vars.get("logit_scale").unwrap().as_tensor()), [0.25]);
    assert_eq!(read(&model.logit_scale), [0.25]);
    // Other dtypes keep a tensor per variable, which the trainer refuses.
    let (model, vars) = trainable_model(&config(), None, 3, DType::BF16, &Device::Cpu).unwrap();
    assert!(vars.flat().is_none());
    let rule = TowerGroups::uniform(1e-3, 0.1);
    let err = match Trainer::new(model, &vars, &rule, trainer_config(PlacementRule::Auto)) {
        Ok(_) => panic!("a trainer over bfloat16 variables"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("float32"), "{err}");
}

#[test]
fn an_update_moves_the_variables_in_place_on_either_placement() {
    let cfg = config();
    let (s, ctx) = (cfg.vision_cfg.image_size, cfg.text_cfg.context_length);
    let images = Tensor::randn(0f32, 1., (4, 3, s, s), &Device::Cpu).unwrap();
    let mut tokens = vec![0u32; 4 * ctx];
    for b in 0..4 {
        tokens[b * ctx] = 49406;
        tokens[b * ctx + 1] = 320 + b as u32;
        tokens[b * ctx + 2] = 49407;
    }
    let text = Tensor::from_vec(tokens, (4, ctx), &Device::Cpu).unwrap();
    let mut finals = Vec::new();
    for buffers in [PlacementRule::Auto, PlacementRule::Tensors] {
        let (model, vars) = trainable_model(&cfg, None, 5, DType::F32, &Device::Cpu).unwrap();
        let before = snapshot(&vars);
        let rule = TowerGroups::uniform(1e-2, 0.1);
        let mut trainer = Trainer::new(model, &vars, &rule, trainer_config(buffers)).unwrap();
        let total: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        assert_eq!(
            trainer.memory().parameters,
            4 * total,
            "one copy of the weights"
        );
        trainer.backward(&images, &text, 1.0).unwrap();
        assert!(trainer.update().unwrap().applied);
        let after = snapshot(&vars);
        for (name, t) in &after {
            assert!(
                max_abs_diff(t, &before[name]).unwrap() > 0.0,
                "{name} did not move ({buffers:?})"
            );
        }
        finals.push(after);
    }
    for (name, t) in &finals[0] {
        assert_eq!(max_abs_diff(t, &finals[1][name]).unwrap(), 0.0, "{name}");
    }
}
