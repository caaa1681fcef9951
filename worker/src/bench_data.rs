//! `coca-worker bench-data`: tokenizer and loader throughput (a benchmark, not a test).

use crate::data::loader::{CaptionSource, Loader, LoaderPosition, Sample};
use crate::data::preprocess::open_image;
use crate::data::sampler::DistributedSampler;
use crate::data::tokenizer::ClipTokenizer;
use anyhow::{ensure, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Captions of the kinds the tokenizer meets: plain, punctuated, accented, HTML, emoji, CJK.
const CAPTIONS: &[&str] = &[
    "a photo of a cat",
    "A woman wearing a net on her head cutting a cake. ",
    "TWO   Dogs\tplaying\n in the SNOW!!!",
    "Café crème brûlée at the café",
    "&lt;b&gt;bold&lt;/b&gt; text &amp;amp; more",
    "emoji 😀🐶 and ❤️",
    "一只猫坐在沙发上",
    "don't won't it's we'll they've I'd",
    "numbers 1234567 and 3.14159 and 1st 2nd",
    "A man riding a wave on top of a surfboard.",
];

/// What `bench-data` measures.
#[derive(Debug, Clone)]
pub struct DataBenchOptions {
    /// JPEG files written and read per loader measurement.
    pub images: usize,
    pub image_size: usize,
    pub batch: usize,
}

/// Sample `i` is JPEG file `i`, decoded and train-transformed.
struct JpegFiles {
    paths: Vec<PathBuf>,
    size: usize,
}

impl CaptionSource for JpegFiles {
    fn len(&self) -> usize {
        self.paths.len()
    }

    fn load(&self, index: u64, epoch: u64) -> Result<Sample> {
        let path = &self.paths[index as usize];
        let image = open_image(path)?;
        Ok(Sample {
            pixels: image.train_transform(self.size, 0, epoch, index),
            caption: "a photo".into(),
        })
    }

    fn describe(&self, index: u64) -> String {
        self.paths[index as usize].display().to_string()
    }
}

/// Writes `n` noisy `size`×`size` JPEGs (quality 90) into a fresh temporary directory.
fn write_jpegs(n: usize, size: u32) -> Result<(PathBuf, Vec<PathBuf>)> {
    let dir = std::env::temp_dir().join(format!("coca-bench-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut rng = crate::rng::SplitMix64(7);
    let mut paths = Vec::with_capacity(n);
    for i in 0..n {
        let img = image::RgbImage::from_fn(size, size, |x, y| {
            let noise = (rng.next_u64() % 32) as u8;
            image::Rgb([
                (x as u8).wrapping_add(noise),
                (y as u8).wrapping_add(i as u8),
                noise * 4,
            ])
        });
        let path = dir.join(format!("{i:05}.jpg"));
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .with_context(|| format!("cannot write {}", path.display()))?;
        paths.push(path);
    }
    Ok((dir, paths))
}

/// Runs the benchmark and returns its JSON line.
pub fn run(opts: &DataBenchOptions) -> Result<serde_json::Value> {
    ensure!(
        opts.images >= opts.batch && opts.batch > 0,
        "--images must be at least --batch > 0"
    );
    let tokenizer = ClipTokenizer::new()?;
    let (mut n, start) = (0usize, Instant::now());
    while start.elapsed() < Duration::from_secs(2) {
        for c in CAPTIONS {
            std::hint::black_box(tokenizer.tokenize(c, 77));
            n += 1;
        }
    }
    let strings_per_s = n as f64 / start.elapsed().as_secs_f64();

    let (dir, paths) = write_jpegs(opts.images, opts.image_size as u32)?;
    let source: Arc<dyn CaptionSource> = Arc::new(JpegFiles {
        paths,
        size: opts.image_size,
    });
    let mut loader_rates = serde_json::Map::new();
    let result = (|| -> Result<()> {
        for threads in [1usize, 2] {
            let sampler = DistributedSampler::new(source.len(), 0, opts.batch, 0, 1)?;
            let batches = sampler.batches_per_epoch();
            let tok = Arc::new(tokenizer.clone());
            let mut loader = Loader::new(
                source.clone(),
                sampler,
                Arc::new(move |c: &str| tok.tokenize(c, 77)),
                threads,
                LoaderPosition::default(),
                &candle_core::Device::Cpu,
            )?;
            let start = Instant::now();
            let mut images = 0;
            for _ in 0..batches {
                images += loader.next_batch()?.len;
            }
            let rate = images as f64 / start.elapsed().as_secs_f64();
            loader_rates.insert(
                format!("loader_images_per_s_{threads}_threads"),
                rate.into(),
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let mut out = serde_json::json!({
        "tokenizer_strings_per_s": strings_per_s,
        "image_size": opts.image_size,
        "images": opts.images,
    });
    if let Some(map) = out.as_object_mut() {
        map.extend(loader_rates);
    }
    Ok(out)
}
