//! A worker's host-memory estimate by part: computed by the worker (`coca-worker check-args`),
//! read by the launcher to refuse a layout that cannot fit on its node.

/// Bytes one worker needs, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryEstimate {
    /// Parameters this worker holds (its tensor-parallel shards).
    pub parameters: u64,
    /// The flat float32 parameter buffer.
    pub parameter_bytes: u64,
    /// The model's variables: a second copy of the parameters.
    pub model_copy_bytes: u64,
    /// Gradients kept between micro-batches plus the one a backward pass holds in full (and its
    /// copy while it is accumulated).
    pub gradient_bytes: u64,
    /// AdamW's two moments after sharding.
    pub optimizer_bytes: u64,
    /// Activations kept for the backward pass at the per-device batch.
    pub activation_bytes: u64,
    /// The sum.
    pub total_bytes: u64,
}
