//! Checkpointed blocks of ViT-B/32's shapes give the plain backward's gradients.

use crate::model::tensor_parallel::TensorParallel;
use crate::model::transformer::{causal_mask, BlockShape, ResidualAttentionBlock};
use anyhow::Result;
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

/// Blocks of `width` with `heads` heads and open_clip's MLP ratio, in a stack of 12.
fn shape(width: usize, heads: usize) -> BlockShape {
    BlockShape {
        width,
        heads,
        mlp_ratio: 4.0,
        layers: 12,
    }
}

/// Two blocks of one stack and their variables.
struct Stack {
    blocks: Vec<ResidualAttentionBlock>,
    vars: VarMap,
}

impl Stack {
    fn new(shape: BlockShape, cross: bool) -> Result<Self> {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let blocks = (0..2)
            .map(|i| {
                ResidualAttentionBlock::new(
                    shape,
                    cross,
                    vb.pp(i.to_string()),
                    &TensorParallel::single(),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { blocks, vars })
    }
}

/// Gradients of `Σ y ⊙ w` for the blocks applied in turn (cross-attending to `kv` when given).
fn gradients(
    stack: &Stack,
    x: &Var,
    kv: Option<&Var>,
    mask: Option<&Tensor>,
    recompute: bool,
) -> Result<(f32, GradStore)> {
    let mut y = x.as_tensor().clone();
    for block in &stack.blocks {
        y = match kv {
            Some(kv) => block.forward_cross_checkpointed(&y, kv.as_tensor(), recompute)?,
            None => block.forward_checkpointed(&y, mask, recompute)?,
        };
    }
    // A fixed weighting, so that every output element has its own gradient.
    let n = y.elem_count() as u32;
    let w = (Tensor::arange(0u32, n, &Device::Cpu)?.to_dtype(DType::F32)? * 0.37)?
        .sin()?
        .reshape(y.shape())?;
    let loss = (y * w)?.sum_all()?;
    Ok((loss.to_scalar::<f32>()?, loss.backward()?))
}

/// Every gradient of the checkpointed run within 1e-6 (relative to the tensor's scale) of the
/// plain run's.
fn assert_same_gradients(
    stack: &Stack,
    inputs: &[&Var],
    plain: &GradStore,
    checkpointed: &GradStore,
) {
    let vars = stack.vars.data().lock().unwrap().clone();
    let mut named: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    named.extend(
        inputs
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("input {i}"), v.as_tensor().clone())),
    );
    assert!(named.len() > 20, "{} tensors", named.len());
    for (name, t) in &named {
        let a = plain
            .get(t)
            .unwrap_or_else(|| panic!("{name}: no plain gradient"));
        let b = checkpointed
            .get(t)
            .unwrap_or_else(|| panic!("{name}: no checkpointed gradient"));
        let diff = crate::compare::max_abs_diff(a, b).unwrap();
        let scale = crate::compare::max_abs(a).unwrap().max(1e-12);
        assert!(
            diff <= 1e-6 * scale,
            "{name}: gradients differ by {diff:e} (scale {scale:e})"
        );
    }
}

#[test]
fn image_tower_blocks_of_b32_give_the_plain_gradients() -> Result<()> {
    let shape = shape(768, 12);
    let stack = Stack::new(shape, false)?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 50, 768), &Device::Cpu)?)?;
    let (plain_loss, plain) = gradients(&stack, &x, None, None, false)?;
    let (loss, checkpointed) = gradients(&stack, &x, None, None, true)?;
    assert_eq!(plain_loss, loss);
    assert_same_gradients(&stack, &[&x], &plain, &checkpointed);
    Ok(())
}

#[test]
fn decoder_blocks_of_b32_give_the_plain_gradients() -> Result<()> {
    let shape = shape(512, 8);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 76, 512), &Device::Cpu)?)?;
    // Causal self-attention (the text tower's and the decoder's).
    let stack = Stack::new(shape, false)?;
    let mask = causal_mask(76, &Device::Cpu)?;
    let (plain_loss, plain) = gradients(&stack, &x, None, Some(&mask), false)?;
    let (loss, checkpointed) = gradients(&stack, &x, None, Some(&mask), true)?;
    assert_eq!(plain_loss, loss);
    assert_same_gradients(&stack, &[&x], &plain, &checkpointed);
    // Cross-attention over 255 image tokens, whose gradient flows back to the image tower.
    let stack = Stack::new(shape, true)?;
    let kv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 255, 512), &Device::Cpu)?)?;
    let (plain_loss, plain) = gradients(&stack, &x, Some(&kv), None, false)?;
    let (loss, checkpointed) = gradients(&stack, &x, Some(&kv), None, true)?;
    assert_eq!(plain_loss, loss);
    assert_same_gradients(&stack, &[&x, &kv], &plain, &checkpointed);
    Ok(())
}

#[test]
fn a_checkpointed_block_keeps_no_activation_in_the_graph() -> Result<()> {
    let shape = shape(64, 4);
    let stack = Stack::new(shape, false)?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 64), &Device::Cpu)?)?;
    let plain = stack.blocks[0].forward_checkpointed(x.as_tensor(), None, false)?;
    let checkpointed = stack.blocks[0].forward_checkpointed(x.as_tensor(), None, true)?;
    assert_eq!(crate::compare::max_abs_diff(&plain, &checkpointed)?, 0.0);
    // The plain graph holds the block's intermediates; the checkpointed one only its input, its
    // weights and the one-element tokens of their gradient sinks.
    let nodes = |t: &Tensor| t.sorted_nodes().len();
    assert!(nodes(&plain) > 30, "{}", nodes(&plain));
    let weights = stack.vars.all_vars().len() / 2;
    assert_eq!(nodes(&checkpointed), 1 + 1 + 2 * weights);
    // Repeated backward passes of one graph give the same gradients each time.
    let g1 = checkpointed.sum_all()?.backward()?;
    let g2 = checkpointed.sum_all()?.backward()?;
    let mut compared = 0;
    for v in stack.vars.all_vars() {
        if let Some(a) = g1.get(&v) {
            assert_eq!(crate::compare::max_abs_diff(a, g2.get(&v).unwrap())?, 0.0);
            compared += 1;
        }
    }
    assert_eq!(
        compared, weights,
        "the first block's weights have gradients"
    );
    Ok(())
}
