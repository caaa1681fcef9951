//! Model FLOPs of a CoCa training sample, from the config: what `bench` divides by the step
//! time to report achieved TFLOP/s (and model FLOPs utilisation against a device's peak).
//! Counts the matrix products (2 FLOPs per multiply-add) of the forward pass — the towers'
//! blocks, attention scores and mixing, the patch embedding, the poolers, the decoder's
//! cross-attention and the vocabulary projection — and takes training as three forward passes
//! (forward, and backward's two products per matmul), as PaLM's MFU does. Elementwise work is
//! left out.

use super::config::CocaConfig;

/// Forward FLOPs of one transformer block over `tokens` queries attending to `keys` positions
/// (self-attention when they are equal), width `w`, MLP ratio `mlp`.
fn block(tokens: usize, keys: usize, w: usize, mlp: f64) -> f64 {
    let (t, k, w) = (tokens as f64, keys as f64, w as f64);
    let projections = 2.0 * t * w * w * 2.0 + 2.0 * k * w * w * 2.0; // q, out; k, v
    let attention = 2.0 * 2.0 * t * k * w; // scores and mixing
    let mlp = 2.0 * 2.0 * t * w * (w * mlp);
    projections + attention + mlp
}

/// Forward FLOPs of one sample.
pub fn forward_per_sample(config: &CocaConfig) -> f64 {
    let v = &config.vision_cfg;
    let patches = (v.image_size / v.patch_size).pow(2);
    let tokens = patches + 1;
    let patch_embed = 2.0 * patches as f64 * (3 * v.patch_size * v.patch_size * v.width) as f64;
    let vision = v.layers as f64 * block(tokens, tokens, v.width, v.mlp_ratio);
    // Attentional pooler: its queries attend to every image token (keys and values of width
    // `width` projected to the embedding width).
    let m = &config.multimodal_cfg;
    let pooler = block(m.n_queries, tokens, config.embed_dim, 0.0);
    let t = &config.text_cfg;
    let text = t.layers as f64 * block(t.context_length, t.context_length, t.width, t.mlp_ratio);
    let d = m.context_length;
    let decoder =
        m.layers as f64 * (block(d, d, m.width, m.mlp_ratio) + block(d, m.n_queries, m.width, 0.0));
    let vocab = 2.0 * (d * m.width * m.vocab_size) as f64;
    let projections = 2.0 * (v.width + t.width) as f64 * config.embed_dim as f64;
    patch_embed + vision + pooler + text + decoder + vocab + projections
}

/// Training FLOPs of one sample (three forward passes).
pub fn train_per_sample(config: &CocaConfig) -> f64 {
    3.0 * forward_per_sample(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b32_is_in_the_published_range() {
        // CoCa-ViT-B/32 at 224 px: ~4.4 GFLOPs for the image tower (open_clip's table lists
        // 4.41 GMACs-scale figures for ViT-B-32); the whole model's forward lies above that.
        let config = CocaConfig::resolve("coca_ViT-B-32").unwrap();
        let v = &config.vision_cfg;
        let tokens = (v.image_size / v.patch_size).pow(2) + 1;
        let vision = v.layers as f64 * block(tokens, tokens, v.width, v.mlp_ratio);
        assert!((8.0e9..9.5e9).contains(&vision), "{vision:e}");
        let all = forward_per_sample(&config);
        assert!(all > vision && all < 4.0 * vision, "{all:e}");
        assert_eq!(train_per_sample(&config), 3.0 * all);
    }
}
