//! open_clip's image transforms, pixel for pixel where PIL's arithmetic allows.
//!
//! * Eval ([`eval_transform`]) = `image_transform(S, is_train=False)`: `Resize(S)` (shorter side
//!   to S, the longer to `int(S * long / short)`, bicubic), `CenterCrop(S)` (offset
//!   `round((side - S) / 2)`, Python rounding), `convert("RGB")`, `ToTensor`, `Normalize` with
//!   OpenAI's mean and std.
//! * Train ([`train_transform`]) = open_clip's default train transform:
//!   `RandomResizedCrop(S, scale=(0.9, 1.0), ratio=(3/4, 4/3), bicubic)` with torchvision's
//!   sampling (10 tries, then the centre-crop fallback), then the same conversion and
//!   normalisation. Its randomness comes only from `(seed, epoch, sample_index)`.
//!
//! The resize is a port of Pillow's `ImagingResample` for 8-bit images: the same bicubic
//! (a = -0.5) kernel widened by the downscale factor (antialiasing), coefficients normalised
//! then rounded to 22-bit fixed point, a horizontal pass then a vertical pass, each rounded and
//! clipped to 8 bits. For 8-bit images the result is the same bytes PIL produces; the rest of
//! the pipeline (`/ 255`, `- mean`, `/ std` in `f32`) is torchvision's. What PIL does beyond the
//! arithmetic is reproduced too:
//! * resize happens *before* the RGB conversion;
//! * RGBA and LA are resized premultiplied (`RGBa`/`La`), un-premultiplied (truncating), and the
//!   alpha is then dropped (not composited);
//! * grayscale is resized as one channel, then replicated;
//! * palette (`P`) and 1-bit images are resized with nearest neighbour, whatever the filter
//!   ([`LoadedImage`] carries that fact, as a decoded [`DynamicImage`] cannot);
//! * PNG transparency given by a `tRNS` colour key on gray or RGB images is not an alpha channel
//!   for PIL, so it is dropped at load time;
//! * 16-bit RGB(A) is reduced to its high byte, 16-bit grayscale (`I;16`) is resized at 16 bits
//!   and then *clipped* to 255 by `convert("RGB")`, as PIL does.
//!
//! Measured against Pillow on PNG (RGB, RGBA, LA, L, P, P+tRNS, 1-bit, 16-bit, colour-key),
//! GIF, BMP and lossless WebP files, eval and train outputs are identical to the last bit.
//! Decoding differs from PIL only where the codecs do: JPEG goes through `zune-jpeg` rather than
//! libjpeg-turbo, whose IDCT and chroma upsampling differ by a level here and there (after
//! normalisation: about 2e-4 mean absolute for 4:4:4 and grayscale JPEGs, 3e-3 for 4:2:0 ones
//! such as the fixture photo); a GIF's transparent pixels decode to black where PIL keeps the
//! palette colour; CMYK JPEGs are converted to RGB before the resize (PIL resizes in CMYK).

use crate::rng::{mix64, SplitMix64};
use std::io::Cursor;
use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{DynamicImage, ImageFormat, ImageReader};

/// OpenAI CLIP's per-channel mean (open_clip `OPENAI_DATASET_MEAN`).
pub const OPENAI_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel standard deviation (open_clip `OPENAI_DATASET_STD`).
pub const OPENAI_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Area fraction range of open_clip's default `RandomResizedCrop` (`AugmentationCfg.scale`).
pub const TRAIN_SCALE: (f64, f64) = (0.9, 1.0);
/// Aspect-ratio range of torchvision's `RandomResizedCrop` default.
pub const TRAIN_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// How PIL resamples an image when a transform asks for bicubic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Resample {
    /// Bicubic (a = -0.5) with antialiasing: every mode except `P` and `1`.
    #[default]
    Bicubic,
    /// Nearest neighbour: PIL's choice for palette (`P`) and 1-bit (`1`) images.
    Nearest,
}

/// A decoded image together with the resampling PIL would apply to its file.
#[derive(Clone, Debug)]
pub struct LoadedImage {
    /// The pixels as PIL would hold them (colour-key transparency already dropped).
    pub image: DynamicImage,
    /// [`Resample::Nearest`] for palette and 1-bit sources, else [`Resample::Bicubic`].
    pub resample: Resample,
}

impl LoadedImage {
    /// [`eval_transform`] with this image's resampling.
    pub fn eval_transform(&self, size: usize) -> Vec<f32> {
        eval_transform_with(&self.image, size, self.resample)
    }

    /// [`train_transform`] with this image's resampling.
    pub fn train_transform(
        &self,
        size: usize,
        seed: u64,
        epoch: u64,
        sample_index: u64,
    ) -> Vec<f32> {
        train_transform_with(&self.image, size, seed, epoch, sample_index, self.resample)
    }
}

/// Reads and decodes an image file (PNG, JPEG, GIF, WebP, BMP; format from the content).
/// Errors name the file; corrupt or truncated files are errors, never panics.
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    Ok(open_image(path)?.image)
}

/// [`load_image`], also reporting whether PIL would resize this file with nearest neighbour.
pub fn open_image(path: &Path) -> Result<LoadedImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    decode_image(&bytes).with_context(|| format!("decoding image {}", path.display()))
}

/// A decoder's error as one line: its own message, which already quotes its causes (the
/// chain would repeat them), with the line breaks some decoders end their messages with.
fn one_line(e: &image::ImageError) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Decodes an in-memory image file (e.g. a member of a tar/zip shard).
pub fn decode_image(bytes: &[u8]) -> Result<LoadedImage> {
    let format = image::guess_format(bytes).context("unrecognised image format")?;
    // The decoders are meant to return errors on bad input; a panic in one must still not
    // take down a data-loading thread.
    let decoded = std::panic::catch_unwind(|| {
        let mut reader = ImageReader::new(Cursor::new(bytes));
        reader.set_format(format);
        reader.decode()
    });
    let image = match decoded {
        Ok(result) => result.map_err(|e| {
            anyhow::anyhow!("invalid or truncated {format:?} data: {}", one_line(&e))
        })?,
        Err(_) => bail!("the {format:?} decoder panicked on this data"),
    };
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // zune-jpeg fills in a truncated scan; PIL (without LOAD_TRUNCATED_IMAGES) refuses it.
        bail!("truncated JPEG data (no end-of-image marker)");
    }
    let (mut image, mut resample) = (image, Resample::Bicubic);
    match format {
        ImageFormat::Png => {
            // IHDR: bytes 24 (bit depth) and 25 (colour type); the decoder validated them.
            let (depth, color_type) = match bytes.get(24..26) {
                Some(&[d, c]) => (d, c),
                _ => bail!("PNG header too short"),
            };
            if color_type == 3 || (color_type == 0 && depth == 1) {
                resample = Resample::Nearest;
            }
            if color_type == 0 || color_type == 2 || color_type == 3 {
                // Any alpha here came from a tRNS chunk: PIL keeps L / RGB / P without alpha.
                image = drop_key_alpha(image);
            }
        }
        ImageFormat::Gif => resample = Resample::Nearest,
        // BITMAPINFOHEADER (and later) bit count at offset 28; <= 8 bits is a palette image.
        ImageFormat::Bmp
            if bytes.len() >= 30 && u16::from_le_bytes([bytes[28], bytes[29]]) <= 8 =>
        {
            resample = Resample::Nearest;
        }
        _ => {}
    }
    Ok(LoadedImage { image, resample })
}

/// A JPEG stream ends with the EOI marker (trailing padding is tolerated).
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(4096)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

fn drop_key_alpha(image: DynamicImage) -> DynamicImage {
    match image {
        DynamicImage::ImageLumaA8(_) => DynamicImage::ImageLuma8(image.to_luma8()),
        DynamicImage::ImageLumaA16(_) => DynamicImage::ImageLuma16(image.to_luma16()),
        DynamicImage::ImageRgba8(_) => DynamicImage::ImageRgb8(image.to_rgb8()),
        DynamicImage::ImageRgba16(_) => DynamicImage::ImageRgb16(image.to_rgb16()),
        other => other,
    }
}

/// open_clip's eval transform at `size` (bicubic): `3 * size * size` normalised values, CHW.
pub fn eval_transform(img: &DynamicImage, size: usize) -> Vec<f32> {
    eval_transform_with(img, size, Resample::Bicubic)
}

/// [`eval_transform`] with an explicit resampling (see [`LoadedImage`]).
pub fn eval_transform_with(img: &DynamicImage, size: usize, resample: Resample) -> Vec<f32> {
    let src = Pixels::from_dynamic(img);
    let (w, h) = (src.width, src.height);
    if size == 0 || w == 0 || h == 0 {
        return vec![0.0; 3 * size * size];
    }
    // torchvision `_compute_resized_output_size` for an int size.
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    let (new_w, new_h) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    // torchvision `center_crop` (crop size never exceeds the resized image here).
    let left = py_round((new_w as f64 - size as f64) / 2.0).max(0.0) as usize;
    let top = py_round((new_h as f64 - size as f64) / 2.0).max(0.0) as usize;
    let full = Region {
        x0: 0,
        y0: 0,
        width: w,
        height: h,
    };
    let window = Window {
        left,
        top,
        width: size.min(new_w),
        height: size.min(new_h),
    };
    let rgb = resize_region(&src, full, (new_w, new_h), window, resample);
    to_tensor_normalised(&rgb, window.width, window.height, size)
}

/// open_clip's default train transform at `size`: a `RandomResizedCrop` whose randomness is a
/// pure function of `(seed, epoch, sample_index)`, so a sample gives the same pixels on any
/// thread, worker or rank. Output as [`eval_transform`].
pub fn train_transform(
    img: &DynamicImage,
    size: usize,
    seed: u64,
    epoch: u64,
    sample_index: u64,
) -> Vec<f32> {
    train_transform_with(img, size, seed, epoch, sample_index, Resample::Bicubic)
}

/// [`train_transform`] with an explicit resampling (see [`LoadedImage`]).
pub fn train_transform_with(
    img: &DynamicImage,
    size: usize,
    seed: u64,
    epoch: u64,
    sample_index: u64,
    resample: Resample,
) -> Vec<f32> {
    let src = Pixels::from_dynamic(img);
    if size == 0 || src.width == 0 || src.height == 0 {
        return vec![0.0; 3 * size * size];
    }
    let mut rng = SampleRng::new(seed, epoch, sample_index);
    let crop =
        random_resized_crop_params(src.width, src.height, TRAIN_SCALE, TRAIN_RATIO, &mut rng);
    let window = Window {
        left: 0,
        top: 0,
        width: size,
        height: size,
    };
    let rgb = resize_region(&src, crop, (size, size), window, resample);
    to_tensor_normalised(&rgb, size, size, size)
}

/// A crop of the source image: `width` x `height` pixels from column `x0`, row `y0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First column.
    pub x0: usize,
    /// First row.
    pub y0: usize,
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
}

/// The deterministic random source of [`train_transform`]: SplitMix64 seeded by a mix of
/// `(seed, epoch, sample_index)`.
#[derive(Clone, Debug)]
pub struct SampleRng {
    state: SplitMix64,
}

impl SampleRng {
    /// The stream for one sample of one epoch.
    pub fn new(seed: u64, epoch: u64, sample_index: u64) -> Self {
        let mut s = mix64(seed ^ 0x5851_F42D_4C95_7F2D);
        s = mix64(s ^ mix64(epoch.wrapping_add(0x9E37_79B9_7F4A_7C15)));
        s = mix64(s ^ mix64(sample_index.wrapping_add(0xD1B5_4A32_D192_ED03)));
        Self {
            state: SplitMix64(s),
        }
    }

    /// Next 64 random bits (SplitMix64).
    pub fn next_u64(&mut self) -> u64 {
        self.state.next_u64()
    }

    /// Uniform in `[lo, hi)`, 53-bit resolution.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let u = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        lo + (hi - lo) * u
    }

    /// Uniform integer in `0..=max` (torch `randint(0, max + 1)`).
    pub fn below_or_eq(&mut self, max: usize) -> usize {
        let n = max as u128 + 1;
        ((u128::from(self.next_u64()) * n) >> 64) as usize
    }
}

/// torchvision `RandomResizedCrop.get_params`: up to 10 draws of an area fraction in `scale` and
/// a log-uniform aspect ratio in `ratio`; the first that fits is placed uniformly at random;
/// otherwise the centre crop clamped to `ratio`.
pub fn random_resized_crop_params(
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut SampleRng,
) -> Region {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * rng.uniform(scale.0, scale.1);
        let aspect = rng.uniform(log_lo, log_hi).exp();
        let w = py_round((target_area * aspect).sqrt()) as usize;
        let h = py_round((target_area / aspect).sqrt()) as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let y0 = rng.below_or_eq(height - h);
            let x0 = rng.below_or_eq(width - w);
            return Region {
                x0,
                y0,
                width: w,
                height: h,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0.min(ratio.1) {
        (
            width,
            py_round(width as f64 / ratio.0.min(ratio.1)) as usize,
        )
    } else if in_ratio > ratio.0.max(ratio.1) {
        (
            py_round(height as f64 * ratio.0.max(ratio.1)) as usize,
            height,
        )
    } else {
        (width, height)
    };
    let (w, h) = (w.clamp(1, width), h.clamp(1, height));
    Region {
        x0: (width - w) / 2,
        y0: (height - h) / 2,
        width: w,
        height: h,
    }
}

/// Python's `round()` for floats: halves go to the even neighbour.
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

mod resample;
use resample::{resize_region, Pixels, Window};

/// torchvision `ToTensor` + `Normalize(OPENAI_MEAN, OPENAI_STD)` into a `3 x size x size` CHW
/// buffer (pixels outside a smaller `w x h` image stay 0 before normalisation, as torchvision's
/// centre-crop padding would leave them).
fn to_tensor_normalised(rgb: &[u8], w: usize, h: usize, size: usize) -> Vec<f32> {
    let plane = size * size;
    let mut out = vec![0.0f32; 3 * plane];
    for c in 0..3 {
        let (mean, std) = (OPENAI_MEAN[c], OPENAI_STD[c]);
        let dst = &mut out[c * plane..(c + 1) * plane];
        for v in dst.iter_mut() {
            *v = (0.0 - mean) / std;
        }
        for y in 0..h.min(size) {
            for x in 0..w.min(size) {
                let v = f32::from(rgb[(y * w + x) * 3 + c]) / 255.0;
                dst[y * size + x] = (v - mean) / std;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
