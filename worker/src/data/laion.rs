//! LAION part files, as the seed reads them: `--task_name FILELIST`, where the file list names
//! one part file per line (relative paths are relative to the list's folder).
//!
//! A part file is text with one sample per line and TAB-separated columns; it is gzip-compressed
//! when its name ends in `.gz`. Column 2 (index 1) is a JSON object whose `caption_en` is the
//! caption (`blip_caption_en` when `caption_en` is absent, null or blank), and column 5
//! (index 4) is the image file, base64-encoded.
//!
//! # Indexing
//!
//! The seed streams part files (an iterable data set). Here a rank's part files are indexed
//! when the source is opened, so that they form a map-style [`CaptionSource`] that works with the
//! shuffling [`DistributedSampler`](super::sampler::DistributedSampler), the multi-threaded
//! [`Loader`](super::loader::Loader) and exact resumption:
//!
//! * a plain part file is read once, line by line, keeping for each usable line its number,
//!   its caption and where its base64 column lies in the file; a sample's image is read back
//!   from disk when it is loaded, so memory holds only captions and offsets;
//! * a gzip part file cannot be read at an offset, so it is decompressed into memory once and
//!   kept there: fine for part files that fit in memory; decompress large ones beforehand
//!   (`gunzip`) to have them indexed on disk instead. A corrupt or truncated gzip stream keeps
//!   the complete lines before the damage and reports the rest as skipped.
//!
//! Which part files (or lines) a rank indexes follows [`super::parts`]: file `i` goes to rank
//! `i % world`, or, with fewer files than ranks, usable line `j` to rank `j % world`.
//!
//! # Bad input
//!
//! A line with fewer than 5 columns, a column 2 that is not a JSON object, or no caption is
//! skipped when indexing and listed in [`LaionParts::skipped`] as `file:line: reason`; so is a
//! part file that cannot be read. A base64 column that does not decode, an image that does not
//! decode, and an image under [`MIN_IMAGE_SIDE`] pixels on a side are found when the sample is
//! loaded, and the loader reports them with [`CaptionSource::describe`] (`file:line`).
//! Augmentation is keyed by `(seed, epoch, file number << 40 | line number)`, so a sample is
//! augmented the same way whatever the rank layout.

use super::loader::{CaptionSource, Sample};
use super::parts::{read_file_list, read_range, summarize_skips, ShardSpec, Split};
use super::preprocess::decode_image;
use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT;
use base64::Engine as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Images narrower or shorter than this many pixels are skipped (as the seed does).
pub const MIN_IMAGE_SIDE: u32 = 5;
/// Tab-separated columns a line needs (the image is the last one read).
const MIN_COLUMNS: usize = 5;
/// Column (0-based) holding the caption JSON.
const JSON_COLUMN: usize = 1;
/// Column (0-based) holding the base64 image.
const IMAGE_COLUMN: usize = 4;

/// This rank's share of a LAION-style set of part files, indexed (see the module docs).
pub struct LaionParts {
    files: Vec<PartFile>,
    samples: Vec<LaionSample>,
    skipped: Vec<String>,
    split: Split,
    image_size: usize,
    seed: u64,
}

struct PartFile {
    path: PathBuf,
    /// The decompressed content of a gzip part file; `None` for plain files (read from disk).
    data: Option<Vec<u8>>,
}

struct LaionSample {
    /// Position of the part file in the file list.
    file: u32,
    /// 1-based line number.
    line: u64,
    /// Byte range of the base64 column (in the file, or in the decompressed data).
    image_offset: u64,
    image_len: usize,
    caption: Box<str>,
}

impl LaionParts {
    /// Opens the part files that `list` names and that belong to this rank, and indexes their
    /// lines. An error when the list names nothing or no usable line is found.
    pub fn open(list: &Path, spec: ShardSpec, image_size: usize, seed: u64) -> Result<Self> {
        let paths = read_file_list(list, "part files")?;
        Self::from_files(&paths, spec, image_size, seed)
            .with_context(|| format!("LAION file list {}", list.display()))
    }

    /// [`open`](Self::open) with the part files given directly, in order.
    pub fn from_files(
        paths: &[PathBuf],
        spec: ShardSpec,
        image_size: usize,
        seed: u64,
    ) -> Result<Self> {
        if paths.is_empty() {
            bail!("no part files given");
        }
        if paths.len() >= (1 << 24) {
            bail!(
                "{} part files are more than this reader supports (2^24)",
                paths.len()
            );
        }
        let split = spec.split(paths.len());
        let mut files = Vec::with_capacity(paths.len());
        let mut samples = Vec::new();
        let mut skipped = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let data = if spec.opens_file(i, paths.len()) {
                index_part(i as u32, path, &mut samples, &mut skipped)
            } else {
                None
            };
            files.push(PartFile {
                path: path.clone(),
                data,
            });
        }
        if split == Split::ByRecord {
            let mut j = 0usize;
            samples.retain(|_| {
                j += 1;
                spec.keeps_record(j - 1)
            });
        }
        if samples.is_empty() {
            bail!(
                "the part files of rank {} of {} hold no usable line; {}",
                spec.rank,
                spec.world,
                summarize_skips(&skipped)
            );
        }
        Ok(Self {
            files,
            samples,
            skipped,
            split,
            image_size,
            seed,
        })
    }

    /// Lines and part files skipped while indexing, each as `file:line: reason`.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// How the part files were divided among ranks.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Caption of sample `index`.
    pub fn caption(&self, index: usize) -> Option<&str> {
        self.samples.get(index).map(|s| &*s.caption)
    }

    /// `(part file, 1-based line)` of sample `index`.
    pub fn location(&self, index: usize) -> Option<(&Path, u64)> {
        self.samples
            .get(index)
            .map(|s| (self.files[s.file as usize].path.as_path(), s.line))
    }

    fn image_bytes(&self, sample: &LaionSample) -> Result<Vec<u8>> {
        let file = &self.files[sample.file as usize];
        let encoded = match &file.data {
            Some(data) => {
                let start = sample.image_offset as usize;
                data.get(start..start + sample.image_len)
                    .context("image column outside the decompressed part file")?
                    .to_vec()
            }
            None => read_range(&file.path, sample.image_offset, sample.image_len)?,
        };
        STANDARD_PAD_INDIFFERENT
            .decode(&encoded)
            .context("column 5 is not valid base64")
    }
}

/// Indexes one part file into `samples`; returns its decompressed data for gzip files.
fn index_part(
    file: u32,
    path: &Path,
    samples: &mut Vec<LaionSample>,
    skipped: &mut Vec<String>,
) -> Option<Vec<u8>> {
    let opened = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            skipped.push(format!("{}: cannot open part file: {e}", path.display()));
            return None;
        }
    };
    let gzip = path.extension().is_some_and(|e| e == "gz");
    if gzip {
        let mut data = Vec::new();
        if let Err(e) = flate2::read::MultiGzDecoder::new(opened).read_to_end(&mut data) {
            // Keep the complete lines decoded before the damage.
            let kept = data.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            let lines = data[..kept].iter().filter(|&&b| b == b'\n').count();
            skipped.push(format!(
                "{}:{}: corrupt gzip data ({e}); the rest of the file is skipped",
                path.display(),
                lines + 1
            ));
            data.truncate(kept);
        }
        index_lines(file, path, &data[..], samples, skipped);
        Some(data)
    } else {
        index_lines(file, path, BufReader::new(opened), samples, skipped);
        None
    }
}

fn index_lines(
    file: u32,
    path: &Path,
    mut reader: impl BufRead,
    samples: &mut Vec<LaionSample>,
    skipped: &mut Vec<String>,
) {
    let mut offset = 0u64;
    let mut line = Vec::new();
    for number in 1u64.. {
        line.clear();
        let n = match reader.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                skipped.push(format!(
                    "{}:{number}: read error ({e}); the rest of the file is skipped",
                    path.display()
                ));
                return;
            }
        };
        let start = offset;
        offset += n as u64;
        let mut content = &line[..];
        while let Some((&last, rest)) = content.split_last() {
            if last == b'\n' || last == b'\r' {
                content = rest;
            } else {
                break;
            }
        }
        match parse_line(content) {
            Ok((caption, image_start, image_len)) => samples.push(LaionSample {
                file,
                line: number,
                image_offset: start + image_start as u64,
                image_len,
                caption: caption.into(),
            }),
            Err(reason) => skipped.push(format!("{}:{number}: {reason}", path.display())),
        }
    }
}

/// The caption and the byte range of the image column of one line (without its newline).
fn parse_line(line: &[u8]) -> std::result::Result<(String, usize, usize), String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err("empty line".into());
    }
    let mut columns = Vec::with_capacity(MIN_COLUMNS);
    let mut start = 0;
    for (i, &b) in line.iter().enumerate() {
        if b == b'\t' {
            columns.push((start, i));
            start = i + 1;
            if columns.len() > IMAGE_COLUMN {
                break;
            }
        }
    }
    if columns.len() <= IMAGE_COLUMN {
        columns.push((start, line.len()));
    }
    if columns.len() < MIN_COLUMNS {
        return Err(format!(
            "expected at least {MIN_COLUMNS} tab-separated columns, found {}",
            columns.len()
        ));
    }
    let (js, je) = columns[JSON_COLUMN];
    let meta: serde_json::Value = serde_json::from_slice(&line[js..je])
        .map_err(|e| format!("column 2 is not valid JSON: {e}"))?;
    if !meta.is_object() {
        return Err("column 2 is not a JSON object".into());
    }
    let text = |key: &str| {
        meta.get(key)
            .and_then(|v| v.as_str())
            .filter(|s| !s.trim().is_empty())
    };
    let caption = text("caption_en")
        .or_else(|| text("blip_caption_en"))
        .ok_or("no caption: caption_en and blip_caption_en are absent or empty")?;
    let (is, ie) = columns[IMAGE_COLUMN];
    let (mut is, mut ie) = (is, ie);
    while is < ie && line[is].is_ascii_whitespace() {
        is += 1;
    }
    while ie > is && line[ie - 1].is_ascii_whitespace() {
        ie -= 1;
    }
    if is == ie {
        return Err("column 5 (the base64 image) is empty".into());
    }
    Ok((caption.to_string(), is, ie - is))
}

impl CaptionSource for LaionParts {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn load(&self, index: u64, epoch: u64) -> Result<Sample> {
        let Some(sample) = self.samples.get(index as usize) else {
            bail!("sample {index} is past the {} samples", self.samples.len());
        };
        let bytes = self.image_bytes(sample)?;
        let image = decode_image(&bytes)?;
        let (w, h) = (image.image.width(), image.image.height());
        if w < MIN_IMAGE_SIDE || h < MIN_IMAGE_SIDE {
            bail!("the image is {w}×{h} pixels, under {MIN_IMAGE_SIDE} on a side");
        }
        let key = (u64::from(sample.file) << 40) | sample.line;
        Ok(Sample {
            pixels: image.train_transform(self.image_size, self.seed, epoch, key),
            caption: sample.caption.to_string(),
        })
    }

    fn describe(&self, index: u64) -> String {
        match self.location(index as usize) {
            Some((path, line)) => format!("{}:{line}", path.display()),
            None => format!("LAION sample {index}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::loader::{Loader, LoaderPosition};
    use crate::data::sampler::DistributedSampler;
    use flate2::write::GzEncoder;
    use std::collections::BTreeSet;
    use std::io::Write;
    use std::sync::Arc;

    fn png(w: u32, h: u32, tint: u8) -> Vec<u8> {
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([tint, x as u8 * 3, y as u8 * 5])
        }))
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
        out
    }

    fn line(meta: serde_json::Value, image: &[u8]) -> String {
        format!(
            "id\t{meta}\turl\t0.3\t{}\n",
            base64::engine::general_purpose::STANDARD.encode(image)
        )
    }

    /// Writes `plain.tsv` and `packed.gz` (each with 4 usable lines among bad ones) and the list.
    /// Returns the list and the usable captions.
    fn write_parts(dir: &Path) -> (PathBuf, Vec<String>) {
        let mut captions = Vec::new();
        let mut text = String::new();
        for (i, name) in ["plain", "packed"].iter().enumerate() {
            text.clear();
            for k in 0..4 {
                let caption = format!("{name} caption {k}");
                // Alternate the caption key; "caption_en": "" falls back to blip.
                let meta = match k {
                    0 => serde_json::json!({"caption_en": caption}),
                    1 => serde_json::json!({"caption_en": "", "blip_caption_en": caption}),
                    _ => serde_json::json!({"blip_caption_en": caption, "other": 1}),
                };
                text.push_str(&line(meta, &png(8 + k, 7, i as u8 * 100)));
                captions.push(caption);
                if k == 1 {
                    // Line 3: corrupt line (two columns); line 4: bad base64; line 5: 3×3 image.
                    text.push_str("broken\tline\n");
                    text.push_str(
                        &line(serde_json::json!({"caption_en": "bad b64"}), b"x")
                            .replace("\teA==\n", "\t@@@not base64@@@\n"),
                    );
                    text.push_str(&line(
                        serde_json::json!({"caption_en": "tiny"}),
                        &png(3, 3, 0),
                    ));
                }
            }
            // Line 8: a JSON column that is not JSON; line 9: no caption at all.
            text.push_str("id\t{not json\turl\t0\tAAAA\n");
            text.push_str(&line(serde_json::json!({"caption_zh": "x"}), &png(6, 6, 0)));
            if i == 0 {
                std::fs::write(dir.join("plain.tsv"), &text).unwrap();
            } else {
                let mut gz = GzEncoder::new(
                    std::fs::File::create(dir.join("packed.gz")).unwrap(),
                    flate2::Compression::default(),
                );
                gz.write_all(text.as_bytes()).unwrap();
                gz.finish().unwrap();
            }
        }
        std::fs::create_dir_all(dir.join("lists")).unwrap();
        let list = dir.join("lists/filelist.txt");
        std::fs::write(&list, "../plain.tsv\n\n../packed.gz\n").unwrap();
        (list, captions)
    }

    #[test]
    fn bad_lines_and_images_are_skipped_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let (list, captions) = write_parts(dir.path());
        let set = LaionParts::open(&list, ShardSpec::single(), 16, 1).unwrap();
        let skipped = set.skipped().join("\n");
        for name in ["plain.tsv", "packed.gz"] {
            assert!(
                skipped.contains(&format!("{name}:3: expected at least 5")),
                "{skipped}"
            );
            assert!(
                skipped.contains(&format!("{name}:8: column 2 is not valid JSON")),
                "{skipped}"
            );
            assert!(
                skipped.contains(&format!("{name}:9: no caption")),
                "{skipped}"
            );
        }
        assert_eq!(set.skipped().len(), 6);
        // 6 lines per file pass indexing; the bad base64 and the 3×3 image fail to load.
        assert_eq!(set.len(), 12);
        let mut loaded = BTreeSet::new();
        let mut failed = Vec::new();
        for i in 0..set.len() as u64 {
            match set.load(i, 0) {
                Ok(s) => {
                    assert_eq!(s.pixels.len(), 3 * 16 * 16);
                    loaded.insert(s.caption);
                }
                Err(e) => failed.push(format!("{}: {e:#}", set.describe(i))),
            }
        }
        assert_eq!(loaded, captions.iter().cloned().collect());
        let failed = failed.join("\n");
        for name in ["plain.tsv", "packed.gz"] {
            assert!(
                failed.contains(&format!("{name}:4: column 5 is not valid base64")),
                "{failed}"
            );
            assert!(
                failed.contains(&format!("{name}:5: the image is 3×3 pixels")),
                "{failed}"
            );
        }
        // Through the loader the failures are counted in `Batch::skipped`.
        let n = set.len();
        let sampler = DistributedSampler::new(n, 0, n, 0, 1).unwrap();
        let mut loader = Loader::new(
            Arc::new(set),
            sampler,
            Arc::new(|c: &str| vec![c.len() as u32]),
            2,
            LoaderPosition::default(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let batch = loader.next_batch().unwrap();
        assert_eq!((batch.len, batch.skipped.len()), (8, 4));
    }

    #[test]
    fn ranks_cover_every_usable_sample_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let (list, captions) = write_parts(dir.path());
        let all: BTreeSet<String> = captions.into_iter().collect();
        // world 1 and 2 split by file, world 3 by line (fewer files than ranks).
        for world in 1..=3 {
            let mut seen = Vec::new();
            for rank in 0..world {
                let spec = ShardSpec::new(rank, world).unwrap();
                let set = LaionParts::open(&list, spec, 8, 0).unwrap();
                assert_eq!(
                    set.split(),
                    if world <= 2 {
                        Split::ByFile
                    } else {
                        Split::ByRecord
                    }
                );
                for i in 0..set.len() as u64 {
                    if let Ok(s) = set.load(i, 0) {
                        seen.push(s.caption);
                    }
                }
            }
            let unique: BTreeSet<String> = seen.iter().cloned().collect();
            assert_eq!(seen.len(), all.len(), "world {world}: {seen:?}");
            assert_eq!(unique, all, "world {world}");
        }
    }

    #[test]
    fn augmentation_does_not_depend_on_the_rank_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (list, _) = write_parts(dir.path());
        let one = LaionParts::open(&list, ShardSpec::single(), 8, 3).unwrap();
        let two = LaionParts::open(&list, ShardSpec::new(1, 2).unwrap(), 8, 3).unwrap();
        let caption = two.caption(0).unwrap().to_string();
        let i = (0..one.len())
            .find(|&i| one.caption(i) == Some(&caption))
            .unwrap();
        assert_eq!(
            one.load(i as u64, 4).unwrap().pixels,
            two.load(0, 4).unwrap().pixels
        );
    }

    #[test]
    fn empty_and_unreadable_sets_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.txt");
        std::fs::write(&list, "missing.gz\nbad.tsv\n").unwrap();
        std::fs::write(dir.path().join("bad.tsv"), "a\tb\n\n").unwrap();
        let err = format!(
            "{:#}",
            LaionParts::open(&list, ShardSpec::single(), 8, 0)
                .err()
                .unwrap()
        );
        assert!(err.contains("no usable line"), "{err}");
        assert!(err.contains("missing.gz: cannot open part file"), "{err}");
        assert!(err.contains("bad.tsv:1: expected at least 5"), "{err}");
        assert!(err.contains("bad.tsv:2: empty line"), "{err}");
        assert!(err.contains("list.txt"), "{err}");
    }

    #[test]
    fn truncated_gzip_keeps_the_lines_before_the_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for k in 0..50 {
            text.push_str(&line(
                serde_json::json!({"caption_en": format!("c{k}")}),
                &png(8, 8, k as u8),
            ));
        }
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        let bytes = gz.finish().unwrap();
        let path = dir.path().join("cut.gz");
        std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let set = LaionParts::from_files(&[path], ShardSpec::single(), 8, 0).unwrap();
        assert!(set.len() > 0 && set.len() < 50, "{}", set.len());
        assert_eq!(set.skipped().len(), 1);
        assert!(set.skipped()[0].contains("cut.gz:") && set.skipped()[0].contains("corrupt gzip"));
        for i in 0..set.len() as u64 {
            set.load(i, 0).unwrap();
        }
    }
}
