//! The small building blocks: layer norm, linear maps and the transformer MLP.

use super::autocast::widen;
use super::ops;
use crate::model::tensor_parallel::TensorParallel;
use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use std::sync::{Arc, OnceLock};

/// PyTorch's `nn.LayerNorm` eps, which open_clip uses everywhere.
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// Affine layer norm over the last dimension (`weight`, `bias`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias` of width `dim`.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
        })
    }

    /// Normalises `x` (any float dtype); the output is float32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, LAYER_NORM_EPS)
    }

    /// Normalises `x` as the operand of the matrix products that read it: in `tp`'s compute
    /// dtype at degree 1 ([`ops::layer_norm_to`], the same numbers as the float32 output cast
    /// there, without keeping the float32 one); float32 under tensor parallelism, where the
    /// group's copy comes before the cast (its gradient is summed in float32).
    pub fn forward_operand(&self, x: &Tensor, tp: &TensorParallel) -> Result<Tensor> {
        if !tp.is_single() {
            return self.forward(x);
        }
        let dtype = tp.autocast().compute_dtype();
        ops::layer_norm_to(x, &self.weight, &self.bias, LAYER_NORM_EPS, dtype)
    }

    /// The same norm over `f(weight)` and `f(bias)`.
    pub fn map_weights(&self, f: &mut dyn FnMut(&Tensor) -> Tensor) -> Self {
        Self {
            weight: f(&self.weight),
            bias: f(&self.bias),
        }
    }
}

/// Normal initialisation with the given standard deviation.
pub fn normal(std: f64) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: std,
    }
}

/// `x · Wᵀ + b` with a PyTorch-layout weight `[out, in]`.
///
/// Inputs of any rank are flattened to one matrix product, so the weight is never broadcast
/// over the batch (which would make its gradient a batch-sized temporary).
#[derive(Debug, Clone)]
pub struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    /// The `Wᵀ` of a frozen weight (neither a candle `Var` nor computed from one) in the
    /// compute dtype of its first use, made then and kept ([`Self::weight_t`]): evaluation and
    /// embedding models transpose and cast each weight once instead of at every call. A
    /// trainable weight (or a slice or cast of one) changes in place at every optimizer step,
    /// so it is transposed per call. (A frozen model must not outlive in-place updates of the
    /// storage it was built on: each evaluation during training builds its own.) Float32
    /// inputs on the CPU use `frozen_blocks` instead; this serves the others.
    frozen_weight_t: Arc<OnceLock<Tensor>>,
    /// A frozen float32 weight laid out for the CPU product ([`ops::BlockedWeight`]), made on
    /// first use by a float32 input that records no graph, and kept (the same lifetime rule
    /// as `frozen_weight_t`).
    frozen_blocks: Arc<OnceLock<ops::BlockedWeight>>,
}

impl Linear {
    /// Loads `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]`.
    pub fn new(in_dim: usize, out_dim: usize, std: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((out_dim, in_dim), "weight", normal(std))?,
            bias: Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?),
            frozen_weight_t: Arc::default(),
            frozen_blocks: Arc::default(),
        })
    }

    /// A linear map from tensors already loaded (e.g. slices of a packed projection).
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            frozen_weight_t: Arc::default(),
            frozen_blocks: Arc::default(),
        }
    }

    /// `x · Wᵀ + b` in `x`'s dtype (the weight and bias are cast to it: autocast's product
    /// when `x` is half precision).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(blocks) = self.frozen_blocks(x)? {
            return on_rows(x, blocks.dims().0, |x| {
                blocks.forward(x, self.bias.as_ref())
            });
        }
        matmul_last(x, &self.weight_t(x.dtype())?, self.bias.as_ref())
    }

    /// The blocked layout of a frozen float32 weight on the CPU, for an input `x` of float32
    /// that records no graph (inference); `None` where the product goes through candle.
    fn frozen_blocks(&self, x: &Tensor) -> Result<Option<&ops::BlockedWeight>> {
        let frozen = |t: &Tensor| !t.track_op();
        let mut operands = vec![x, &self.weight];
        operands.extend(self.bias.as_ref());
        if !operands.iter().all(|t| frozen(t)) || x.rank() == 0 || !ops::fused_on_cpu(&operands) {
            return Ok(None);
        }
        if let Some(blocks) = self.frozen_blocks.get() {
            return Ok(Some(blocks));
        }
        let blocks = ops::BlockedWeight::new(&self.weight)?;
        Ok(Some(self.frozen_blocks.get_or_init(|| blocks)))
    }

    /// The same map over `f(weight)` and `f(bias)`.
    pub fn map_weights(&self, f: &mut dyn FnMut(&Tensor) -> Tensor) -> Self {
        Self {
            weight: f(&self.weight),
            bias: self.bias.as_ref().map(&mut *f),
            frozen_weight_t: Arc::default(),
            frozen_blocks: Arc::default(),
        }
    }

    /// `Wᵀ` `[in, out]` for the product, in the `compute` dtype.
    ///
    /// A trainable weight changes at every optimizer step, so this is made per call: the weight
    /// cast as it is stored (a contiguous pass; nothing in float32) and viewed transposed.
    /// Every product takes the view (cuBLAS and the native bf16 kernels either layout; the
    /// `gemm` crate packs it a little more slowly where the input is wider than the output,
    /// `c_proj`), and its backward computes the view's gradient as a transpose
    /// ([`ops::biased_product`], vendored candle change 14), so the weight's gradient comes back
    /// contiguous through the cast. A transposed copy of `c_proj`'s weight, kept until
    /// 2026-12-07 for the forward pass's packing, cost a second transposed copy in the backward
    /// pass: B-32 float32 steps of 4.38–4.58 s against 4.25–4.30 s with the view, alternating
    /// on an Intel Xeon.
    ///
    /// A frozen weight's is made once and kept beside the weight, already in the compute dtype
    /// (autocast's cast cache, for models that record no graph): on the CPU a contiguous copy
    /// (the `gemm` crate packs a transposed view more slowly: B-32's image embedding took 5–7 %
    /// longer on an Intel Xeon with views of the weights whose input is not wider than their
    /// output), on a native bf16 kernel (AMX, AVX-512 BF16) or a GPU the cast weight viewed
    /// transposed. A second dtype asked of the same layer is made from the weight per call.
    fn weight_t(&self, compute: DType) -> Result<Tensor> {
        if self.weight.track_op() {
            return self.weight.to_dtype(compute)?.t();
        }
        let cpu = self.weight.device().is_cpu();
        let on_tiles = compute == DType::BF16 && cpu && candle_core::cpu_backend::amx::is_active();
        let make = || match on_tiles || !cpu {
            true => self.weight.to_dtype(compute)?.t(),
            false => ops::transpose_contiguous(&self.weight)?.to_dtype(compute),
        };
        match self.frozen_weight_t.get() {
            Some(t) if t.dtype() == compute => Ok(t.clone()),
            Some(_) => make(),
            None => {
                let t = make()?;
                Ok(self.frozen_weight_t.get_or_init(|| t).clone())
            }
        }
    }

    /// A row-parallel layer: this member's weight columns times its slice of the input, summed
    /// over the tensor-parallel group, then the (replicated) bias once. [`Self::forward`] at
    /// degree 1, in the compute dtype (it joins the residual stream through
    /// [`ops::add_widened`], which widens it without keeping a float32 copy); float32 over a
    /// group (under mixed precision the sum is taken in float32).
    pub fn forward_reduced(&self, x: &Tensor, tp: &TensorParallel) -> Result<Tensor> {
        if tp.is_single() {
            return self.forward(x);
        }
        let y = tp.reduce_out(&widen(&matmul_last(x, &self.weight_t(x.dtype())?, None)?)?)?;
        match &self.bias {
            Some(b) => ops::add_bias(&y, b),
            None => Ok(y),
        }
    }
}

/// `x · w (+ b)` over the last dimension of `x`, for a `[in, out]` matrix `w`, in `x`'s dtype
/// (`w` and `b` are cast to it).
pub fn matmul_last(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let w = w.to_dtype(x.dtype())?;
    on_rows(x, w.dim(1)?, |x| match bias {
        Some(b) => ops::biased_product(x, &w, &b.to_dtype(x.dtype())?),
        None => x.matmul(&w),
    })
}

/// `f` over `x` flattened to a matrix of rows `[rows, in]` (contiguous), its `[rows, out_dim]`
/// result shaped back as `x` with the last dimension `out_dim`.
fn on_rows(
    x: &Tensor,
    out_dim: usize,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / in_dim.max(1);
    let y = f(&x.contiguous()?.reshape((rows, in_dim))?)?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_dim;
    }
    y.reshape(out_dims)
}

/// The transformer MLP: `c_proj(gelu(c_fc(x)))` with exact GELU.
///
/// Under tensor parallelism of degree `T` each member holds `hidden / T` hidden units: `c_fc`
/// column-parallel (weight rows and bias), `c_proj` row-parallel (weight columns; its bias is
/// added after the sum over the group).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) c_fc: Linear,
    pub(crate) c_proj: Linear,
    tp: TensorParallel,
}

impl Mlp {
    /// Loads `{prefix}.c_fc` and `{prefix}.c_proj` (this member's shards); `hidden` is the full
    /// hidden width and `proj_std` initialises `c_proj`.
    pub fn new(
        width: usize,
        hidden: usize,
        proj_std: f64,
        vb: VarBuilder,
        tp: &TensorParallel,
    ) -> Result<Self> {
        let fc_std = (2.0 * width as f64).powf(-0.5);
        let local = tp.part(hidden);
        Ok(Self {
            c_fc: Linear::new(width, local, fc_std, vb.pp("c_fc"))?,
            c_proj: Linear::new(local, width, proj_std, vb.pp("c_proj"))?,
            tp: tp.clone(),
        })
    }

    /// The same MLP over its weights mapped by `f`.
    pub fn map_weights(&self, f: &mut dyn FnMut(&Tensor) -> Tensor) -> Self {
        Self {
            c_fc: self.c_fc.map_weights(f),
            c_proj: self.c_proj.map_weights(f),
            tp: self.tp.clone(),
        }
    }

    /// `c_proj(gelu(c_fc(x)))`: the products in the compute dtype; the output in it too at
    /// degree 1, float32 over a tensor-parallel group ([`Linear::forward_reduced`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.tp.autocast().cast(&self.tp.copy_in(x)?)?;
        self.c_proj
            .forward_reduced(&ops::gelu_erf(&self.c_fc.forward(&x)?)?, &self.tp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn a_frozen_weight_is_transposed_once_and_a_trainable_one_every_call() {
        let w = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 12))
            .unwrap();
        let x = Tensor::ones((3, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
        let frozen = Linear::from_parts(w.clone(), None);
        let var = Var::from_tensor(&w).unwrap();
        let trainable = Linear::from_parts(var.as_tensor().clone(), None);
        // A slice of a variable (as tensor parallelism and packed projections take them).
        let sliced = Linear::from_parts(var.as_tensor().narrow(1, 0, 10).unwrap(), None);
        let ids = |l: &Linear| {
            [
                l.weight_t(DType::F32).unwrap().id(),
                l.weight_t(DType::F32).unwrap().id(),
            ]
        };
        // A frozen weight whose input is narrower than its output gets a contiguous copy too.
        let frozen_narrow = Linear::from_parts(w.t().unwrap().contiguous().unwrap(), None);
        for l in [&frozen, &frozen_narrow] {
            let [a, b] = ids(l);
            assert_eq!(a, b, "a frozen weight's transpose is kept");
            assert!(l.weight_t(DType::F32).unwrap().is_contiguous());
        }
        let x_narrow = Tensor::ones((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            frozen_narrow
                .forward(&x_narrow)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            x_narrow.matmul(&w).unwrap().to_vec2::<f32>().unwrap()
        );
        for l in [&trainable, &sliced] {
            let [a, b] = ids(l);
            assert_ne!(a, b, "a trainable weight's transpose is made per call");
        }
        // In a half dtype the kept copy is cast already (autocast's cast cache); another dtype
        // asked of the same layer is made from the weight, not from the rounded copy.
        let w_fine = (&w * 0.1001).unwrap(); // values bf16 rounds
        let frozen_half = Linear::from_parts(w_fine.clone(), None);
        let half = |l: &Linear| l.weight_t(DType::BF16).unwrap();
        let kept = half(&frozen_half);
        assert_eq!(kept.dtype(), DType::BF16);
        assert_eq!(kept.id(), half(&frozen_half).id());
        let want = w_fine.t().unwrap().to_dtype(DType::BF16).unwrap();
        assert_eq!(
            kept.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            want.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
        );
        let full = frozen_half.weight_t(DType::F32).unwrap();
        assert_eq!(
            full.to_vec2::<f32>().unwrap(),
            w_fine.t().unwrap().to_vec2::<f32>().unwrap()
        );
        // The same products either way, and after the trainable weight changes in place.
        let out = |l: &Linear| {
            let x = x.narrow(1, 0, l.weight.dim(1).unwrap()).unwrap();
            l.forward(&x).unwrap().to_vec2::<f32>().unwrap()
        };
        let y = out(&frozen);
        assert_eq!(y, out(&trainable));
        assert_eq!(y, out(&frozen));
        let y_sliced = out(&sliced);
        var.set(&(w * 2.0).unwrap()).unwrap();
        assert_eq!(out(&trainable)[0][0], 2.0 * y[0][0]);
        assert_eq!(out(&sliced)[0][0], 2.0 * y_sliced[0][0]);
    }

    #[test]
    fn a_trainable_weight_is_cast_then_viewed_and_its_gradient_comes_back_contiguous() {
        // Float32 and bf16 (on a native bf16 kernel or widened, whichever this CPU runs); an
        // input wider than the output (`c_proj`) and narrower; with a bias (one fused op) and
        // without.
        for dtype in [DType::F32, DType::BF16] {
            for (out_dim, in_dim) in [(24, 80), (80, 24)] {
                for with_bias in [false, true] {
                    let w = Tensor::randn(0f32, 0.1, (out_dim, in_dim), &Device::Cpu).unwrap();
                    let b = Tensor::randn(0f32, 0.1, out_dim, &Device::Cpu).unwrap();
                    let var = Var::from_tensor(&w).unwrap();
                    let layer =
                        Linear::from_parts(var.as_tensor().clone(), with_bias.then(|| b.clone()));
                    let wt = layer.weight_t(dtype).unwrap();
                    assert_eq!((wt.dtype(), wt.dims()), (dtype, &[in_dim, out_dim][..]));
                    assert!(!wt.is_contiguous(), "a view of the cast weight");
                    let x = Tensor::randn(0f32, 1.0, (7, in_dim), &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    // The output (as float32) and the weight's gradient of its squared sum,
                    // which reaches the weight contiguous (nothing to copy into the trainer's
                    // buffer).
                    let product_and_gradient = |y: Tensor, var: &Var| {
                        let y = y.to_dtype(DType::F32).unwrap();
                        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                        let grad = grads.get(var.as_tensor()).unwrap();
                        assert_eq!(grad.dtype(), DType::F32);
                        (
                            y.to_vec2::<f32>().unwrap(),
                            grad.to_vec2::<f32>().unwrap(),
                            grad.is_contiguous(),
                        )
                    };
                    let got = product_and_gradient(layer.forward(&x).unwrap(), &var);
                    let case = format!("{dtype:?} {out_dim}x{in_dim} bias {with_bias}");
                    assert!(got.2, "{case}: the weight's gradient is a transposed view");
                    // The float32 transposed copy, cast: the same numbers.
                    let var_ref = Var::from_tensor(&w).unwrap();
                    let wt_ref = var_ref.as_tensor().t().unwrap().contiguous().unwrap();
                    let mut y_ref = x.matmul(&wt_ref.to_dtype(dtype).unwrap()).unwrap();
                    if with_bias {
                        y_ref = y_ref.broadcast_add(&b.to_dtype(dtype).unwrap()).unwrap();
                    }
                    let want = product_and_gradient(y_ref, &var_ref);
                    // gemm may split the sums of the two layouts differently: float32
                    // rounding, no more (bf16 one rounding of it).
                    let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
                    for (a, b, what) in [(&got.0, &want.0, "output"), (&got.1, &want.1, "gradient")]
                    {
                        let (a, b) = (a.iter().flatten(), b.iter().flatten());
                        let scale = b.clone().fold(0f32, |m, v| m.max(v.abs()));
                        let diff = a.zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                        assert!(diff <= tol * scale, "{case}: {what} differs by {diff}");
                    }
                }
            }
        }
    }

    #[test]
    fn frozen_float32_products_run_on_blocked_weights_and_graphs_never_do() {
        let (out_dim, in_dim) = (70, 33);
        let w = (Tensor::arange(0f32, (out_dim * in_dim) as f32, &Device::Cpu)
            .unwrap()
            .reshape((out_dim, in_dim))
            .unwrap()
            * 1e-3)
            .unwrap();
        let b = Tensor::arange(0f32, out_dim as f32, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, in_dim), &Device::Cpu).unwrap();
        let frozen = Linear::from_parts(w.clone(), Some(b.clone()));
        let var = Var::from_tensor(&w).unwrap();
        let trainable = Linear::from_parts(var.as_tensor().clone(), Some(b));
        let y = frozen.forward(&x).unwrap();
        assert!(
            frozen.frozen_blocks.get().is_some(),
            "a frozen weight is blocked"
        );
        assert_eq!(y.dims(), [2, 5, out_dim]);
        let want = trainable.forward(&x).unwrap();
        assert!(trainable.frozen_blocks.get().is_none());
        let diff = (y - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        // An input that records a graph (its gradient is wanted) takes candle's product.
        let tracked = Var::from_tensor(&x).unwrap();
        let other = Linear::from_parts(w.clone(), None);
        other.forward(tracked.as_tensor()).unwrap();
        assert!(other.frozen_blocks.get().is_none());
        // So does a half-precision input.
        let half = x.to_dtype(candle_core::DType::BF16).unwrap();
        let other = Linear::from_parts(w, None);
        other.forward(&half).unwrap();
        assert!(other.frozen_blocks.get().is_none());
    }
}
