//! The built-in synthetic captioning set: procedurally drawn images of one to four same-coloured
//! shapes on a plain background, each with a caption that describes it exactly, e.g.
//! "two red circles on the left on a blue background". It needs no files, every sample is a pure
//! function of `(seed, index, image_size)`, and a small CoCa learns it on a couple of CPU cores in
//! minutes, which makes it the default data set of the `pretrain` demo.
//!
//! # Grammar
//!
//! ```text
//! caption  = COUNT " " COLOUR " " SHAPE ["s" if COUNT > 1] [" " POSITION] " on " ARTICLE " " BACKGROUND " background"
//! COUNT    = one | two | three | four
//! COLOUR   = red | orange | yellow | green | cyan | blue | purple | pink | white | black
//! SHAPE    = circle | square | triangle | diamond | star
//! POSITION = on the left | on the right | at the top | at the bottom | in the middle   (or absent)
//! ARTICLE  = "an" before a vowel ("an orange background"), else "a"
//! BACKGROUND = any COLOUR other than the shapes' colour
//! ```
//!
//! That is 4 × 10 × 5 × 6 × 9 = 10,800 distinct captions ([`SyntheticCaptions::distinct_captions`]),
//! drawn uniformly, and 50 zero-shot classes "COLOUR SHAPE" ([`SyntheticCaptions::class_names`]).
//!
//! # Pictures
//!
//! The layout is decided in coordinates relative to the canvas, so one `(seed, index)` is the same
//! picture at every size; only the rasterisation depends on `image_size`. Shapes are drawn
//! unrotated from signed distance functions with one pixel of anti-aliasing, each inside its own
//! square box; boxes keep a gap of 5% of the canvas between them and 3% from the border, so the
//! objects never touch and can be counted. A position puts every object inside that region (the
//! left or right 55%, the top or bottom 55%, the central 60%) and also constrains the group's
//! centroid (left: x ≤ 1/3 and y within the middle 30%; middle: within the central 20%; ...), so
//! the five positions are told apart by where the group's centre lies; with no position the
//! objects may be anywhere. Object size is drawn from 70–100% of the largest size that fits the
//! count in the region (at most half the canvas); when random placement fails after a few
//! tries the size shrinks by 10% (twice), and as a last resort the objects are laid out on a
//! centred grid at the original size, which always fits. Colours get a small per-image jitter
//! (±10 per channel). Only `+ - * /`, `sqrt` and `floor` are used, so the pixels are bit-identical
//! on every IEEE-754 platform.
//!
//! Objects stay recognisable and countable from 32×32 up (at 32×32 the smallest, four objects in
//! half the canvas, are about 5 pixels wide); any size from 1 pixel draws without panicking.
//!
//! # Held-out split
//!
//! Evaluation uses the same grammar with another seed: [`SyntheticCaptions::held_out`] is
//! `SyntheticCaptions::new(seed ^ HELD_OUT_SALT, len, image_size)` ([`held_out_seed`]). Its images
//! are different drawings (other layouts, sizes and jitter) while its captions and classes come
//! from the same grammar, so zero-shot classes and caption words are all seen in training. The
//! rule is an involution: the held-out set of a held-out set is the training set again.

use crate::rng::mix64;
use image::RgbImage;

/// Shape words (singular; every plural is the word plus "s").
pub const SHAPES: [&str; 5] = ["circle", "square", "triangle", "diamond", "star"];

/// Colour words, used both for the shapes and for the background.
pub const COLOURS: [&str; 10] = [
    "red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "white", "black",
];

/// The RGB value of each of [`COLOURS`] before the per-image jitter.
pub const PALETTE: [[u8; 3]; 10] = [
    [220, 40, 40],   // red
    [245, 140, 20],  // orange
    [245, 225, 40],  // yellow
    [40, 170, 60],   // green
    [40, 200, 220],  // cyan
    [40, 70, 210],   // blue
    [135, 60, 185],  // purple
    [245, 145, 195], // pink
    [245, 245, 245], // white
    [20, 20, 20],    // black
];

/// Number words; `COUNTS[k - 1]` names `k` objects.
pub const COUNTS: [&str; 4] = ["one", "two", "three", "four"];

/// Position phrases; index 0 is "no position phrase" (the objects may be anywhere).
pub const POSITIONS: [&str; 6] = [
    "",
    "on the left",
    "on the right",
    "at the top",
    "at the bottom",
    "in the middle",
];

/// XOR-ed into the seed to get the held-out split's seed (see [`held_out_seed`]).
pub const HELD_OUT_SALT: u64 = 0x4845_4c44_5f4f_5554; // "HELD_OUT"

/// The image side the `pretrain` demo uses unless told otherwise.
pub const DEFAULT_IMAGE_SIZE: u32 = 64;

/// Largest per-channel colour jitter, added independently to the shape and background colours.
const JITTER: i32 = 10;
/// Gap between object boxes, as a fraction of the canvas side.
const GAP: f64 = 0.05;
/// Gap between object boxes and the border, as a fraction of the canvas side.
const MARGIN: f64 = 0.03;
/// Largest object box side, as a fraction of the canvas side.
const MAX_OBJECT: f64 = 0.5;

/// One drawn sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSample {
    /// The picture, `image_size × image_size`.
    pub image: RgbImage,
    /// Its caption in the grammar of the module documentation.
    pub caption: String,
    /// Its zero-shot class, an index into [`SyntheticCaptions::class_names`] (colour × shape).
    pub class_index: usize,
    /// What it was drawn from.
    pub attributes: SyntheticAttributes,
}

/// The attributes a sample was drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SyntheticAttributes {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLOURS`]: the shapes' colour.
    pub colour: usize,
    /// Number of objects, 1 to 4.
    pub count: usize,
    /// Index into [`POSITIONS`]; 0 means no position phrase (anywhere).
    pub position: usize,
    /// Index into [`COLOURS`]: the background's colour, never equal to `colour`.
    pub background: usize,
}

impl SyntheticAttributes {
    /// The caption these attributes produce, e.g. "one yellow square at the top on a black background".
    pub fn caption(&self) -> String {
        let mut caption = format!(
            "{} {} {}",
            COUNTS[self.count - 1],
            COLOURS[self.colour],
            SHAPES[self.shape]
        );
        if self.count > 1 {
            caption.push('s');
        }
        if self.position != 0 {
            caption.push(' ');
            caption.push_str(POSITIONS[self.position]);
        }
        let background = COLOURS[self.background];
        let article = if background.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        caption.push_str(&format!(" on {article} {background} background"));
        caption
    }

    /// The zero-shot class: `colour * SHAPES.len() + shape`, an index into
    /// [`SyntheticCaptions::class_names`].
    pub fn class_index(&self) -> usize {
        self.colour * SHAPES.len() + self.shape
    }

    /// The attributes of combination `k` in `0..distinct_captions()` (a mixed-radix numbering of
    /// the grammar), so the whole grammar can be enumerated.
    pub fn from_combination(k: usize) -> Self {
        assert!(
            k < SyntheticCaptions::distinct_captions(),
            "combination {k} out of range"
        );
        let (k, shape) = (k / SHAPES.len(), k % SHAPES.len());
        let (k, colour) = (k / COLOURS.len(), k % COLOURS.len());
        let (k, count) = (k / COUNTS.len(), k % COUNTS.len() + 1);
        let (k, position) = (k / POSITIONS.len(), k % POSITIONS.len());
        let other = k % (COLOURS.len() - 1);
        let background = if other >= colour { other + 1 } else { other };
        Self {
            shape,
            colour,
            count,
            position,
            background,
        }
    }

    fn draw(rng: &mut SplitMix64) -> Self {
        let shape = rng.below(SHAPES.len());
        let colour = rng.below(COLOURS.len());
        let count = rng.below(COUNTS.len()) + 1;
        let position = rng.below(POSITIONS.len());
        let other = rng.below(COLOURS.len() - 1);
        let background = if other >= colour { other + 1 } else { other };
        Self {
            shape,
            colour,
            count,
            position,
            background,
        }
    }
}

/// The built-in synthetic captioning set: `len` samples, deterministic from `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticCaptions {
    seed: u64,
    len: usize,
    image_size: u32,
}

/// The seed of the held-out split of the set with `seed`: `seed ^ HELD_OUT_SALT`.
pub fn held_out_seed(seed: u64) -> u64 {
    seed ^ HELD_OUT_SALT
}

impl SyntheticCaptions {
    /// A set of `len` samples of `image_size × image_size` pixels drawn from `seed`.
    pub fn new(seed: u64, len: usize, image_size: u32) -> Self {
        Self {
            seed,
            len,
            image_size,
        }
    }

    /// The evaluation split: `len` samples of the same size from seed [`held_out_seed`]`(seed)`,
    /// whose pictures differ from this set's (see the module documentation).
    pub fn held_out(&self, len: usize) -> SyntheticCaptions {
        Self::new(held_out_seed(self.seed), len, self.image_size)
    }

    /// The number of samples an epoch covers (indices `0..len`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set has no samples.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The seed the samples are drawn from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The side of the square images, in pixels.
    pub fn image_size(&self) -> u32 {
        self.image_size
    }

    /// The attributes of sample `index` without drawing it (the same as `get(index).attributes`).
    pub fn attributes(&self, index: u64) -> SyntheticAttributes {
        SyntheticAttributes::draw(&mut self.rng(index))
    }

    /// Sample `index` (any u64, not only `0..len`; the same (seed, index, size) always gives the
    /// same pixels and caption, and the same caption and layout at every size).
    pub fn get(&self, index: u64) -> SyntheticSample {
        let mut rng = self.rng(index);
        let attributes = SyntheticAttributes::draw(&mut rng);
        let layout = Layout::place(&attributes, &mut rng);
        let foreground = jitter(PALETTE[attributes.colour], &mut rng);
        let background = jitter(PALETTE[attributes.background], &mut rng);
        let image = render(
            self.image_size,
            attributes.shape,
            &layout,
            foreground,
            background,
        );
        SyntheticSample {
            image,
            caption: attributes.caption(),
            class_index: attributes.class_index(),
            attributes,
        }
    }

    /// Class names for zero-shot classification, "COLOUR SHAPE" (e.g. "red circle"), colour-major;
    /// `class_index` of a sample indexes this list.
    pub fn class_names() -> Vec<String> {
        COLOURS
            .iter()
            .flat_map(|colour| SHAPES.iter().map(move |shape| format!("{colour} {shape}")))
            .collect()
    }

    /// Prompt templates for zero-shot; `{}` is the class name. Like OpenAI's 80 ImageNet
    /// templates they are an ensemble: every count word with every background, in the caption
    /// grammar's own words ("two {}s on a blue background"), so that the averaged class
    /// embedding describes the shape and colour alone and a model trained only on this set has
    /// seen every word of every prompt.
    pub fn templates() -> Vec<String> {
        let mut out = Vec::with_capacity(COUNTS.len() * COLOURS.len());
        for (i, count) in COUNTS.iter().enumerate() {
            let plural = if i == 0 { "" } else { "s" };
            for background in COLOURS {
                let article = if background.starts_with(['a', 'e', 'i', 'o', 'u']) {
                    "an"
                } else {
                    "a"
                };
                out.push(format!(
                    "{count} {{}}{plural} on {article} {background} background"
                ));
            }
        }
        out
    }

    /// Number of distinct captions the grammar can produce (10,800), each equally likely.
    pub fn distinct_captions() -> usize {
        COUNTS.len() * COLOURS.len() * SHAPES.len() * POSITIONS.len() * (COLOURS.len() - 1)
    }

    fn rng(&self, index: u64) -> SplitMix64 {
        SplitMix64(crate::rng::SplitMix64(mix64(
            mix64(self.seed ^ 0x5EED_C0CA_5EED_C0CA).wrapping_add(index),
        )))
    }
}

/// The project's SplitMix64 with the draws picture-making needs.
struct SplitMix64(crate::rng::SplitMix64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-60 for small `n`).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)` (or `lo` when the range is empty).
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        if hi <= lo {
            lo
        } else {
            lo + (hi - lo) * self.unit()
        }
    }
}

fn jitter(rgb: [u8; 3], rng: &mut SplitMix64) -> [u8; 3] {
    rgb.map(|c| {
        let delta = rng.below(2 * JITTER as usize + 1) as i32 - JITTER;
        (i32::from(c) + delta).clamp(0, 255) as u8
    })
}

/// An axis-aligned rectangle in canvas-relative coordinates (`0..1`, y down).
#[derive(Debug, Clone, Copy)]
struct Rect {
    x0: f64,
    y0: f64,
    x1: f64,
    y1: f64,
}

impl Rect {
    fn contains(&self, (x, y): (f64, f64)) -> bool {
        (self.x0..=self.x1).contains(&x) && (self.y0..=self.y1).contains(&y)
    }

    fn centre(&self) -> (f64, f64) {
        ((self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0)
    }
}

/// Where the objects of `position` may lie, and where their centroid must lie.
fn region(position: usize) -> (Rect, Rect) {
    let rect = |x0, y0, x1, y1| Rect { x0, y0, x1, y1 };
    let (lo, hi) = (MARGIN, 1.0 - MARGIN);
    match position {
        1 => (rect(lo, lo, 0.55, hi), rect(0.0, 0.35, 1.0 / 3.0, 0.65)),
        2 => (rect(0.45, lo, hi, hi), rect(2.0 / 3.0, 0.35, 1.0, 0.65)),
        3 => (rect(lo, lo, hi, 0.55), rect(0.35, 0.0, 0.65, 1.0 / 3.0)),
        4 => (rect(lo, 0.45, hi, hi), rect(0.35, 2.0 / 3.0, 0.65, 1.0)),
        5 => (rect(0.2, 0.2, 0.8, 0.8), rect(0.4, 0.4, 0.6, 0.6)),
        _ => (rect(lo, lo, hi, hi), rect(0.0, 0.0, 1.0, 1.0)),
    }
}

/// The grid (columns, rows) that fits `n` equal boxes largest into a `w × h` region, and that
/// largest cell side.
fn best_grid(n: usize, w: f64, h: f64) -> (usize, usize, f64) {
    (1..=n)
        .map(|cols| {
            let rows = n.div_ceil(cols);
            (cols, rows, (w / cols as f64).min(h / rows as f64))
        })
        .fold(
            (1, n, f64::MIN),
            |best, c| if c.2 > best.2 { c } else { best },
        )
}

/// The objects of one picture: a box side and the box centres, canvas-relative.
#[derive(Debug, Clone, PartialEq)]
struct Layout {
    side: f64,
    centres: Vec<(f64, f64)>,
}

impl Layout {
    fn place(attributes: &SyntheticAttributes, rng: &mut SplitMix64) -> Self {
        let n = attributes.count;
        let (area, centroid) = region(attributes.position);
        let (w, h) = (area.x1 - area.x0, area.y1 - area.y0);
        let (cols, rows, cell) = best_grid(n, w, h);
        let full = (cell - GAP).min(MAX_OBJECT) * rng.range(0.7, 1.0);
        let mut side = full;
        for _ in 0..3 {
            for _ in 0..24 {
                if let Some(centres) = Self::scatter(n, side, area, rng) {
                    let mean = mean(&centres);
                    if centroid.contains(mean) {
                        return Self { side, centres };
                    }
                }
            }
            side *= 0.9;
        }
        Self::grid(n, cols, rows, full, area, rng)
    }

    /// Random non-overlapping centres for `n` boxes of side `side` inside `area`, or `None`.
    fn scatter(n: usize, side: f64, area: Rect, rng: &mut SplitMix64) -> Option<Vec<(f64, f64)>> {
        let half = side / 2.0;
        let mut centres: Vec<(f64, f64)> = Vec::with_capacity(n);
        for _ in 0..n {
            let placed = (0..16).find_map(|_| {
                let c = (
                    rng.range(area.x0 + half, area.x1 - half),
                    rng.range(area.y0 + half, area.y1 - half),
                );
                let apart = centres
                    .iter()
                    .all(|o| (o.0 - c.0).abs() >= side + GAP || (o.1 - c.1).abs() >= side + GAP);
                apart.then_some(c)
            })?;
            centres.push(placed);
        }
        Some(centres)
    }

    /// `n` boxes on a `cols × rows` grid (the last row centred), the grid centred in `area` up
    /// to a small random shift; it always fits because `side + GAP` is at most the grid's cell.
    fn grid(
        n: usize,
        cols: usize,
        rows: usize,
        side: f64,
        area: Rect,
        rng: &mut SplitMix64,
    ) -> Self {
        let pitch = side + GAP;
        let (cx, cy) = area.centre();
        let slack_x = ((area.x1 - area.x0) - (cols as f64 * pitch - GAP)).max(0.0) / 2.0;
        let slack_y = ((area.y1 - area.y0) - (rows as f64 * pitch - GAP)).max(0.0) / 2.0;
        let dx = rng.range(-1.0, 1.0) * slack_x.min(0.03);
        let dy = rng.range(-1.0, 1.0) * slack_y.min(0.03);
        let mut centres = Vec::with_capacity(n);
        for row in 0..rows {
            let in_row = cols.min(n - row * cols);
            for col in 0..in_row {
                centres.push((
                    cx + dx + (col as f64 - (in_row as f64 - 1.0) / 2.0) * pitch,
                    cy + dy + (row as f64 - (rows as f64 - 1.0) / 2.0) * pitch,
                ));
            }
        }
        Self { side, centres }
    }
}

fn mean(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(sx, sy), p| (sx + p.0, sy + p.1));
    (sx / n, sy / n)
}

/// `cos` and `sin` of 36° and 72°, written out so no transcendental function is evaluated.
const COS36: f64 = 0.809_016_994_374_947_4;
const SIN36: f64 = 0.587_785_252_292_473_1;
const COS72: f64 = 0.309_016_994_374_947_45;
const SIN72: f64 = 0.951_056_516_295_153_5;
/// The star's inner radius relative to its outer one (a regular star's is 0.382; fatter arms
/// survive small sizes better).
const STAR_INNER: f64 = 0.5;

/// Signed distance, in units of the box half-side, from the point `(x, y)` (relative to the box
/// centre, y down, also in half-sides) to shape `shape`; negative inside.
fn shape_distance(shape: usize, x: f64, y: f64, star: &[(f64, f64); 10]) -> f64 {
    match shape {
        // circle filling the box
        0 => (x * x + y * y).sqrt() - 1.0,
        // square of 82% of the box (about the circle's area)
        1 => {
            let (qx, qy) = (x.abs() - 0.82, y.abs() - 0.82);
            let outside = (qx.max(0.0) * qx.max(0.0) + qy.max(0.0) * qy.max(0.0)).sqrt();
            outside + qx.max(qy).min(0.0)
        }
        // equilateral triangle, point up, as wide as the box
        2 => polygon_distance(&[(0.0, -0.866), (1.0, 0.866), (-1.0, 0.866)], (x, y)),
        // diamond touching the middle of each side of the box
        3 => (x.abs() + y.abs() - 1.0) * std::f64::consts::FRAC_1_SQRT_2,
        // five-pointed star, point up
        _ => polygon_distance(star, (x, y)),
    }
}

/// The star's vertices: outer radius 1.05 half-sides, moved down so it is centred in the box.
fn star_vertices() -> [(f64, f64); 10] {
    let unit = [
        (0.0, -1.0),
        (SIN36 * STAR_INNER, -COS36 * STAR_INNER),
        (SIN72, -COS72),
        (SIN72 * STAR_INNER, COS72 * STAR_INNER),
        (SIN36, COS36),
        (0.0, STAR_INNER),
        (-SIN36, COS36),
        (-SIN72 * STAR_INNER, COS72 * STAR_INNER),
        (-SIN72, -COS72),
        (-SIN36 * STAR_INNER, -COS36 * STAR_INNER),
    ];
    let (radius, shift) = (1.05, (1.0 - COS36) / 2.0);
    unit.map(|(x, y)| (x * radius, (y + shift) * radius))
}

/// Exact signed distance to a simple polygon (Íñigo Quílez's `sdPolygon`); negative inside.
fn polygon_distance(v: &[(f64, f64)], p: (f64, f64)) -> f64 {
    let dot = |a: (f64, f64), b: (f64, f64)| a.0 * b.0 + a.1 * b.1;
    let sub = |a: (f64, f64), b: (f64, f64)| (a.0 - b.0, a.1 - b.1);
    let mut d = dot(sub(p, v[0]), sub(p, v[0]));
    let mut sign = 1.0;
    let mut j = v.len() - 1;
    for i in 0..v.len() {
        let e = sub(v[j], v[i]);
        let w = sub(p, v[i]);
        let t = (dot(w, e) / dot(e, e)).clamp(0.0, 1.0);
        let b = (w.0 - e.0 * t, w.1 - e.1 * t);
        d = d.min(dot(b, b));
        let c = [p.1 >= v[i].1, p.1 < v[j].1, e.0 * w.1 > e.1 * w.0];
        if c.iter().all(|&c| c) || c.iter().all(|&c| !c) {
            sign = -sign;
        }
        j = i;
    }
    sign * d.sqrt()
}

fn render(size: u32, shape: usize, layout: &Layout, fg: [u8; 3], bg: [u8; 3]) -> RgbImage {
    let n = size as usize;
    let mut pixels: Vec<u8> = bg.iter().copied().cycle().take(n * n * 3).collect();
    let star = star_vertices();
    let scale = f64::from(size);
    let half = layout.side * scale / 2.0;
    for &(cx, cy) in &layout.centres {
        let (cx, cy) = (cx * scale, cy * scale);
        // pixels whose centres are within half a pixel of the box
        let span = |c: f64| {
            let lo = (c - half - 1.0).floor().max(0.0) as usize;
            let hi = ((c + half + 1.0).floor().max(0.0) as usize).min(n);
            lo..hi
        };
        for py in span(cy) {
            let y = (py as f64 + 0.5 - cy) / half;
            for px in span(cx) {
                let x = (px as f64 + 0.5 - cx) / half;
                // distance in pixels; a one-pixel ramp centred on the edge
                let coverage = (0.5 - shape_distance(shape, x, y, &star) * half).clamp(0.0, 1.0);
                if coverage > 0.0 {
                    let at = (py * n + px) * 3;
                    for k in 0..3 {
                        let mixed =
                            f64::from(bg[k]) + (f64::from(fg[k]) - f64::from(bg[k])) * coverage;
                        pixels[at + k] = (mixed + 0.5).floor() as u8;
                    }
                }
            }
        }
    }
    RgbImage::from_raw(size, size, pixels).expect("buffer of size × size × 3 bytes")
}

#[cfg(test)]
mod tests;
