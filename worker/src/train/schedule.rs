//! The learning-rate schedule: open_clip's `cosine_lr`.

/// Linear warmup to the base rate over `warmup_steps`, then a half cosine to 0 at `total_steps`.
///
/// Exactly open_clip's formula: during warmup the factor is `(step + 1) / warmup`; afterwards
/// `0.5 · (1 + cos(π · (step − warmup) / (total − warmup)))`. (PaddleMIX's seed warms up to a
/// factor of 1.0 regardless of the base rate; that is not copied.)
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl CosineSchedule {
    /// The factor (0..=1) the base learning rates are multiplied by at optimizer step `step`
    /// (0-based).
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        if decay_steps == 0 {
            return 1.0;
        }
        let progress = (step - self.warmup_steps) as f64 / decay_steps as f64;
        0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_open_clip_cosine_lr() {
        // The learning rates of the fixture's trajectory (base 1e-3, warmup 2, 6 steps).
        let expected = [
            0.0005,
            0.001,
            0.001,
            0.000_853_553_390_593_273_7,
            0.0005,
            0.000_146_446_609_406_726_28,
        ];
        let s = CosineSchedule {
            warmup_steps: 2,
            total_steps: 6,
        };
        for (step, lr) in expected.iter().enumerate() {
            assert!(
                (s.factor(step as u64) * 1e-3 - lr).abs() < 1e-15,
                "step {step}"
            );
        }
    }

    #[test]
    fn no_warmup_starts_at_full_rate_and_ends_at_zero() {
        let s = CosineSchedule {
            warmup_steps: 0,
            total_steps: 10,
        };
        assert_eq!(s.factor(0), 1.0);
        assert!(s.factor(10) < 1e-12);
    }
}
