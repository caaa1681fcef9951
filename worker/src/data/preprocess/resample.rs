//! Pillow's resampling, ported: pixels held in PIL's modes and its 8-bit fixed-point bicubic
//! (and nearest for palette and 1-bit images), so resized pixels equal PIL's bit for bit.

use super::*;

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
pub(super) struct Pixels {
    mode: Mode,
    pub(super) width: usize,
    pub(super) height: usize,
    bytes: Vec<u8>,
    wide: Vec<u16>,
}

impl Pixels {
    pub(super) fn from_dynamic(img: &DynamicImage) -> Self {
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
pub(super) struct Window {
    pub(super) left: usize,
    pub(super) top: usize,
    pub(super) width: usize,
    pub(super) height: usize,
}

/// Resizes `region` of `src` to `out` (PIL `crop(region).resize(out)`), keeps `window` of the
/// result, and converts it to interleaved 8-bit RGB (PIL `convert("RGB")`).
pub(super) fn resize_region(
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
