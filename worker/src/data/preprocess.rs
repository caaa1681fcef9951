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
        Ok(result) => result.with_context(|| format!("invalid or truncated {format:?} data"))?,
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
    state: u64,
}

impl SampleRng {
    /// The stream for one sample of one epoch.
    pub fn new(seed: u64, epoch: u64, sample_index: u64) -> Self {
        let mut s = mix64(seed ^ 0x5851_F42D_4C95_7F2D);
        s = mix64(s ^ mix64(epoch.wrapping_add(0x9E37_79B9_7F4A_7C15)));
        s = mix64(s ^ mix64(sample_index.wrapping_add(0xD1B5_4A32_D192_ED03)));
        Self { state: s }
    }

    /// Next 64 random bits (SplitMix64).
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
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

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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

// ---------------------------------------------------------------------------------------------
// Pixels in PIL's modes
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `L`: one 8-bit channel.
    L,
    /// `LA`: gray + alpha (resized premultiplied).
    La,
    /// `RGB`.
    Rgb,
    /// `RGBA` (resized premultiplied).
    Rgba,
    /// `I;16`: one 16-bit channel, clipped to 255 when converted to RGB.
    I16,
}

impl Mode {
    fn channels(self) -> usize {
        match self {
            Mode::L | Mode::I16 => 1,
            Mode::La => 2,
            Mode::Rgb => 3,
            Mode::Rgba => 4,
        }
    }
}

/// Interleaved samples of one image in a PIL mode (`I16` samples in `wide`, others in `bytes`).
struct Pixels {
    mode: Mode,
    width: usize,
    height: usize,
    bytes: Vec<u8>,
    wide: Vec<u16>,
}

impl Pixels {
    fn from_dynamic(img: &DynamicImage) -> Self {
        let (width, height) = (img.width() as usize, img.height() as usize);
        let hi = |v: &[u16]| v.iter().map(|&x| (x >> 8) as u8).collect::<Vec<u8>>();
        let (mode, bytes, wide) = match img {
            DynamicImage::ImageLuma8(b) => (Mode::L, b.as_raw().clone(), Vec::new()),
            DynamicImage::ImageLumaA8(b) => (Mode::La, b.as_raw().clone(), Vec::new()),
            DynamicImage::ImageRgb8(b) => (Mode::Rgb, b.as_raw().clone(), Vec::new()),
            DynamicImage::ImageRgba8(b) => (Mode::Rgba, b.as_raw().clone(), Vec::new()),
            DynamicImage::ImageLuma16(b) => (Mode::I16, Vec::new(), b.as_raw().clone()),
            DynamicImage::ImageLumaA16(b) => (Mode::La, hi(b.as_raw()), Vec::new()),
            DynamicImage::ImageRgb16(b) => (Mode::Rgb, hi(b.as_raw()), Vec::new()),
            DynamicImage::ImageRgba16(b) => (Mode::Rgba, hi(b.as_raw()), Vec::new()),
            other if other.color().has_alpha() => {
                (Mode::Rgba, other.to_rgba8().into_raw(), Vec::new())
            }
            other => (Mode::Rgb, other.to_rgb8().into_raw(), Vec::new()),
        };
        Self {
            mode,
            width,
            height,
            bytes,
            wide,
        }
    }
}

/// The part of the resized image that is kept (the centre crop), in resized coordinates.
#[derive(Clone, Copy, Debug)]
struct Window {
    left: usize,
    top: usize,
    width: usize,
    height: usize,
}

/// Resizes `region` of `src` to `out` (PIL `crop(region).resize(out)`), keeps `window` of the
/// result, and converts it to interleaved 8-bit RGB (PIL `convert("RGB")`).
fn resize_region(
    src: &Pixels,
    region: Region,
    out: (usize, usize),
    window: Window,
    resample: Resample,
) -> Vec<u8> {
    let ch = src.mode.channels();
    let same_size = out == (region.width, region.height);
    if src.mode == Mode::I16 {
        let plane: Vec<u16> = if same_size || resample == Resample::Nearest {
            sample_nearest(&src.wide, src.width, 1, region, out, window)
        } else {
            bicubic_16(&src.wide, src.width, region, out, window)
        };
        return plane
            .iter()
            .flat_map(|&v| {
                let g = v.min(255) as u8;
                [g, g, g]
            })
            .collect();
    }
    let (data, premultiplied) = if same_size || resample == Resample::Nearest {
        // PIL returns a copy when the size is unchanged, and never premultiplies for nearest.
        (
            sample_nearest(&src.bytes, src.width, ch, region, out, window),
            false,
        )
    } else if matches!(src.mode, Mode::La | Mode::Rgba) {
        let pre = premultiply(&src.bytes, ch);
        (bicubic_8(&pre, src.width, ch, region, out, window), true)
    } else {
        (
            bicubic_8(&src.bytes, src.width, ch, region, out, window),
            false,
        )
    };
    let n = window.width * window.height;
    let mut rgb = Vec::with_capacity(n * 3);
    for px in data.chunks_exact(ch) {
        match src.mode {
            Mode::L => rgb.extend_from_slice(&[px[0]; 3]),
            Mode::La => {
                let g = if premultiplied {
                    unpremultiply(px[0], px[1])
                } else {
                    px[0]
                };
                rgb.extend_from_slice(&[g; 3]);
            }
            Mode::Rgb => rgb.extend_from_slice(&px[..3]),
            Mode::Rgba => {
                for &c in &px[..3] {
                    rgb.push(if premultiplied {
                        unpremultiply(c, px[3])
                    } else {
                        c
                    });
                }
            }
            Mode::I16 => unreachable!("handled above"),
        }
    }
    rgb
}

/// Pillow `rgbA2rgba` / `lA2la`: colour channels times alpha / 255, rounded.
fn premultiply(data: &[u8], ch: usize) -> Vec<u8> {
    let mut out = data.to_vec();
    for px in out.chunks_exact_mut(ch) {
        let alpha = u32::from(px[ch - 1]);
        for c in &mut px[..ch - 1] {
            let tmp = u32::from(*c) * alpha + 128;
            *c = (((tmp >> 8) + tmp) >> 8) as u8;
        }
    }
    out
}

/// Pillow `rgba2rgbA` / `la2lA`: colour * 255 / alpha, truncated and clipped; alpha 0 or 255
/// leaves the colour as it is.
fn unpremultiply(c: u8, alpha: u8) -> u8 {
    if alpha == 0 || alpha == 255 {
        c
    } else {
        ((255 * u32::from(c)) / u32::from(alpha)).min(255) as u8
    }
}

/// Pillow's nearest-neighbour scale (`ImagingScaleAffine`): source index
/// `floor(box0 + (i + 0.5) * scale)`, accumulated the way Pillow does.
fn nearest_indices(in_size: usize, out_size: usize) -> Vec<usize> {
    let step = in_size as f64 / out_size as f64;
    let mut pos = step * 0.5;
    (0..out_size)
        .map(|_| {
            let i = (pos.max(0.0) as usize).min(in_size - 1);
            pos += step;
            i
        })
        .collect()
}

fn sample_nearest<T: Copy>(
    data: &[T],
    stride_px: usize,
    ch: usize,
    region: Region,
    out: (usize, usize),
    window: Window,
) -> Vec<T> {
    let xs = nearest_indices(region.width, out.0);
    let ys = nearest_indices(region.height, out.1);
    let mut res = Vec::with_capacity(window.width * window.height * ch);
    for &sy in &ys[window.top..window.top + window.height] {
        let row = (region.y0 + sy) * stride_px;
        for &sx in &xs[window.left..window.left + window.width] {
            let at = (row + region.x0 + sx) * ch;
            res.extend_from_slice(&data[at..at + ch]);
        }
    }
    res
}

/// Pillow's bicubic kernel (a = -0.5).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow `precompute_coeffs` for the output indices `first..first + count`: for each, the first
/// source index, the number of taps, and the normalised weights.
struct Coeffs {
    ksize: usize,
    starts: Vec<usize>,
    lens: Vec<usize>,
    weights: Vec<f64>,
}

fn precompute_coeffs(in_size: usize, out_size: usize, first: usize, count: usize) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut c = Coeffs {
        ksize,
        starts: Vec::with_capacity(count),
        lens: Vec::with_capacity(count),
        weights: vec![0.0; count * ksize],
    };
    let ss = 1.0 / filterscale;
    for (j, xx) in (first..first + count).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        // C casts truncate toward zero; negatives clamp to 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let k = &mut c.weights[j * ksize..j * ksize + n];
        let mut ww = 0.0;
        for (x, w) in k.iter_mut().enumerate() {
            *w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *w;
        }
        if ww != 0.0 {
            for w in k.iter_mut() {
                *w /= ww;
            }
        }
        c.starts.push(xmin);
        c.lens.push(n);
    }
    c
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow `normalize_coeffs_8bpc`: weights to fixed point, rounded half away from zero.
fn fixed_point(weights: &[f64]) -> Vec<i32> {
    let one = f64::from(1u32 << PRECISION_BITS);
    weights
        .iter()
        .map(|&w| {
            if w < 0.0 {
                (-0.5 + w * one) as i32
            } else {
                (0.5 + w * one) as i32
            }
        })
        .collect()
}

/// Pillow `clip8`.
fn clip8(v: i32) -> u8 {
    if v >= 1i32 << (PRECISION_BITS + 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Pillow's two-pass 8-bit resample of `region` to `out`, evaluated only inside `window`.
fn bicubic_8(
    data: &[u8],
    stride_px: usize,
    ch: usize,
    region: Region,
    out: (usize, usize),
    window: Window,
) -> Vec<u8> {
    match ch {
        1 => bicubic_8_n::<1>(data, stride_px, region, out, window),
        2 => bicubic_8_n::<2>(data, stride_px, region, out, window),
        3 => bicubic_8_n::<3>(data, stride_px, region, out, window),
        _ => bicubic_8_n::<4>(data, stride_px, region, out, window),
    }
}

/// [`bicubic_8`] for `C` interleaved channels. Accumulates in `i32` as Pillow does.
fn bicubic_8_n<const C: usize>(
    data: &[u8],
    stride_px: usize,
    region: Region,
    out: (usize, usize),
    window: Window,
) -> Vec<u8> {
    const HALF: i32 = 1 << (PRECISION_BITS - 1);
    let need_h = out.0 != region.width;
    let need_v = out.1 != region.height;
    let hc = precompute_coeffs(region.width, out.0, window.left, window.width);
    let vc = precompute_coeffs(region.height, out.1, window.top, window.height);
    // Source rows the vertical pass reads (relative to the region).
    let (row_lo, row_hi) = if need_v {
        let lo = vc.starts.iter().copied().min().unwrap_or(0);
        let hi = vc
            .starts
            .iter()
            .zip(&vc.lens)
            .map(|(s, l)| s + l)
            .max()
            .unwrap_or(0);
        (lo, hi)
    } else {
        (window.top, window.top + window.height)
    };
    // Horizontal pass: rows row_lo..row_hi, columns of the window, 8-bit rounded.
    let row_len = window.width * C;
    let mut temp = vec![0u8; (row_hi - row_lo) * row_len];
    let hk = fixed_point(&hc.weights);
    for (sy, dst) in (row_lo..row_hi).zip(temp.chunks_exact_mut(row_len)) {
        let at = ((region.y0 + sy) * stride_px + region.x0) * C;
        let src = &data[at..at + region.width * C];
        if !need_h {
            dst.copy_from_slice(&src[window.left * C..window.left * C + row_len]);
            continue;
        }
        for (xx, px_out) in dst.chunks_exact_mut(C).enumerate() {
            let k = &hk[xx * hc.ksize..xx * hc.ksize + hc.lens[xx]];
            let taps = &src[hc.starts[xx] * C..(hc.starts[xx] + k.len()) * C];
            let mut ss = [HALF; C];
            for (px, &w) in taps.chunks_exact(C).zip(k) {
                for c in 0..C {
                    ss[c] += i32::from(px[c]) * w;
                }
            }
            for c in 0..C {
                px_out[c] = clip8(ss[c]);
            }
        }
    }
    if !need_v {
        return temp;
    }
    // Vertical pass over the horizontally resampled rows, a whole output row at a time.
    let vk = fixed_point(&vc.weights);
    let mut res = vec![0u8; window.height * row_len];
    let mut acc = vec![0i32; row_len];
    for (yy, dst) in res.chunks_exact_mut(row_len).enumerate() {
        let k = &vk[yy * vc.ksize..yy * vc.ksize + vc.lens[yy]];
        let first = vc.starts[yy] - row_lo;
        acc.fill(HALF);
        for (y, &w) in k.iter().enumerate() {
            let src = &temp[(first + y) * row_len..(first + y + 1) * row_len];
            for (a, &p) in acc.iter_mut().zip(src) {
                *a += i32::from(p) * w;
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    res
}

/// The same two passes in floating point for 16-bit grayscale, rounded half away from zero
/// and clamped to 16 bits after each pass.
fn bicubic_16(
    data: &[u16],
    stride_px: usize,
    region: Region,
    out: (usize, usize),
    window: Window,
) -> Vec<u16> {
    let hc = precompute_coeffs(region.width, out.0, window.left, window.width);
    let vc = precompute_coeffs(region.height, out.1, window.top, window.height);
    let round16 = |v: f64| v.round().clamp(0.0, 65535.0) as u16;
    let tw = window.width;
    // Horizontal pass over every region row the vertical pass can touch.
    let rows = region.height;
    let mut temp = vec![0u16; rows * tw];
    for sy in 0..rows {
        let row = (region.y0 + sy) * stride_px + region.x0;
        for xx in 0..tw {
            if out.0 == region.width {
                temp[sy * tw + xx] = data[row + window.left + xx];
                continue;
            }
            let k = &hc.weights[xx * hc.ksize..xx * hc.ksize + hc.lens[xx]];
            let s: f64 = k
                .iter()
                .enumerate()
                .map(|(x, &w)| f64::from(data[row + hc.starts[xx] + x]) * w)
                .sum();
            temp[sy * tw + xx] = round16(s);
        }
    }
    let mut res = vec![0u16; window.height * tw];
    for yy in 0..window.height {
        for xx in 0..tw {
            res[yy * tw + xx] = if out.1 == region.height {
                temp[(window.top + yy) * tw + xx]
            } else {
                let k = &vc.weights[yy * vc.ksize..yy * vc.ksize + vc.lens[yy]];
                let s: f64 = k
                    .iter()
                    .enumerate()
                    .map(|(y, &w)| f64::from(temp[(vc.starts[yy] + y) * tw + xx]) * w)
                    .sum();
                round16(s)
            };
        }
    }
    res
}

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
