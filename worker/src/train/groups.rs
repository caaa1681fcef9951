//! Parameter groups: which tensors decay, and per-tower learning rates and weight decay.

use super::flat::GroupRule;

/// open_clip's grouping — no weight decay for tensors with fewer than 2 dimensions or whose
/// names contain `bn`, `ln`, `bias` or `logit_scale` — plus per-tower overrides: `visual.*`
/// follows `--visual_lr/--visual_wd`, `text.*` and the decoder (`text_decoder.*`) follow
/// `--text_lr/--text_wd`, everything else the base values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TowerGroups {
    pub lr: f64,
    pub weight_decay: f64,
    pub visual_lr: Option<f64>,
    pub visual_wd: Option<f64>,
    pub text_lr: Option<f64>,
    pub text_wd: Option<f64>,
}

impl TowerGroups {
    /// One learning rate and weight decay for every tower.
    pub fn uniform(lr: f64, weight_decay: f64) -> Self {
        Self {
            lr,
            weight_decay,
            visual_lr: None,
            visual_wd: None,
            text_lr: None,
            text_wd: None,
        }
    }
}

/// Whether open_clip exempts this tensor from weight decay.
pub fn exempt_from_weight_decay(name: &str, shape: &[usize]) -> bool {
    shape.len() < 2
        || ["bn", "ln", "bias", "logit_scale"]
            .iter()
            .any(|k| name.contains(k))
}

impl GroupRule for TowerGroups {
    fn lr_and_wd(&self, name: &str, shape: &[usize]) -> (f64, f64) {
        let (lr, wd) = if name.starts_with("visual.") {
            (self.visual_lr, self.visual_wd)
        } else if name.starts_with("text.") || name.starts_with("text_decoder.") {
            (self.text_lr, self.text_wd)
        } else {
            (None, None)
        };
        let wd = if exempt_from_weight_decay(name, shape) {
            0.0
        } else {
            wd.unwrap_or(self.weight_decay)
        };
        (lr.unwrap_or(self.lr), wd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_open_clip_and_tower_overrides() {
        let g = TowerGroups {
            visual_lr: Some(1e-5),
            text_wd: Some(0.2),
            ..TowerGroups::uniform(1e-3, 0.05)
        };
        assert_eq!(
            g.lr_and_wd("visual.conv1.weight", &[8, 3, 2, 2]),
            (1e-5, 0.05)
        );
        assert_eq!(g.lr_and_wd("visual.ln_pre.weight", &[8]), (1e-5, 0.0));
        assert_eq!(
            g.lr_and_wd("text_decoder.resblocks.0.mlp.c_fc.weight", &[8, 8]),
            (1e-3, 0.2)
        );
        assert_eq!(
            g.lr_and_wd("text.transformer.resblocks.0.attn.in_proj_bias", &[24]),
            (1e-3, 0.0)
        );
        assert_eq!(g.lr_and_wd("logit_scale", &[]), (1e-3, 0.0));
    }
}
