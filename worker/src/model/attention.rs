//! Multi-head attention with PyTorch `nn.MultiheadAttention`'s parameters and semantics.

use super::autocast::Autocast;
use super::grad_checkpoint::{checkpoint, Recomputable};
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
    /// The k and v rows of the packed weight as one projection (keys and values of another
    /// sequence in one product), when the weight is packed.
    kv_proj: Option<Linear>,
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
        let (in_proj, kv_proj, q_w, k_w, v_w) = if kv_dim == d_model {
            let w = vb.get_with_hints((3 * local, d_model), "in_proj_weight", normal(attn_std))?;
            let part = |i: usize| w.narrow(0, i * local, local);
            let packed = Linear::from_parts(w.clone(), Some(bias.clone()));
            let kv = Linear::from_parts(
                w.narrow(0, local, 2 * local)?,
                Some(bias.narrow(0, local, 2 * local)?),
            );
            (Some(packed), Some(kv), part(0)?, part(1)?, part(2)?)
        } else {
            let q = vb.get_with_hints((local, d_model), "q_proj_weight", normal(attn_std))?;
            let k = vb.get_with_hints((local, kv_dim), "k_proj_weight", normal(attn_std))?;
            let v = vb.get_with_hints((local, kv_dim), "v_proj_weight", normal(attn_std))?;
            (None, None, q, k, v)
        };
        Ok(Self {
            in_proj,
            q_proj: Linear::from_parts(q_w, Some(bias_part(0)?)),
            k_proj: Linear::from_parts(k_w, Some(bias_part(1)?)),
            v_proj: Linear::from_parts(v_w, Some(bias_part(2)?)),
            kv_proj,
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
            kv_proj: self.kv_proj.as_ref().map(|l| l.map_weights(f)),
            out_proj: self.out_proj.map_weights(f),
            heads: self.heads,
            head_dim: self.head_dim,
            tp: self.tp.clone(),
        }
    }

    /// Self-attention of `x` `[B, T, d]`; `mask` is additive, `[T, T]` or `[B, T, T]`.
    pub fn forward_self(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.attend_projections(&self.self_projections(x)?, None, mask)
    }

    /// Queries, keys and values `[B, H, T, hd]` of `x` `[B, T, d]` for self-attention (and for
    /// decoding, which appends the keys and values to its cache).
    pub(crate) fn self_qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let packed = self.self_projections(x)?;
        let (b, t, _) = packed.dims3()?;
        let qkv = self.shape().split(&packed, b, t, 3)?;
        Ok((qkv.get(0)?, qkv.get(1)?, qkv.get(2)?))
    }

    /// Queries, keys and values of `x` `[B, T, d]` side by side, `[B, T, 3·d]` in the compute
    /// dtype: one product (three products concatenated for unpacked weights).
    fn self_projections(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.tp.autocast().cast(&self.tp.copy_in(x)?)?;
        match &self.in_proj {
            Some(in_proj) => in_proj.forward(&x),
            None => Tensor::cat(
                &[
                    &self.q_proj.forward(&x)?,
                    &self.k_proj.forward(&x)?,
                    &self.v_proj.forward(&x)?,
                ],
                2,
            ),
        }
    }

    /// This member's heads and their width.
    fn shape(&self) -> HeadShape {
        HeadShape {
            heads: self.heads,
            head_dim: self.head_dim,
        }
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
        let q = self.q_proj.forward(&q_x)?;
        self.attend_projections(&q, Some(&self.cross_kv_packed(&kv_x)?), mask)
    }

    /// The keys and values `[B, S, 2·d]` of `kv_x` `[B, S, kdim]` in the compute dtype, side by
    /// side: one product for a packed weight, else both projections concatenated.
    fn cross_kv_packed(&self, kv_x: &Tensor) -> Result<Tensor> {
        match &self.kv_proj {
            Some(kv_proj) => kv_proj.forward(kv_x),
            None => Tensor::cat(
                &[&self.k_proj.forward(kv_x)?, &self.v_proj.forward(kv_x)?],
                2,
            ),
        }
    }

    /// The keys and values `[B, S, d]` of `kv_x` `[B, S, kdim]` (heads interleaved), for
    /// repeated cross-attention over it while decoding.
    pub fn cross_kv(&self, kv_x: &Tensor) -> Result<(Tensor, Tensor)> {
        let kv = self.cross_kv_packed(&self.tp.autocast().cast(kv_x)?)?;
        let local = self.heads * self.head_dim;
        Ok((
            kv.narrow(2, 0, local)?.contiguous()?,
            kv.narrow(2, local, local)?.contiguous()?,
        ))
    }

    /// `[B, T, d]` → `[B, H, T, hd]`, contiguous.
    pub(crate) fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        self.shape().split(x, b, t, 1)?.get(0)
    }

    /// [`attention_core`] over the projections `q` (`[B, T, 3·d]`, queries, keys and values,
    /// without `kv`; else `[B, T, d]` and `kv` `[B, S, 2·d]`), then the output projection; the
    /// core recomputed in the backward pass where [`recomputes_probabilities`] says so.
    fn attend_projections(
        &self,
        q: &Tensor,
        kv: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.attend_recomputing(q, kv, mask, recomputes_probabilities(q.device()))
    }

    /// [`Self::attend_projections`], the core recomputed in the backward pass with
    /// `recompute`.
    fn attend_recomputing(
        &self,
        q: &Tensor,
        kv: Option<&Tensor>,
        mask: Option<&Tensor>,
        recompute: bool,
    ) -> Result<Tensor> {
        let ac = self.tp.autocast();
        let heads = attention_core(q, kv, mask, self.shape(), ac, recompute)?;
        self.out_proj.forward_reduced(&heads, &self.tp)
    }

    /// `softmax(q kᵀ / √hd + mask) v`, heads merged, then the output projection (summed over
    /// the tensor-parallel group in float32; in the compute dtype at degree 1:
    /// [`Linear::forward_reduced`]). `q` `[B, H, T, hd]`, `k` and `v` `[B, H, S, hd]`:
    /// decoding's, over its cache.
    pub(crate) fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let core = AttentionCore {
            autocast: self.tp.autocast(),
            mask: mask.cloned(),
            shape: self.shape(),
        };
        let heads = merge_heads(&core.forward(q, k, v)?)?;
        self.out_proj.forward_reduced(&heads, &self.tp)
    }
}

/// One member's attention heads: how many, and their width.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    /// Heads of this member.
    pub heads: usize,
    /// Each head's width.
    pub head_dim: usize,
}

impl HeadShape {
    /// `[B, T, n·d]` (n projections side by side) → `[n, B, H, T, hd]`, contiguous.
    fn split(&self, packed: &Tensor, b: usize, t: usize, n: usize) -> Result<Tensor> {
        packed
            .reshape((b, t, n, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()
    }
}

/// The heads `[B, H, T, hd]` merged to `[B, T, H·hd]`, contiguous.
fn merge_heads(heads: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = heads.dims4()?;
    heads.transpose(1, 2)?.contiguous()?.reshape((b, t, h * hd))
}

/// Whether training recomputes attention's probabilities in the backward pass on `device`
/// instead of keeping them. On a GPU, yes: memory binds there (L-14 at batch 64 in bf16 kept
/// 9.7 GB of them), and PyTorch's fused attention keeps none either. On the CPU's fused path,
/// no: there the recomputation cost 2 % of a B-32 step for 1 % of its memory (87 MB at batch
/// 8). The portable path (`COCA_PORTABLE_OPS=1`) is the GPU's ops on either device, so it
/// recomputes them on the CPU too.
pub(crate) fn recomputes_probabilities(device: &candle_core::Device) -> bool {
    !device.is_cpu() || ops::portable_forced()
}

/// Attention's core `softmax(q kᵀ / √hd + mask) v` over the projections of its queries, keys
/// and values, in `autocast`'s compute dtype: `q` `[B, T, 3·d]` holds all three side by side
/// (self-attention) when `kv` is `None`, else `q` is `[B, T, d]` and `kv` `[B, S, 2·d]`. Split
/// into `shape`'s heads, attended, and merged back to `[B, T, d]`. With `recompute` (and a
/// gradient flowing) it is checkpointed: neither its probabilities `[B, H, T, S]` (float32, and
/// their cast copy under autocast) nor the heads' copies are kept for the backward pass, which
/// recomputes them from the projections the graph keeps anyway. The gradients are the same bits
/// ([`checkpoint`] replays the same ops).
pub fn attention_core(
    q: &Tensor,
    kv: Option<&Tensor>,
    mask: Option<&Tensor>,
    shape: HeadShape,
    autocast: Autocast,
    recompute: bool,
) -> Result<Tensor> {
    let core = AttentionCore {
        autocast,
        mask: mask.cloned(),
        shape,
    };
    let forward = |core: &AttentionCore, q: &Tensor, kv: Option<&Tensor>| core.over(q, kv);
    match recompute {
        true => checkpoint(&core, q, kv, forward),
        false => forward(&core, q, kv),
    }
}

/// Attention's core over one member's heads, `softmax(q kᵀ / √hd + mask) v`: no weights, so
/// [`checkpoint`] recomputes it from its inputs alone.
#[derive(Debug, Clone)]
struct AttentionCore {
    autocast: Autocast,
    /// Additive, `[T, S]` or `[B, T, S]`; a constant (no gradient).
    mask: Option<Tensor>,
    shape: HeadShape,
}

impl Recomputable for AttentionCore {
    fn map_weights(&self, _: &mut dyn FnMut(&Tensor) -> Tensor) -> Self {
        self.clone()
    }
}

impl AttentionCore {
    /// [`attention_core`]'s split, attention and merge.
    fn over(&self, q: &Tensor, kv: Option<&Tensor>) -> Result<Tensor> {
        if kv.is_none() && self.runs_frozen(q) {
            let scale = 1.0 / (self.shape.head_dim as f32).sqrt();
            return ops::frozen_self_attention(q, self.shape.heads, self.mask.as_ref(), scale);
        }
        let (b, t, _) = q.dims3()?;
        let (q, kv) = match kv {
            None => {
                let qkv = self.shape.split(q, b, t, 3)?;
                (qkv.get(0)?, qkv.narrow(0, 1, 2)?)
            }
            Some(kv) => {
                let (_, s, _) = kv.dims3()?;
                (
                    self.shape.split(q, b, t, 1)?.get(0)?,
                    self.shape.split(kv, b, s, 2)?,
                )
            }
        };
        merge_heads(&self.forward(&q, &kv.get(0)?, &kv.get(1)?)?)
    }

    /// Whether self-attention over the packed projections `qkv` runs as
    /// [`ops::frozen_self_attention`]: float32 on the CPU (compute dtype included, and the
    /// fused kernels not turned off), recording no graph.
    fn runs_frozen(&self, qkv: &Tensor) -> bool {
        let mut tensors = vec![qkv];
        tensors.extend(self.mask.as_ref());
        self.autocast.dtype().is_none()
            && !tensors.iter().any(|t| t.track_op())
            && ops::fused_on_cpu(&tensors)
    }

    /// `q` `[B, H, T, hd]`, `k` and `v` `[B, H, S, hd]` → `[B, H, T, hd]` in the compute dtype.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let ac = self.autocast;
        // The scores in the compute dtype, their softmax computed (and returned) in float32, in
        // one op that does not keep the scores; the product with v is back in the compute dtype.
        let probs = ops::attention_probs(
            &ac.cast(q)?,
            &ac.cast(k)?.t()?,
            self.mask.as_ref(),
            1.0 / (q.dim(3)? as f64).sqrt(),
        )?;
        ac.matmul(&probs, v)
    }
}

#[cfg(test)]
mod tests;
