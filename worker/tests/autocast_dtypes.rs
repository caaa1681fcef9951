//! Which ops run in which dtype under `--bf16`/`--fp16` (PyTorch autocast's lists): the matrix
//! products return the half-precision dtype; layer norm's statistics, the residual stream,
//! L2-normalised features and the losses are float32 (a norm feeding a product returns its
//! operand in the half dtype, rounded once); the gradients reaching the float32 variables are
//! float32.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use coca_worker::model::attention::MultiheadAttention;
use coca_worker::model::autocast::Autocast;
use coca_worker::model::layers::{LayerNorm, Linear, Mlp};
use coca_worker::model::tensor_parallel::TensorParallel;
use coca_worker::model::transformer::{BlockShape, ResidualAttentionBlock};
use coca_worker::model::{coca_loss, CocaConfig, CocaLossConfig};
use coca_worker::train::trainable::trainable_model_parallel;

const TINY: &str = include_str!("data/tiny_config.json");

fn tp(dtype: DType) -> TensorParallel {
    TensorParallel::single().with_autocast(Autocast::new(dtype))
}

#[test]
fn layers_compute_products_in_the_half_dtype_and_return_float32_to_the_residual_stream() {
    let dev = Device::Cpu;
    for half in [DType::BF16, DType::F16] {
        let tp = tp(half);
        let ac = tp.autocast();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 16), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (8, 16), &dev).unwrap();
        let b = Tensor::zeros(8, DType::F32, &dev).unwrap();
        let linear = Linear::from_parts(w, Some(b));
        // A linear's product is in the half dtype (weights cast from float32 masters) ...
        assert_eq!(linear.forward(&ac.cast(&x).unwrap()).unwrap().dtype(), half);
        // ... and its float32 input stays float32 when autocast is off.
        assert_eq!(linear.forward(&x).unwrap().dtype(), DType::F32);
        assert_eq!(ac.matmul(&x, &x.t().unwrap()).unwrap().dtype(), half);

        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        // Layer norm of a half-precision activation: statistics and output float32.
        let ln = LayerNorm::new(16, vb.pp("ln")).unwrap();
        assert_eq!(
            ln.forward(&ac.cast(&x).unwrap()).unwrap().dtype(),
            DType::F32
        );
        // As the operand of the next product, it is returned in the half dtype (statistics
        // float32, rounded once).
        assert_eq!(ln.forward_operand(&x, &tp).unwrap().dtype(), half);
        // The MLP and attention return their last product's half dtype at degree 1; the
        // residual add widens it (autocast's promotion), so a block returns float32.
        let mlp = Mlp::new(16, 32, 0.02, vb.pp("mlp"), &tp).unwrap();
        assert_eq!(mlp.forward(&x).unwrap().dtype(), half);
        let attn = MultiheadAttention::new(16, 16, 4, 0.02, vb.pp("attn"), &tp).unwrap();
        assert_eq!(attn.forward_self(&x, None).unwrap().dtype(), half);
        let shape = BlockShape {
            width: 16,
            heads: 4,
            mlp_ratio: 2.0,
            layers: 1,
        };
        let block = ResidualAttentionBlock::new(shape, false, vb.pp("block"), &tp).unwrap();
        assert_eq!(block.forward(&x, None).unwrap().dtype(), DType::F32);
        // Every variable stayed float32.
        for var in map.all_vars() {
            assert_eq!(var.dtype(), DType::F32);
        }
    }
}

#[test]
fn the_model_under_bf16_has_half_logits_float32_features_loss_and_gradients() {
    let dev = Device::Cpu;
    let config = CocaConfig::from_json(TINY).unwrap();
    let size = config.vision_cfg.image_size;
    let images = Tensor::randn(0f32, 1.0, (2, 3, size, size), &dev).unwrap();
    let t = config.text_cfg.context_length;
    let ids: Vec<u32> = (0..2 * t as u32).map(|i| 1 + i % 40).collect();
    let text = Tensor::from_vec(ids, (2, t), &dev).unwrap();
    let mut losses = Vec::new();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (model, vars) =
            trainable_model_parallel(&config, None, 1, DType::F32, &dev, &tp(dtype)).unwrap();
        let out = model.forward(&images, &text).unwrap();
        assert_eq!(out.logits.dtype(), dtype, "vocabulary projection");
        assert_eq!(out.image_features.dtype(), DType::F32);
        assert_eq!(out.text_features.dtype(), DType::F32);
        assert_eq!(out.image_embs.dtype(), DType::F32, "ln_post output");
        assert_eq!(out.token_embs.dtype(), DType::F32, "residual stream");
        let loss = coca_loss(&out, &CocaLossConfig::default()).unwrap();
        for l in [&loss.total, &loss.contrastive, &loss.caption] {
            assert_eq!(l.dtype(), DType::F32);
        }
        let grads = loss.total.backward().unwrap();
        for (name, var) in vars.iter() {
            assert_eq!(var.dtype(), DType::F32, "{name}");
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            assert_eq!(g.dtype(), DType::F32, "{name}'s gradient");
        }
        losses.push(loss.total.to_scalar::<f32>().unwrap());
    }
    // Close to float32, and not float32 by accident.
    for (i, l) in losses.iter().enumerate().skip(1) {
        assert!(
            (l - losses[0]).abs() <= 0.02 * losses[0].abs(),
            "{losses:?}"
        );
        assert!(*l != losses[0], "{i}: {losses:?}");
    }
}
