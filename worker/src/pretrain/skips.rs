//! Samples the loader skipped (unreadable images, bad captions), collected per epoch and
//! reported with their file and line when the epoch ends.

use super::metrics::RunLog;

/// Reasons listed in an epoch's report before the rest are counted.
const SKIPS_LISTED: usize = 20;

/// Samples skipped during one epoch, reported (with file and line) when the epoch ends.
pub(super) struct EpochSkips {
    /// The epoch these skips belong to.
    pub epoch: u64,
    reasons: Vec<String>,
}

impl EpochSkips {
    /// No skips yet in `epoch`.
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            reasons: Vec::new(),
        }
    }

    /// Records a batch's skipped samples (each reason names the file and line).
    pub fn add(&mut self, reasons: Vec<String>) {
        for r in &reasons {
            tracing::debug!("skipped {r}");
        }
        self.reasons.extend(reasons);
    }

    /// Prints the epoch's skips, the first [`SKIPS_LISTED`] in full.
    pub fn report(&self, log: &RunLog) {
        if self.reasons.is_empty() {
            return;
        }
        log.println(format!(
            "epoch {}: {} sample(s) skipped:",
            self.epoch,
            self.reasons.len()
        ));
        for r in self.reasons.iter().take(SKIPS_LISTED) {
            log.println(format!("  {r}"));
        }
        if self.reasons.len() > SKIPS_LISTED {
            log.println(format!(
                "  ... and {} more",
                self.reasons.len() - SKIPS_LISTED
            ));
        }
    }
}
