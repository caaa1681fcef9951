//! Dynamic loss scaling for float16 training, by PyTorch `torch.cuda.amp.GradScaler`'s rules.
//!
//! The loss is multiplied by the scale before backward and the gradients divided by it before
//! they are clipped and applied. A step whose gradients are not finite (anywhere, on any rank:
//! the trainer's global norm decides, so every rank agrees) is skipped and the scale halved;
//! after `growth_interval` consecutive clean steps it doubles.

/// GradScaler's `init_scale`, 2^16.
pub const INIT_SCALE: f64 = 65536.0;
/// GradScaler's `growth_interval`.
pub const GROWTH_INTERVAL: u64 = 2000;
/// GradScaler's `growth_factor`.
const GROWTH_FACTOR: f64 = 2.0;
/// GradScaler's `backoff_factor`.
const BACKOFF_FACTOR: f64 = 0.5;

/// The scale and the count of clean steps since it last changed (what a checkpoint keeps).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    /// The factor the loss is multiplied by.
    pub scale: f64,
    /// Consecutive steps with finite gradients since the scale last changed.
    pub growth_tracker: u64,
    /// Clean steps before the scale doubles.
    pub growth_interval: u64,
}

impl LossScaler {
    /// GradScaler's initial state with the given initial scale ([`INIT_SCALE`]) and growth
    /// interval ([`GROWTH_INTERVAL`]).
    pub fn new(init_scale: f64, growth_interval: u64) -> Self {
        Self {
            scale: init_scale,
            growth_tracker: 0,
            growth_interval: growth_interval.max(1),
        }
    }

    /// After a step: halve on overflow (`finite == false`, the step was skipped), double after
    /// `growth_interval` clean steps in a row. Returns the new scale.
    pub fn update(&mut self, finite: bool) -> f64 {
        if finite {
            self.growth_tracker += 1;
            if self.growth_tracker >= self.growth_interval {
                self.scale *= GROWTH_FACTOR;
                self.growth_tracker = 0;
            }
        } else {
            self.scale *= BACKOFF_FACTOR;
            self.growth_tracker = 0;
        }
        self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_resets_growth() {
        let mut s = LossScaler::new(INIT_SCALE, 3);
        s.update(true);
        s.update(true);
        assert_eq!(s.update(false), INIT_SCALE / 2.0);
        assert_eq!(s.growth_tracker, 0);
        s.update(true);
        s.update(true);
        assert_eq!(s.scale, INIT_SCALE / 2.0);
        assert_eq!(s.update(true), INIT_SCALE);
    }

    #[test]
    fn default_interval_is_gradscalers() {
        let mut s = LossScaler::new(INIT_SCALE, GROWTH_INTERVAL);
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.update(true);
        }
        assert_eq!(s.scale, INIT_SCALE);
        assert_eq!(s.update(true), 2.0 * INIT_SCALE);
    }
}
