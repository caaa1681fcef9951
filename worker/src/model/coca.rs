//! The whole CoCa model: image tower, text tower, multimodal decoder and the logit scale.

use super::config::CocaConfig;
use super::decoder::MultimodalDecoder;
use super::text::TextTower;
use super::vision::VisionTower;
use crate::model::tensor_parallel::TensorParallel;
use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// open_clip's `logit_scale` initial value, `ln(1 / 0.07)`.
pub const INIT_LOGIT_SCALE: f64 = 2.659_260_036_932_778;

/// CoCa (arXiv 2205.01917) exactly as open_clip's `CoCa`, weights named as its `state_dict()`.
#[derive(Debug, Clone)]
pub struct CoCa {
    pub visual: VisionTower,
    pub text: TextTower,
    pub text_decoder: MultimodalDecoder,
    /// The learned temperature, stored as its log (`[]`).
    pub logit_scale: Tensor,
    pub config: CocaConfig,
    /// The tensor-parallel group this member's shards belong to (degree 1: the whole model).
    pub tp: TensorParallel,
}

/// Everything one teacher-forced forward pass produces (open_clip's output dict).
#[derive(Debug, Clone)]
pub struct CocaOutput {
    /// L2-normalised image embedding `[B, E]`.
    pub image_features: Tensor,
    /// Image tokens fed to the decoder `[B, Q-1, E]`.
    pub image_embs: Tensor,
    /// L2-normalised text embedding `[B, E]`.
    pub text_features: Tensor,
    /// Text-tower token outputs `[B, T, W]` (cls removed).
    pub token_embs: Tensor,
    /// Decoder logits `[B, T-1, vocab]` predicting `labels`; under tensor parallelism this
    /// member's vocabulary columns `[B, T-1, vocab / T]` (the loss functions take care of it).
    pub logits: Tensor,
    /// `text[:, 1:]`, `[B, T-1]`.
    pub labels: Tensor,
    /// `exp(logit_scale)`, `[]`.
    pub logit_scale: Tensor,
    /// The tensor-parallel group `logits` is split over.
    pub tp: TensorParallel,
}

impl CoCa {
    /// Builds the model; `vb` supplies (or initialises) every weight by its open_clip name.
    pub fn new(config: &CocaConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_parallel(config, vb, &TensorParallel::single())
    }

    /// Builds member `tp.rank()`'s part of the model split over the tensor-parallel group `tp`
    /// (see [`crate::model::tensor_parallel`]): `vb` supplies this member's shards under
    /// the standard names with their local shapes (e.g. from
    /// [`crate::model::tensor_parallel::shard_state_dict`]). A degree that does not divide
    /// every head count, MLP width and vocabulary is an error before anything is built. Degree 1
    /// is [`Self::new`].
    pub fn new_parallel(config: &CocaConfig, vb: VarBuilder, tp: &TensorParallel) -> Result<Self> {
        tp.check(config)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        Ok(Self {
            visual: VisionTower::new(config, vb.pp("visual"), tp)?,
            text: TextTower::new(config, vb.pp("text"), tp)?,
            text_decoder: MultimodalDecoder::new(config, vb.pp("text_decoder"), tp)?,
            logit_scale: vb.get_with_hints((), "logit_scale", Init::Const(INIT_LOGIT_SCALE))?,
            config: config.clone(),
            tp: tp.clone(),
        })
    }

    /// The device the weights live on (inputs must be moved there).
    pub fn device(&self) -> &candle_core::Device {
        self.logit_scale.device()
    }

    /// open_clip's `set_grad_checkpointing`: the image tower, the text tower and the decoder
    /// recompute each transformer block's activations in the backward pass instead of keeping
    /// them (less memory, one more forward per block; the same gradients).
    pub fn set_grad_checkpointing(&mut self, on: bool) {
        self.visual.set_grad_checkpointing(on);
        self.text.transformer.grad_checkpointing = on;
        self.text_decoder.grad_checkpointing = on;
    }

    /// Normalised image embedding `[B, E]` and decoder tokens `[B, Q-1, E]`.
    pub fn encode_image(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = self.visual.forward(images)?;
        Ok((l2_normalize(&out.pooled)?, out.tokens))
    }

    /// The normalised image embedding `[B, E]` alone (what embedding, zero-shot and retrieval
    /// need): [`Self::encode_image`]'s first output without the decoder's tokens.
    pub fn image_features(&self, images: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.visual.forward_pooled(images)?)
    }

    /// Normalised text embedding `[B, E]` and token outputs `[B, T, W]`.
    pub fn encode_text(&self, text: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = self.text.forward(text)?;
        Ok((l2_normalize(&out.pooled)?, out.tokens))
    }

    /// Logits `[B, vocab]` for the token after each prefix `[B, t]`, given the image tokens
    /// from [`Self::encode_image`]. Without tensor parallelism only.
    pub fn next_token_logits(&self, image_embs: &Tensor, prefix: &Tensor) -> Result<Tensor> {
        let (_, tokens) = self.encode_text(prefix)?;
        self.text_decoder.forward_last(image_embs, &tokens)
    }

    /// The teacher-forced forward pass of training: both towers, then the decoder on
    /// `token_embs[:, :-1]` predicting `text[:, 1:]`.
    pub fn forward(&self, images: &Tensor, text: &Tensor) -> Result<CocaOutput> {
        let (image_features, image_embs) = self.encode_image(images)?;
        let (text_features, token_embs) = self.encode_text(text)?;
        let t = text.dim(1)?;
        let logits = self
            .text_decoder
            .forward(&image_embs, &token_embs.narrow(1, 0, t - 1)?)?;
        Ok(CocaOutput {
            image_features,
            image_embs,
            text_features,
            token_embs,
            logits,
            labels: text.narrow(1, 1, t - 1)?,
            logit_scale: self.logit_scale.exp()?,
            tp: self.tp.clone(),
        })
    }
}

/// `x / max(‖x‖₂, 1e-12)` over the last dimension (PyTorch's `F.normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}
