//! Attention's probabilities `softmax(scale · q·kᵀ + mask)` as one node of the autograd graph.
//!
//! candle's graph keeps every op's inputs until the backward pass, so `q·kᵀ` followed by the
//! softmax keeps the scores `[B, H, T, S]` beside the probabilities, although the softmax's
//! backward reads only the probabilities and the product's reads `q` and `k`. Here the
//! product and the softmax are one op: the scores live only while it runs. That is one
//! `[B, H, T, S]` tensor less per attention layer (for L-14's image tower, 16 × 257² floats per
//! image and layer).

use super::softmax::{mask_batch_of, softmax_backward, softmax_heads, HeadMask};
use super::{f32_contiguous, f32_data, fused, masked_softmax};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// `softmax(scale · q·k_t + mask)` over the last dimension, for `q` `[B, H, T, d]` and `k_t`
/// `[B, H, d, S]` (the keys transposed, a view) of one dtype; `mask` as
/// [`masked_softmax`] takes it. The same numbers as `q.matmul(k_t)` then [`masked_softmax`],
/// forward and backward, returned in float32 as the softmax returns them; where the fused
/// kernels do not run it is those two ops.
pub fn attention_probs(
    q: &Tensor,
    k_t: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, kh, kd, s) = k_t.dims4()?;
    if (kb, kh, kd) != (b, h, d) {
        bail!(
            "attention_probs: keys {:?} do not fit queries {:?}",
            k_t.dims(),
            q.dims()
        );
    }
    let mut inputs = vec![q, k_t];
    inputs.extend(mask);
    if q.dtype() != k_t.dtype() || b * h * t * s * d == 0 || !fused(&inputs) {
        return masked_softmax(&q.matmul(k_t)?, mask, scale);
    }
    let mut op = AttentionProbs {
        dims: (b, h, t, s, d),
        scale: scale as f32,
        mask_batch: 1,
    };
    let q = q.contiguous()?;
    match mask {
        None => q.apply_op2(k_t, op),
        Some(mask) => {
            op.mask_batch = mask_batch_of((b, h, t, s), mask)?;
            q.apply_op3(k_t, &f32_contiguous(mask)?, op)
        }
    }
}

/// [`attention_probs`] for dimensions `(B, H, T, S, d)`: `B · H` products of `T` queries and
/// `S` keys of width `d`.
struct AttentionProbs {
    dims: (usize, usize, usize, usize, usize),
    scale: f32,
    /// 1 when the mask is shared by the batch, else the batch size.
    mask_batch: usize,
}

impl AttentionProbs {
    /// The scores `q·k_t` (a CPU product), softmaxed into a new buffer; the scores are freed on
    /// return.
    fn cpu(
        &self,
        (sq, lq): (&CpuStorage, &Layout),
        (sk, lk): (&CpuStorage, &Layout),
        mask: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, heads, t, s, _) = self.dims;
        let scores = sq.matmul(sk, self.product(), lq, lk)?;
        let x = f32_data(
            "attention-probs",
            &scores,
            &Layout::contiguous(self.shape()),
        )?;
        let mask = HeadMask {
            mask,
            batch: self.mask_batch,
            heads,
        };
        let y = softmax_heads(x, mask, (t, s), self.scale);
        Ok((CpuStorage::F32(y), self.shape()))
    }

    /// The batched product's `(batch, t, s, d)`.
    fn product(&self) -> (usize, usize, usize, usize) {
        let (b, h, t, s, d) = self.dims;
        (b * h, t, s, d)
    }

    /// The probabilities' shape, `[B, H, T, S]`.
    fn shape(&self) -> Shape {
        let (b, h, t, s, _) = self.dims;
        Shape::from((b, h, t, s))
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        (sq, lq): (&candle_core::CudaStorage, &Layout),
        (sk, lk): (&candle_core::CudaStorage, &Layout),
        mask: Option<super::cuda::SoftmaxMask>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let scores = sq.matmul(sk, self.product(), lq, lk)?;
        let layout = Layout::contiguous(self.shape());
        super::cuda::softmax("attention-probs", (&scores, &layout), mask, self.scale)
    }

    /// The backward passes of the softmax and of the product, as those ops compute them.
    fn backward(
        &self,
        q: &Tensor,
        k_t: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let scores_grad = softmax_backward(q, probs, grad, self.scale)?;
        let dq = scores_grad.matmul(&k_t.t()?)?;
        let dk_t = candle_core::backprop::matmul_rhs_grad(q, k_t, &scores_grad)?;
        Ok((Some(dq), Some(dk_t)))
    }
}

impl CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), (s2, l2), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k_t: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(q, k_t, probs, grad)
    }
}

impl CustomOp3 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probs-masked"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let mask = f32_data("attention-probs-masked", s3, l3)?;
        self.cpu((s1, l1), (s2, l2), Some(mask))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let mask = super::cuda::SoftmaxMask {
            mask: (s3, l3),
            batch: self.mask_batch,
        };
        self.cuda((s1, l1), (s2, l2), Some(mask))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k_t: &Tensor,
        _mask: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk_t) = self.backward(q, k_t, probs, grad)?;
        Ok((dq, dk_t, None))
    }
}
