//! The synthetic captioning set as a [`CaptionSource`] for the loader.

use super::loader::{CaptionSource, Sample};
use super::preprocess::{OPENAI_MEAN, OPENAI_STD};
use super::synthetic::SyntheticCaptions;
use anyhow::Result;
use image::RgbImage;

/// Samples drawn on demand; nothing is read from disk, so nothing can be corrupt.
pub struct SyntheticSource {
    pub set: SyntheticCaptions,
}

impl CaptionSource for SyntheticSource {
    fn len(&self) -> usize {
        self.set.len()
    }

    fn load(&self, index: u64, _epoch: u64) -> Result<Sample> {
        let sample = self.set.get(index);
        Ok(Sample {
            pixels: normalize_rgb(&sample.image),
            caption: sample.caption,
        })
    }

    fn describe(&self, index: u64) -> String {
        format!("synthetic sample {index}")
    }
}

/// `[3, H, W]` pixels scaled to [0, 1] and normalised with OpenAI's mean and std.
pub fn normalize_rgb(image: &RgbImage) -> Vec<f32> {
    let (w, h) = image.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] as f32 / 255.0 - OPENAI_MEAN[c]) / OPENAI_STD[c];
        }
    }
    out
}
