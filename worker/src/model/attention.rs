//! Multi-head attention with PyTorch `nn.MultiheadAttention`'s parameters and semantics.

use super::layers::{normal, Linear};
use super::ops;
use crate::model::tensor_parallel::TensorParallel;
use candle_core::{Result, Tensor};

use candle_nn::{Init, VarBuilder};

/// `nn.MultiheadAttention(d_model, heads, kdim, vdim)`.
///
/// When keys and values have the model's width the q/k/v projections are packed in one
/// `in_proj_weight` `[3·d, d]` (and a self-attention computes them in one product); otherwise
/// they are `q_proj_weight`, `k_proj_weight`, `v_proj_weight` as PyTorch names them. The bias is
/// always packed in `in_proj_bias`.
///
/// Under tensor parallelism of degree `T` each member holds `heads / T` heads: its rows of q,
/// of k and of v (packed as `[q_r; k_r; v_r]`, biases alike) and the matching input columns of
/// `out_proj.weight`; the output is summed over the group before `out_proj.bias` is added.
#[derive(Debug, Clone)]
pub struct MultiheadAttention {
    /// The packed weight when keys/values have the model's width.
    pub(crate) in_proj: Option<Linear>,
    pub(crate) q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    pub(crate) out_proj: Linear,
    /// This member's heads.
    pub(crate) heads: usize,
    head_dim: usize,
    pub(crate) tp: TensorParallel,
}

impl MultiheadAttention {
    /// Loads the attention under `vb` (`in_proj_weight`, `in_proj_bias`, `out_proj.*`; this
    /// member's shards). `heads` is the full head count and `proj_std` initialises the output
    /// projection.
    pub fn new(
        d_model: usize,
        kv_dim: usize,
        heads: usize,
        proj_std: f64,
        vb: VarBuilder,
        tp: &TensorParallel,
    ) -> Result<Self> {
        let attn_std = (d_model as f64).powf(-0.5);
        // This member's width of q, of k and of v.
        let local = tp.part(d_model);
        let bias = vb.get_with_hints(3 * local, "in_proj_bias", Init::Const(0.0))?;
        let bias_part = |i: usize| bias.narrow(0, i * local, local);
        let (in_proj, q_w, k_w, v_w) = if kv_dim == d_model {
            let w = vb.get_with_hints((3 * local, d_model), "in_proj_weight", normal(attn_std))?;
            let part = |i: usize| w.narrow(0, i * local, local);
            let packed = Linear::from_parts(w.clone(), Some(bias.clone()));
            (Some(packed), part(0)?, part(1)?, part(2)?)
        } else {
            let q = vb.get_with_hints((local, d_model), "q_proj_weight", normal(attn_std))?;
            let k = vb.get_with_hints((local, kv_dim), "k_proj_weight", normal(attn_std))?;
            let v = vb.get_with_hints((local, kv_dim), "v_proj_weight", normal(attn_std))?;
            (None, q, k, v)
        };
        Ok(Self {
            in_proj,
            q_proj: Linear::from_parts(q_w, Some(bias_part(0)?)),
            k_proj: Linear::from_parts(k_w, Some(bias_part(1)?)),
            v_proj: Linear::from_parts(v_w, Some(bias_part(2)?)),
            out_proj: Linear::new(local, d_model, proj_std, vb.pp("out_proj"))?,
            heads: tp.part(heads),
            head_dim: d_model / heads,
            tp: tp.clone(),
        })
    }

    /// The same attention over its weights mapped by `f` (the packed weight and its q/k/v
    /// views each mapped).
    pub fn map_weights(&self, f: &mut dyn FnMut(&Tensor) -> Tensor) -> Self {
        Self {
            in_proj: self.in_proj.as_ref().map(|l| l.map_weights(f)),
            q_proj: self.q_proj.map_weights(f),
            k_proj: self.k_proj.map_weights(f),
            v_proj: self.v_proj.map_weights(f),
            out_proj: self.out_proj.map_weights(f),
            heads: self.heads,
            head_dim: self.head_dim,
            tp: self.tp.clone(),
        }
    }

    /// Self-attention of `x` `[B, T, d]`; `mask` is additive, `[T, T]` or `[B, T, T]`.
    pub fn forward_self(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (q, k, v) = self.self_qkv(x)?;
        self.attend(&q, &k, &v, mask)
    }

    /// Queries, keys and values `[B, H, T, hd]` of `x` `[B, T, d]` for self-attention (and for
    /// decoding, which appends the keys and values to its cache).
    pub(crate) fn self_qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let x = self.tp.autocast().cast(&self.tp.copy_in(x)?)?;
        let Some(in_proj) = &self.in_proj else {
            return Ok((
                self.split_heads(&self.q_proj.forward(&x)?)?,
                self.split_heads(&self.k_proj.forward(&x)?)?,
                self.split_heads(&self.v_proj.forward(&x)?)?,
            ));
        };
        let (b, t, _) = x.dims3()?;
        // One product for q, k and v, then one copy into [3, B, H, T, hd].
        let qkv = in_proj
            .forward(&x)?
            .reshape((b, t, 3, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        Ok((qkv.get(0)?, qkv.get(1)?, qkv.get(2)?))
    }

    /// Attention of queries `q_x` `[B, T, d]` over keys/values `kv_x` `[B, S, kdim]`.
    pub fn forward_cross(
        &self,
        q_x: &Tensor,
        kv_x: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let ac = self.tp.autocast();
        let q_x = ac.cast(&self.tp.copy_in(q_x)?)?;
        let kv_x = ac.cast(&self.tp.copy_in(kv_x)?)?;
        let q = self.split_heads(&self.q_proj.forward(&q_x)?)?;
        let k = self.split_heads(&self.k_proj.forward(&kv_x)?)?;
        let v = self.split_heads(&self.v_proj.forward(&kv_x)?)?;
        self.attend(&q, &k, &v, mask)
    }

    /// The keys and values `[B, S, d]` of `kv_x` `[B, S, kdim]` (heads interleaved), for
    /// repeated cross-attention over it while decoding.
    pub fn cross_kv(&self, kv_x: &Tensor) -> Result<(Tensor, Tensor)> {
        let kv_x = &self.tp.autocast().cast(kv_x)?;
        let Some(in_proj) = &self.in_proj else {
            return Ok((self.k_proj.forward(kv_x)?, self.v_proj.forward(kv_x)?));
        };
        // k and v are adjacent in the packed weight: one product for both.
        let local = self.heads * self.head_dim;
        let (w, b) = (&in_proj.weight, in_proj.bias.as_ref());
        let kv = Linear::from_parts(
            w.narrow(0, local, 2 * local)?,
            b.map(|b| b.narrow(0, local, 2 * local)).transpose()?,
        )
        .forward(kv_x)?;
        Ok((
            kv.narrow(2, 0, local)?.contiguous()?,
            kv.narrow(2, local, local)?.contiguous()?,
        ))
    }

    /// `[B, T, d]` → `[B, H, T, hd]`, contiguous.
    pub(crate) fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `softmax(q kᵀ / √hd + mask) v`, heads merged, then the output projection (summed over
    /// the tensor-parallel group in float32; in the compute dtype at degree 1:
    /// [`Linear::forward_reduced`]). `q` `[B, H, T, hd]`, `k` and `v` `[B, H, S, hd]`.
    pub(crate) fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, h, t, hd) = q.dims4()?;
        let ac = self.tp.autocast();
        // The scores in the compute dtype, their softmax computed (and returned) in float32, in
        // one op that does not keep the scores; the product with v is back in the compute dtype.
        let probs = ops::attention_probs(
            &ac.cast(q)?,
            &ac.cast(k)?.t()?,
            mask,
            1.0 / (hd as f64).sqrt(),
        )?;
        let out = ac
            .matmul(&probs, v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h * hd))?;
        self.out_proj.forward_reduced(&out, &self.tp)
    }
}
