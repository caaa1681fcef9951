//! Megatron-style tensor parallelism (TP) for CoCa: every attention and MLP of the three towers,
//! the attentional pooler and the decoder is split by heads / hidden units over the `T` members
//! of a tensor-parallel group, and the token embedding and the decoder's vocabulary projection
//! are split by vocabulary.
//!
//! - Attention (self, cross, pooler): member `r` holds heads `r·H/T .. (r+1)·H/T` of q, of k and
//!   of v (the rows of the packed `in_proj_weight`/`in_proj_bias`, or of `q_proj_weight`,
//!   `k_proj_weight`, `v_proj_weight`) — column-parallel — and the matching input columns of
//!   `out_proj.weight` — row-parallel; the output is summed over the group and `out_proj.bias`
//!   is added once after the sum.
//! - MLP: `c_fc` column-parallel (weight rows and bias), `c_proj` row-parallel (weight columns,
//!   bias after the sum).
//! - `text.token_embedding.weight` `[V, W]`: member `r` holds rows `r·V/T ..`; a lookup zeroes
//!   the ids it does not own and sums over the group.
//! - `text_decoder.text_projection` `[W, V]`: columns split; the logits `[B, L, V/T]` stay split
//!   and the caption loss is the vocabulary-parallel cross-entropy
//!   ([`vocab_parallel_cross_entropy`]), so the full logits are never on one member.
//! - Everything else (layer norms, positional and class embeddings, `conv1`, the contrastive
//!   projections, the pooler's queries, `logit_scale`) is replicated.
//!
//! Per attention and per MLP the forward pass runs one all-reduce (Megatron's `g`,
//! [`reduce_from_group`]) and the backward one (`f`, [`copy_to_group`] at the input of the
//! column-parallel layer). The vocabulary-parallel embedding adds one forward all-reduce, the
//! decoder's projection one backward all-reduce, and the cross-entropy one all-gather of two
//! floats per token.
//!
//! Gradients: when every member of a TP group feeds the model the same inputs, the gradients of
//! the replicated parameters come out bit-identical on every member (they only see activations
//! and gradients that are either replicated or the result of an all-reduce, which is
//! bit-identical on every member), so no TP all-reduce of gradients is needed; the split
//! parameters' gradients are each member's own slices. A global gradient norm, however, must
//! sum the split parameters' squares over the group ([`Split::is_replicated`] tells which).
//!
//! Degree 1 is the plain model: every TP operation is skipped and the outputs are bit-identical
//! to [`crate::model::CoCa::new`]'s.

mod split;
mod vocab;

pub use split::{
    full_shape, gather_state_dict, gather_tensor, local_parameter_shapes, shard_state_dict,
    shard_tensor, split_of, Split,
};
pub use vocab::{
    caption_loss_parallel, caption_token_loss, vocab_parallel_cross_entropy,
    vocab_parallel_cross_entropy_portable, vocab_parallel_embedding,
};

use super::ops::collective::{copy_to_group, gather_equal_rows_keeping_own, reduce_from_group};
use crate::comm::{Communicator, HostTransport};
use crate::model::autocast::Autocast;
use crate::model::config::{mlp_width, CocaConfig};
use anyhow::{bail, Result};
use candle_core::Tensor;
use coca_common::collective::{Collective, LayoutOnly, SingleProcess};
use std::fmt;
use std::sync::Arc;

/// The tensor-parallel group a model is built for: its members each hold `1/size` of every
/// split parameter (see the module docs).
#[derive(Clone)]
pub struct TensorParallel {
    group: Arc<dyn Collective>,
    /// The same group for the collectives on activations (buffers where the tensors live).
    communicator: Arc<dyn Communicator>,
    /// The compute dtype of the matrix products, carried to every layer with the group.
    autocast: Autocast,
}

impl fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TensorParallel {{ rank: {}, size: {}, autocast: {:?} }}",
            self.rank(),
            self.size(),
            self.autocast
        )
    }
}

impl Default for TensorParallel {
    fn default() -> Self {
        Self::single()
    }
}

impl TensorParallel {
    /// Tensor parallelism over `group` (its size is the TP degree, its rank this member's).
    pub fn new(group: Arc<dyn Collective>) -> Self {
        Self {
            communicator: HostTransport::shared(group.clone()),
            group,
            autocast: Autocast::off(),
        }
    }

    /// The same group, its collectives on activations run by `communicator` (of the same ranks:
    /// NCCL's in a GPU job) instead of the host transport.
    pub fn with_communicator(mut self, communicator: Arc<dyn Communicator>) -> Self {
        debug_assert_eq!(
            (communicator.rank(), communicator.size()),
            (self.rank(), self.size())
        );
        self.communicator = communicator;
        self
    }

    /// The same group, the layers built with it computing their matrix products as `autocast`
    /// says (mixed precision reaches every layer through this context).
    pub fn with_autocast(mut self, autocast: Autocast) -> Self {
        self.autocast = autocast;
        self
    }

    /// The compute dtype of the matrix products (see [`crate::model::autocast`]).
    pub fn autocast(&self) -> Autocast {
        self.autocast
    }

    /// Degree 1: the plain model.
    pub fn single() -> Self {
        Self::new(Arc::new(SingleProcess))
    }

    /// A layout of member `rank` of `size` whose collectives fail: for computing shapes and
    /// building models that are never run (e.g. [`local_parameter_shapes`]).
    pub fn layout_only(rank: usize, size: usize) -> Self {
        Self::new(Arc::new(LayoutOnly { rank, size }))
    }

    /// The TP degree.
    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// This member's index in the group.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Whether this is the plain model (degree 1).
    pub fn is_single(&self) -> bool {
        self.size() == 1
    }

    /// The group's collectives.
    pub fn group(&self) -> &Arc<dyn Collective> {
        &self.group
    }

    /// `n / size`: this member's share of a dimension that [`check_degree`] has checked.
    pub fn part(&self, n: usize) -> usize {
        n / self.size()
    }

    /// Megatron's `f`: identity forward, gradient summed over the group (the input of a
    /// column-parallel layer). Nothing at degree 1.
    pub fn copy_in(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        copy_to_group(x, &self.communicator)
    }

    /// Megatron's `g`: sum over the group, gradient passed through (the output of a
    /// row-parallel layer). Nothing at degree 1.
    pub fn reduce_out(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        reduce_from_group(x, &self.communicator)
    }

    /// Every member's rows of `x`, in member order, where each member holds as many rows; the
    /// gradient reaches this member's own rows only, from its own use of the result. Nothing
    /// at degree 1.
    pub fn gather_keeping_own(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        gather_equal_rows_keeping_own(x, &self.communicator)
    }

    /// [`check_degree`] for this group's size.
    pub fn check(&self, config: &CocaConfig) -> Result<()> {
        check_degree(config, self.size())
    }
}

/// Checks that `degree` divides every split dimension of `config`: the heads of the image
/// tower, its attentional pooler, the text tower and the decoder, the three MLP widths and both
/// vocabularies. The error names the tower and the numbers.
pub fn check_degree(config: &CocaConfig, degree: usize) -> Result<()> {
    if degree == 0 {
        bail!("tensor-parallel degree must be at least 1");
    }
    let v = &config.vision_cfg;
    let t = &config.text_cfg;
    let m = &config.multimodal_cfg;
    let dims = [
        (
            "the image tower's attention heads (vision_cfg.width / head_width)",
            config.vision_heads(),
        ),
        (
            "the image tower's MLP width (vision_cfg.width × mlp_ratio)",
            mlp_width(v.width, v.mlp_ratio),
        ),
        (
            "the attentional pooler's heads (vision_cfg.attn_pooler_heads)",
            v.attn_pooler_heads,
        ),
        ("the text tower's attention heads (text_cfg.heads)", t.heads),
        (
            "the text tower's MLP width (text_cfg.width × mlp_ratio)",
            mlp_width(t.width, t.mlp_ratio),
        ),
        (
            "the text tower's vocabulary (text_cfg.vocab_size)",
            t.vocab_size,
        ),
        (
            "the decoder's attention heads (multimodal_cfg.heads)",
            m.heads,
        ),
        (
            "the decoder's MLP width (multimodal_cfg.width × mlp_ratio)",
            mlp_width(m.width, m.mlp_ratio),
        ),
        (
            "the decoder's vocabulary (multimodal_cfg.vocab_size)",
            m.vocab_size,
        ),
    ];
    let bad: Vec<String> = dims
        .iter()
        .filter(|(_, n)| !n.is_multiple_of(degree))
        .map(|(what, n)| format!("{what} = {n}"))
        .collect();
    if !bad.is_empty() {
        bail!(
            "tensor-parallel degree {degree} does not divide {} (every split dimension must be a \
             multiple of the degree)",
            bad.join("; ")
        );
    }
    Ok(())
}
