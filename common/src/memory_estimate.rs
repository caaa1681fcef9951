//! A worker's memory estimate by part: computed by the worker (`coca-worker check-args`), read
//! by the launcher to refuse a layout that cannot fit in its node's host memory.

/// Bytes one worker needs, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryEstimate {
    /// Parameters this worker holds (its tensor-parallel shards).
    pub parameters: u64,
    /// The flat float32 parameter buffer (the model's variables are views of it).
    pub parameter_bytes: u64,
    /// Gradients kept between micro-batches plus the one a backward pass holds in full.
    pub gradient_bytes: u64,
    /// AdamW's two moments after sharding.
    pub optimizer_bytes: u64,
    /// Under mixed precision, the half-precision copies of the weights the step's matrix
    /// products use (autocast casts each float32 master when it runs; the graph keeps them
    /// until the backward pass) and their gradients in that dtype; 0 in float32.
    #[serde(default)]
    pub compute_copy_bytes: u64,
    /// Activations kept for the backward pass at the per-device batch, in the dtypes they are
    /// kept in (products in the compute dtype, norms, softmax and the residual stream float32).
    pub activation_bytes: u64,
    /// The peak: the buffers (weights, kept gradients, moments, half-precision copies) and the
    /// larger of the activations and the backward pass's full gradient, since the pass frees
    /// the activations as that gradient grows.
    pub total_bytes: u64,
}

impl MemoryEstimate {
    /// The host memory one worker needs: all of it for a CPU worker. A GPU worker keeps its
    /// model, gradients, moments and activations on its GPU (each worker checks those against
    /// its card before training); on the host it holds the float32 weights as they are read,
    /// before they move to the device.
    pub fn host_bytes(&self, on_gpu: bool) -> u64 {
        if on_gpu {
            self.parameter_bytes
        } else {
            self.total_bytes
        }
    }

    /// The parts in GiB on one line (`weights 1.0 + gradients 2.0 + … = 9.5 GiB`), for the
    /// start-up summary and messages.
    pub fn by_part(&self) -> String {
        let gib = |n: u64| format!("{:.2}", n as f64 / (1u64 << 30) as f64);
        let copies = match self.compute_copy_bytes {
            0 => String::new(),
            n => format!(" + half-precision copies {}", gib(n)),
        };
        format!(
            "weights {} + gradients {} + moments {}{copies} + activations {}: peak {} GiB",
            gib(self.parameter_bytes),
            gib(self.gradient_bytes),
            gib(self.optimizer_bytes),
            gib(self.activation_bytes),
            gib(self.total_bytes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_part_names_every_part_and_the_copies_only_when_there_are_some() {
        let mut e = MemoryEstimate {
            parameters: 1,
            parameter_bytes: 1 << 30,
            gradient_bytes: 3 << 30,
            optimizer_bytes: 2 << 30,
            compute_copy_bytes: 0,
            activation_bytes: 1 << 29,
            total_bytes: (13 << 29),
        };
        let line = e.by_part();
        assert_eq!(
            line,
            "weights 1.00 + gradients 3.00 + moments 2.00 + activations 0.50: peak 6.50 GiB"
        );
        e.compute_copy_bytes = 1 << 29;
        assert!(e.by_part().contains("+ half-precision copies 0.50 +"));
        assert_eq!(e.host_bytes(false), e.total_bytes);
        assert_eq!(e.host_bytes(true), e.parameter_bytes);
    }
}
