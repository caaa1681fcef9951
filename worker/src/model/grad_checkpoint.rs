//! Activation checkpointing (open_clip's `--grad-checkpointing`): a module's forward runs without
//! recording a graph, and its backward recomputes the forward with a graph and backpropagates
//! through that.
//!
//! candle 0.11 has no checkpoint API, and a `CustomOp`'s backward returns gradients only for its
//! (at most three) tensor arguments. So [`checkpoint`] builds three kinds of node:
//!
//! - the **output**, a `CustomOp3` of the input `x`, an optional second input (the decoder's
//!   image tokens) and a *token*. Its forward hands out the value computed beforehand with the
//!   module's weights detached (so no intermediate is kept); its backward re-runs the forward on
//!   fresh variable copies of the inputs, backpropagates the output gradient through that graph,
//!   returns the inputs' gradients and leaves the weights' gradients in a stash;
//! - one **sink** per weight variable, a chain of `CustomOp2(previous token, weight)` ending in
//!   the token: each returns its weight's gradient from the stash. A sink is upstream of the
//!   output, so candle's backward visits it after the output's backward has filled the stash,
//!   and the weights' gradients land in the ordinary [`candle_core::backprop::GradStore`] (summed
//!   with any other use of the weight, as for a plain op);
//! - a **seed** that starts the recomputed backward with the output gradient itself.
//!
//! A checkpoint met while another's backward recomputes its forward (attention's core inside a
//! checkpointed block) runs plainly: the recomputed graph lives only for that backward, so
//! recomputing again inside it would repeat work and save nothing.
//!
//! The tokens are one-element zeros, so the extra nodes cost nothing. Under tensor parallelism
//! the recomputed forward repeats its collectives in the backward pass; every member runs the
//! same graph, so every member repeats the same collectives in the same order.

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType,
    Layout, Result, Shape, Storage, Tensor, TensorId, Var,
};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

thread_local! {
    /// Whether this thread is recomputing a checkpointed forward (see the module documentation).
    static RECOMPUTING: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as recomputing until dropped (also on an error's early return).
struct Recomputing {
    was: bool,
}

impl Recomputing {
    fn start() -> Self {
        Self {
            was: RECOMPUTING.replace(true),
        }
    }
}

impl Drop for Recomputing {
    fn drop(&mut self) {
        RECOMPUTING.set(self.was);
    }
}

/// A module whose forward [`checkpoint`] can recompute.
pub trait Recomputable: Clone + Send + Sync + 'static {
    /// The same module over other tensors: each weight replaced by `f(weight)`.
    fn map_weights(&self, f: &mut dyn FnMut(&Tensor) -> Tensor) -> Self;
}

/// The module's forward `f(module, x, ctx)`.
type Forward<M> = dyn Fn(&M, &Tensor, Option<&Tensor>) -> Result<Tensor> + Send + Sync;

/// `f(module, x, ctx)` without keeping its intermediate activations: the backward pass
/// recomputes them. Gradients (of `x`, of `ctx` and of every weight variable of `module`) equal
/// those of calling `f` directly. When nothing tracks a gradient, or while a checkpoint's
/// forward is being recomputed, this is `f` itself.
pub fn checkpoint<M: Recomputable>(
    module: &M,
    x: &Tensor,
    ctx: Option<&Tensor>,
    f: impl Fn(&M, &Tensor, Option<&Tensor>) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let vars = weight_variables(module);
    let inputs_track = x.track_op() || ctx.is_some_and(Tensor::track_op);
    if (vars.is_empty() && !inputs_track) || RECOMPUTING.get() {
        return f(module, x, ctx);
    }
    let value = f(
        &module.map_weights(&mut |t| t.detach()),
        &x.detach(),
        ctx.map(Tensor::detach).as_ref(),
    )?;
    let stash: Stash = Arc::default();
    let mut token = Tensor::zeros(1, DType::F32, x.device())?;
    for var in &vars {
        token = token.apply_op2(
            var,
            WeightSink {
                stash: stash.clone(),
            },
        )?;
    }
    let ctx_arg = match ctx {
        Some(c) => c.clone(),
        None => Tensor::zeros(1, DType::F32, x.device())?,
    };
    let module = module.clone();
    x.apply_op3(
        &ctx_arg,
        &token,
        Recompute {
            value: Mutex::new(Some(value)),
            module,
            forward: Box::new(f),
            has_ctx: ctx.is_some(),
            vars,
            stash,
        },
    )
}

/// The distinct variables the module's weights are (or are views of), in a fixed order.
fn weight_variables<M: Recomputable>(module: &M) -> Vec<Tensor> {
    let mut weights = Vec::new();
    module.map_weights(&mut |t| {
        weights.push(t.clone());
        t.clone()
    });
    let mut seen = std::collections::HashSet::new();
    let mut vars = Vec::new();
    for w in &weights {
        let roots: Vec<Tensor> = if w.is_variable() {
            vec![w.clone()]
        } else {
            w.sorted_nodes()
                .into_iter()
                .filter(|n| n.is_variable())
                .cloned()
                .collect()
        };
        for v in roots {
            if seen.insert(v.id()) {
                vars.push(v);
            }
        }
    }
    vars
}

/// Weight gradients from a recomputed backward, waiting for their sinks.
type Stash = Arc<Mutex<HashMap<TensorId, Tensor>>>;

fn lock(stash: &Stash) -> Result<std::sync::MutexGuard<'_, HashMap<TensorId, Tensor>>> {
    stash
        .lock()
        .map_err(|_| candle_core::Error::Msg("gradient checkpoint stash poisoned".into()))
}

/// The storage of `t` as an owned CPU storage (a copy).
fn cpu_storage(t: &Tensor) -> Result<CpuStorage> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok(s.clone()),
        _ => bail!("gradient checkpoint: the value is not on the CPU (layout {layout:?})"),
    }
}

/// The storage of `t` as an owned CUDA storage (a copy).
fn cuda_storage(t: &Tensor) -> Result<CudaStorage> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => s.try_clone(layout),
        _ => bail!("gradient checkpoint: the value is not on a CUDA device"),
    }
}

/// The checkpointed output: see the module documentation.
struct Recompute<M> {
    /// The output computed with detached weights, handed out (and dropped) by the forward.
    value: Mutex<Option<Tensor>>,
    /// The module with its graph-tracked weights, for the recomputation.
    module: M,
    forward: Box<Forward<M>>,
    has_ctx: bool,
    vars: Vec<Tensor>,
    stash: Stash,
}

impl<M> Recompute<M> {
    /// The precomputed output (once: the forward runs once).
    fn take_value(&self) -> Result<Tensor> {
        let taken = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg("gradient checkpoint value poisoned".into()))?
            .take();
        match taken {
            // The storage is handed out whole: it must start with the tensor's data, in order
            // (a module's output is a fresh buffer; anything else is compacted first).
            Some(t) if t.layout().is_contiguous() && t.layout().start_offset() == 0 => Ok(t),
            Some(t) => t.force_contiguous(),
            None => bail!("gradient checkpoint: forward applied twice"),
        }
    }
}

impl<M: Recomputable> CustomOp3 for Recompute<M> {
    fn name(&self) -> &'static str {
        "grad-checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let value = self.take_value()?;
        Ok((cpu_storage(&value)?, value.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let value = self.take_value()?;
        Ok((cuda_storage(&value)?, value.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        token: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let x_var = Var::from_tensor(&x.detach())?;
        let ctx_var = if self.has_ctx {
            Some(Var::from_tensor(&ctx.detach())?)
        } else {
            None
        };
        let y = {
            let _recomputing = Recomputing::start();
            (self.forward)(
                &self.module,
                x_var.as_tensor(),
                ctx_var.as_ref().map(Var::as_tensor),
            )?
        };
        let mut grads = y
            .apply_op1(SeedGradient { grad: grad.clone() })?
            .backward()?;
        drop(y);
        {
            let mut stash = lock(&self.stash)?;
            for var in &self.vars {
                if let Some(g) = grads.remove(var) {
                    stash.insert(var.id(), g);
                }
            }
        }
        // Every tracked argument gets a gradient (candle expects one for each node it visits).
        let input_grad = |arg: &Tensor, var: Option<&Var>| -> Result<Option<Tensor>> {
            match var {
                Some(v) if arg.track_op() => match grads.get(v.as_tensor()) {
                    Some(g) => Ok(Some(g.clone())),
                    None => Ok(Some(arg.zeros_like()?)),
                },
                _ => Ok(None),
            }
        };
        Ok((
            input_grad(x, Some(&x_var))?,
            input_grad(ctx, ctx_var.as_ref())?,
            Some(token.zeros_like()?),
        ))
    }
}

/// One link of the token chain: hands its weight the gradient the recomputation stashed.
struct WeightSink {
    stash: Stash,
}

impl CustomOp2 for WeightSink {
    fn name(&self) -> &'static str {
        "grad-checkpoint-sink"
    }

    fn cpu_fwd(
        &self,
        token: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((token.clone(), Shape::from(1)))
    }

    fn cuda_fwd(
        &self,
        token: &CudaStorage,
        layout: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Ok((token.try_clone(layout)?, Shape::from(1)))
    }

    fn bwd(
        &self,
        previous: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let previous_grad = if previous.track_op() {
            Some(previous.zeros_like()?)
        } else {
            None
        };
        Ok((previous_grad, lock(&self.stash)?.remove(&weight.id())))
    }
}

/// A scalar whose backward hands its argument a given gradient: backpropagating it through a
/// recomputed output backpropagates that output's gradient.
struct SeedGradient {
    grad: Tensor,
}

impl CustomOp1 for SeedGradient {
    fn name(&self) -> &'static str {
        "grad-checkpoint-seed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(1)))
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let zero = Tensor::zeros(1, DType::F32, self.grad.device())?;
        Ok((cuda_storage(&zero)?, Shape::from(1)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad.clone()))
    }
}

#[cfg(test)]
mod tests;
