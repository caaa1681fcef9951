//! The attentional pooler: learned queries attend over the image tokens.

use super::attention::MultiheadAttention;
use super::autocast::widen;
use super::layers::{normal, LayerNorm};
use crate::model::tensor_parallel::TensorParallel;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// open_clip's `AttentionalPooler`: `n_queries` learned queries (normalised by `ln_q`) attend
/// over the normalised (`ln_k`) image tokens. In CoCa query 0 becomes the contrastive embedding
/// and the rest are the image tokens the decoder reads.
#[derive(Debug, Clone)]
pub struct AttentionalPooler {
    query: Tensor,
    attn: MultiheadAttention,
    ln_q: LayerNorm,
    ln_k: LayerNorm,
}

impl AttentionalPooler {
    /// `d_model`: output width; `context_dim`: width of the tokens pooled over; `heads`: the
    /// full head count (a tensor-parallel member holds `heads / T` of them).
    pub fn new(
        d_model: usize,
        context_dim: usize,
        heads: usize,
        n_queries: usize,
        vb: VarBuilder,
        tp: &TensorParallel,
    ) -> Result<Self> {
        let proj_std = (d_model as f64).powf(-0.5);
        Ok(Self {
            query: vb.get_with_hints((n_queries, d_model), "query", normal(1.0))?,
            attn: MultiheadAttention::new(
                d_model,
                context_dim,
                heads,
                proj_std,
                vb.pp("attn"),
                tp,
            )?,
            ln_q: LayerNorm::new(d_model, vb.pp("ln_q"))?,
            ln_k: LayerNorm::new(context_dim, vb.pp("ln_k"))?,
        })
    }

    /// `[B, N, context_dim]` → `[B, n_queries, d_model]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_first(x, self.query.dim(0)?)
    }

    /// The outputs of the first `n` queries only, `[B, n, d_model]`: each query attends over
    /// the tokens on its own (its layer norm, projections and softmax are per query), so these
    /// equal the first `n` rows of [`Self::forward`] without computing the others.
    pub fn forward_first(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let b = x.dim(0)?;
        let x = self.ln_k.forward(x)?;
        let q = self.ln_q.forward(&self.query.narrow(0, 0, n)?)?;
        let (n, d) = q.dims2()?;
        let q = q.unsqueeze(0)?.broadcast_as((b, n, d))?.contiguous()?;
        // The attention's output joins no residual stream here: float32, as autocast returns it
        // to the float32 ops after it.
        widen(&self.attn.forward_cross(&q, &x, None)?)
    }
}
