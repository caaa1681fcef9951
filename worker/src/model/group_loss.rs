//! The CoCa loss over a data-parallel group, arranged so that summing every member's gradient
//! gives exactly the gradient of the loss of the whole global batch on one process.
//!
//! Each member computes a *share* of the global loss. The shares' gradients add up (the trainer
//! all-reduces gradients with a sum) to the one-process gradient, whatever the split:
//! - caption: the member's summed token cross-entropy divided by the global count of non-pad
//!   tokens (not its own count, so uneven caption lengths across members weigh right);
//! - contrastive, open_clip's three layouts:
//!   - default (`gather_with_grad` off): features gathered as constants except the member's own
//!     rows, the full global loss on every member. Each member's gradient is then exactly the
//!     global loss's gradient through its own features; the logit scale, which every member sees
//!     whole, keeps its gradient on member 0 only.
//!   - `gather_with_grad`: gathered with gradient (the backward reduce-scatters), every member
//!     computes the full loss; its share is 1/W of it.
//!   - `local_loss` + `gather_with_grad`: each member computes only its own rows of both logit
//!     matrices against everyone's features; its share is its rows' sum over the global row count.
//! - `local_loss` without `gather_with_grad` loses the other members' terms of each gradient
//!   (as in open_clip), so the result would depend on the world size: rejected.

use crate::comm::Communicator;
use crate::model::loss::contrastive_loss;
use crate::model::ops::collective::{all_gather_rows, gather_rows_keeping_own, sum_over_group};
use crate::model::ops::cross_entropy_rows;
use crate::model::tensor_parallel::caption_token_loss;
use crate::model::{CocaLossConfig, CocaOutput};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use coca_common::collective::ReduceOp;
use std::sync::Arc;

/// How the contrastive loss spans the group: open_clip's `--local_loss` / `--gather_with_grad`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContrastiveSpan {
    pub local_loss: bool,
    pub gather_with_grad: bool,
}

impl ContrastiveSpan {
    /// Rejects the combination whose gradient depends on the world size.
    pub fn validate(&self) -> Result<()> {
        if self.local_loss && !self.gather_with_grad {
            bail!(
                "--local_loss needs --gather_with_grad: without it each rank's gradient misses the \
                 other ranks' terms and the result changes with the number of ranks"
            );
        }
        Ok(())
    }
}

/// Global loss values, identical on every member.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossValues {
    pub contrastive: f64,
    pub caption: f64,
    pub total: f64,
}

/// This member's share of the loss, and its terms of the global values.
pub struct GroupLoss {
    /// Backpropagate this on every member and sum the gradients over the group.
    pub share: Tensor,
    /// This member's weighted `[contrastive, caption]` terms; their sums over the group are the
    /// global values. They stay where the model runs until [`Self::values`] reads them, so a
    /// GPU step enqueues its backward pass before it waits for anything.
    terms: Tensor,
    /// The group's count of non-pad caption tokens (read only to explain a caption loss that
    /// is not finite).
    caption_tokens: Tensor,
    comm: Arc<dyn Communicator>,
}

impl GroupLoss {
    /// The global loss values, identical on every member: the micro-batch's one read back to the
    /// host, summed over the group's host transport. Every member must call it, in the same order as
    /// its other collectives over the group.
    pub fn values(&self) -> Result<LossValues> {
        let mut values = self.terms.to_vec1::<f32>()?;
        sum_over(&self.comm, &mut values)?;
        let (c, cap) = (values[0] as f64, values[1] as f64);
        if !cap.is_finite() && self.caption_tokens.to_scalar::<f32>()? == 0.0 {
            bail!("caption loss: every label of the global batch is padding");
        }
        Ok(LossValues {
            contrastive: c,
            caption: cap,
            total: c + cap,
        })
    }
}

/// Sums `values` over the group's host transport (identical results on every member).
fn sum_over(comm: &Arc<dyn Communicator>, values: &mut [f32]) -> Result<()> {
    comm.transport().all_reduce(values, ReduceOp::Sum)
}

/// The caption share — this member's token losses over the global count of non-pad tokens (the
/// logits may be split by vocabulary over a tensor-parallel group, `out.tp`) — and that count.
/// Both stay where the logits are: the count is summed over the group there.
fn caption_share(
    out: &CocaOutput,
    pad_id: u32,
    comm: &Arc<dyn Communicator>,
) -> Result<(Tensor, Tensor)> {
    let (sum, local) = caption_token_loss(&out.logits, &out.labels, pad_id, &out.tp)?;
    let counted = sum_over_group(&local, comm)?;
    Ok((sum.div(&counted)?, counted))
}

/// The contrastive share and the value to sum over members for reporting.
fn contrastive_share(
    out: &CocaOutput,
    span: ContrastiveSpan,
    comm: &Arc<dyn Communicator>,
) -> Result<(Tensor, Tensor)> {
    span.validate()?;
    let members = comm.size() as f64;
    let (image, text, scale) = (&out.image_features, &out.text_features, &out.logit_scale);
    if !span.gather_with_grad {
        let (image, text) = (
            gather_rows_keeping_own(image, comm)?,
            gather_rows_keeping_own(text, comm)?,
        );
        let scale = if comm.rank() == 0 {
            scale.clone()
        } else {
            scale.detach()
        };
        let loss = contrastive_loss(&image, &text, &scale)?;
        let reported = (&loss / members)?;
        return Ok((loss, reported));
    }
    let all_image = all_gather_rows(image, comm)?;
    let all_text = all_gather_rows(text, comm)?;
    if !span.local_loss {
        let share = (contrastive_loss(&all_image, &all_text, scale)? / members)?;
        return Ok((share.clone(), share));
    }
    let (n, total) = (image.dim(0)?, all_image.dim(0)?);
    // This member's offset: the rows of lower members (gathered counts are in member order).
    let mut counts = vec![0f32; comm.size()];
    comm.transport().all_gather(&[n as f32], &mut counts)?;
    let offset = counts[..comm.rank()].iter().sum::<f32>() as u32;
    let targets = Tensor::arange(offset, offset + n as u32, image.device())?;
    let per_image = image.matmul(&all_text.t()?)?.broadcast_mul(scale)?;
    let per_text = text.matmul(&all_image.t()?)?.broadcast_mul(scale)?;
    let image_ce = cross_entropy_rows(&per_image, &targets, None)?.sum_all()?;
    let text_ce = cross_entropy_rows(&per_text, &targets, None)?.sum_all()?;
    let share = ((image_ce + text_ce)? * (0.5 / total as f64))?;
    Ok((share.clone(), share))
}

/// open_clip's `CoCaLoss` over the group `comm` (a group of one gives the one-process loss).
pub fn coca_group_loss(
    out: &CocaOutput,
    cfg: &CocaLossConfig,
    span: ContrastiveSpan,
    comm: &Arc<dyn Communicator>,
) -> Result<GroupLoss> {
    let (contrastive, reported) = contrastive_share(out, span, comm)?;
    let (caption, caption_tokens) = caption_share(out, cfg.pad_id, comm)?;
    let contrastive = (contrastive * cfg.contrastive_weight)?;
    let caption = (caption * cfg.caption_weight)?;
    let terms = Tensor::stack(
        &[
            (reported * cfg.contrastive_weight)?.to_dtype(DType::F32)?,
            caption.to_dtype(DType::F32)?,
        ],
        0,
    )?;
    // The reported values hold no graph (only `share` does), so that the backward pass can
    // free the activations as it goes (`Tensor::backward_freeing`, the trainer).
    Ok(GroupLoss {
        share: (contrastive + caption)?,
        terms: terms.detach(),
        caption_tokens: caption_tokens.detach(),
        comm: comm.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::HostTransport;
    use crate::model::tensor_parallel::TensorParallel;
    use crate::model::{coca_loss, CocaLossConfig};
    use candle_core::Device;

    /// A model output of two samples, three caption positions over a vocabulary of five.
    fn output(labels: &[u32]) -> CocaOutput {
        let dev = Device::Cpu;
        let features = |seed: f64| {
            let t = Tensor::arange(0f32, 8., &dev)
                .unwrap()
                .reshape((2, 4))
                .unwrap();
            (t * seed).unwrap().sin().unwrap()
        };
        let logits = Tensor::arange(0f32, 30., &dev)
            .unwrap()
            .reshape((2, 3, 5))
            .unwrap()
            .cos()
            .unwrap();
        CocaOutput {
            image_features: features(0.7),
            image_embs: Tensor::zeros((2, 1, 4), DType::F32, &dev).unwrap(),
            text_features: features(1.3),
            token_embs: Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap(),
            logits,
            labels: Tensor::from_slice(labels, (2, 3), &dev).unwrap(),
            logit_scale: Tensor::new(10f32, &dev).unwrap(),
            tp: TensorParallel::single(),
        }
    }

    #[test]
    fn a_group_of_one_reads_the_one_process_loss_after_the_fact() {
        let out = output(&[3, 1, 0, 4, 0, 0]);
        let cfg = CocaLossConfig::default();
        let loss = coca_group_loss(
            &out,
            &cfg,
            ContrastiveSpan::default(),
            &HostTransport::single(),
        )
        .unwrap();
        let values = loss.values().unwrap();
        let want = coca_loss(&out, &cfg).unwrap();
        let close = |a: f64, b: &Tensor| {
            let b = b.to_scalar::<f32>().unwrap() as f64;
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
        };
        close(values.contrastive, &want.contrastive);
        close(values.caption, &want.caption);
        close(values.total, &want.total);
        close(loss.share.to_scalar::<f32>().unwrap() as f64, &want.total);
    }

    #[test]
    fn a_batch_of_padding_only_is_named_when_the_values_are_read() {
        let out = output(&[0; 6]);
        let loss = coca_group_loss(
            &out,
            &CocaLossConfig::default(),
            ContrastiveSpan::default(),
            &HostTransport::single(),
        )
        .unwrap();
        let err = loss.values().unwrap_err();
        assert!(
            format!("{err:#}").contains("every label of the global batch is padding"),
            "{err:#}"
        );
    }
}
