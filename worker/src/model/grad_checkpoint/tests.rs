//! Checkpointed blocks of ViT-B/32's shapes give the plain backward's gradients.

use crate::model::grad_checkpoint::checkpoint;
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

/// `exp(x ⊙ w)`, its product checkpointed inside: a checkpoint nested in a checkpointed module,
/// as attention's core is inside a checkpointed block on the GPU. Counts its inner forwards.
#[derive(Clone)]
struct Nested {
    w: Tensor,
    inner_forwards: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl crate::model::grad_checkpoint::Recomputable for Nested {
    fn map_weights(&self, f: &mut dyn FnMut(&Tensor) -> Tensor) -> Self {
        Self {
            w: f(&self.w),
            inner_forwards: self.inner_forwards.clone(),
        }
    }
}

/// A module without weights whose forward counts its calls.
#[derive(Clone)]
struct Counted(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl crate::model::grad_checkpoint::Recomputable for Counted {
    fn map_weights(&self, _: &mut dyn FnMut(&Tensor) -> Tensor) -> Self {
        self.clone()
    }
}

impl Nested {
    fn forward(&self, x: &Tensor, nest: bool) -> candle_core::Result<Tensor> {
        let y = x.broadcast_mul(&self.w)?;
        let inner = Counted(self.inner_forwards.clone());
        let exp = |c: &Counted, y: &Tensor, _: Option<&Tensor>| {
            c.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            y.exp()
        };
        match nest {
            true => checkpoint(&inner, &y, None, exp),
            false => exp(&inner, &y, None),
        }
    }
}

#[test]
fn a_checkpoint_nested_in_a_recomputation_runs_plainly() -> Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let w = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu)?)?;
    let x = Var::from_tensor(&Tensor::new(
        &[[0.1f32, 0.2, 0.3], [1.0, -2.0, 0.5]],
        &Device::Cpu,
    )?)?;
    let module = Nested {
        w: w.as_tensor().clone(),
        inner_forwards: Default::default(),
    };
    let plain = module
        .forward(x.as_tensor(), false)?
        .sum_all()?
        .backward()?;
    module.inner_forwards.store(0, SeqCst);
    let y = checkpoint(&module, x.as_tensor(), None, |m, x, _| m.forward(x, true))?;
    // The outer forward ran the inner one on detached inputs: plainly, once.
    assert_eq!(module.inner_forwards.load(SeqCst), 1);
    let grads = y.sum_all()?.backward()?;
    // The recomputation ran it plainly once more (nested, it would have run twice).
    assert_eq!(module.inner_forwards.load(SeqCst), 2);
    for t in [w.as_tensor(), x.as_tensor()] {
        let (a, b) = (plain.get(t).unwrap(), grads.get(t).unwrap());
        assert_eq!(crate::compare::max_abs_diff(a, b)?, 0.0);
    }
    // Outside a recomputation a nested module's checkpoint is a checkpoint again.
    module.inner_forwards.store(0, SeqCst);
    let y = module.forward(x.as_tensor(), true)?;
    y.sum_all()?.backward()?;
    assert_eq!(module.inner_forwards.load(SeqCst), 2);
    Ok(())
}
