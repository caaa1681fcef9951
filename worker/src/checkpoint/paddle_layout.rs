//! PaddleMIX's parameter layout, mapped to open_clip's.
//!
//! PaddleMIX stores the same CoCa weights as open_clip with three differences: every attention's
//! packed `in_proj_weight`/`in_proj_bias` is split into `q_proj`, `k_proj`, `v_proj` (`.weight`
//! and `.bias`; the attentional pooler's `q_proj_weight` etc. likewise become `q_proj.weight`);
//! every linear weight (`q/k/v/out_proj`, `mlp.c_fc`, `mlp.c_proj`) is stored transposed,
//! `[in, out]`; and `logit_scale` has shape `[1]`.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;

const QKV: [&str; 3] = ["q_proj", "k_proj", "v_proj"];

/// Linear layers whose weights PaddleMIX stores as `[in, out]`.
fn is_transposed_linear(name: &str) -> bool {
    ["out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// The attention module prefix and the projection (`q_proj`, ...) and field of a split q/k/v
/// parameter such as `visual.transformer.resblocks.0.attn.k_proj.bias`.
fn split_qkv_name(name: &str) -> Option<(&str, usize, &str)> {
    let (rest, field) = name.rsplit_once('.')?;
    let (prefix, proj) = rest.rsplit_once('.')?;
    let index = QKV.iter().position(|p| *p == proj)?;
    matches!(field, "weight" | "bias").then_some((prefix, index, field))
}

/// Renames and reshapes a PaddleMIX state dict into open_clip's names and layouts.
///
/// q/k/v weights are transposed back and packed into `in_proj_weight` when all three are square
/// (keys and values of the model's width, as PyTorch packs them), otherwise kept apart as
/// `q_proj_weight`, `k_proj_weight`, `v_proj_weight`; their biases always pack into
/// `in_proj_bias`.
pub fn paddle_to_open_clip(tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::with_capacity(tensors.len());
    // attention prefix -> [q, k, v] weights and biases
    type Parts = [Option<Tensor>; 3];
    let mut attention: BTreeMap<String, (Parts, Parts)> = BTreeMap::new();
    for (name, tensor) in tensors {
        if let Some((prefix, index, field)) = split_qkv_name(&name) {
            let entry = attention.entry(prefix.to_string()).or_default();
            let slot = if field == "weight" {
                &mut entry.0[index]
            } else {
                &mut entry.1[index]
            };
            *slot = Some(tensor);
        } else if is_transposed_linear(&name) {
            let t = tensor
                .t()
                .and_then(|t| t.contiguous())
                .with_context(|| format!("{name}: expected a 2-D linear weight"))?;
            out.push((name, t));
        } else if name == "logit_scale" && tensor.dims() == [1] {
            out.push((name, tensor.reshape(())?));
        } else {
            out.push((name, tensor));
        }
    }
    for (prefix, (weights, biases)) in attention {
        let take = |parts: Parts, field: &str| -> Result<Vec<Tensor>> {
            parts
                .into_iter()
                .zip(QKV)
                .map(|(t, proj)| t.with_context(|| format!("{prefix}.{proj}.{field} is missing")))
                .collect()
        };
        let weights: Vec<Tensor> = take(weights, "weight")?
            .into_iter()
            .map(|w| w.t().and_then(|t| t.contiguous()))
            .collect::<candle_core::Result<_>>()
            .with_context(|| format!("{prefix}: q/k/v weights must be 2-D"))?;
        let biases = take(biases, "bias")?;
        let d_model = weights[0].dim(0)?;
        let packed = weights.iter().all(|w| w.dims() == [d_model, d_model]);
        if packed {
            out.push((
                format!("{prefix}.in_proj_weight"),
                Tensor::cat(&weights, 0)?,
            ));
        } else {
            for (w, proj) in weights.into_iter().zip(QKV) {
                out.push((format!("{prefix}.{proj}_weight"), w));
            }
        }
        if biases.iter().any(|b| b.rank() != 1) {
            bail!("{prefix}: q/k/v biases must be 1-D");
        }
        out.push((format!("{prefix}.in_proj_bias"), Tensor::cat(&biases, 0)?));
    }
    Ok(out)
}
