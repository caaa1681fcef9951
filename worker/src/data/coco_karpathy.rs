//! COCO captions in Karpathy's training split (the seed's default `--task_name coco_karpathy`),
//! and any data set whose annotations use the same record format (`--task_name FILE.json`).
//!
//! The annotation file is one JSON array of records
//! `{"caption": "...", "image": "val2014/COCO_val2014_000000391895.jpg", "image_id": ...}`,
//! one record per (image, caption) pair; `image` is relative to an image folder and `image_id`
//! is not needed for training. The seed's layout, under `--data_root` (default
//! `~/.paddlemix/datasets/coco`), is
//!
//! ```text
//! <root>/annotations/coco_karpathy_train.json
//! <root>/images/<image>            e.g. <root>/images/val2014/COCO_val2014_000000391895.jpg
//! ```
//!
//! (what the seed's `coco.tar` unpacks to); when `<root>/images` is not a folder, image paths
//! are taken relative to `<root>` itself. A custom JSON file's images are relative to
//! `--data_root` when it is given, else to the JSON file's folder.
//!
//! As the seed does, `pretrain` downloads and extracts `coco.tar` first when the annotations or
//! the images are missing (see `hub::coco`); offline, or under a `--data_root` that is not
//! named `coco`, a missing annotation file is an error saying which files to put where.
//!
//! Records that are not objects, lack a string `caption` or `image`, or have an empty caption
//! are skipped when the file is opened and listed in [`CocoCaptions::skipped`]; a missing or
//! corrupt image is skipped when its sample is loaded (the loader reports it with
//! [`CaptionSource::describe`], which names the annotation file, the record and the image).
//! Augmentation is keyed by `(seed, epoch, record number)`.

use super::loader::{CaptionSource, Sample};
use super::parts::summarize_skips;
use super::preprocess::open_image;
use crate::hub::coco::{IMAGES_DIR, SEED_ARCHIVE, TRAIN_ANNOTATIONS};
use crate::hub::env::expand_home;
use crate::hub::HubEnv;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A captioning set read from a Karpathy-format annotation file.
pub struct CocoCaptions {
    annotations: PathBuf,
    image_root: PathBuf,
    records: Vec<Record>,
    skipped: Vec<String>,
    image_size: usize,
    seed: u64,
}

struct Record {
    /// Position in the JSON array (also the augmentation key).
    number: usize,
    image: String,
    caption: String,
}

/// `--data_root`, or the seed's default (`coco` in PaddleMIX's `DATA_HOME`,
/// `$PPMIX_HOME/datasets`), with `~` expanded.
pub fn data_root(flag: Option<&Path>) -> PathBuf {
    match flag {
        Some(p) => expand_home(&p.to_string_lossy()),
        None => HubEnv::from_env().paddlemix_data_home().join("coco"),
    }
}

impl CocoCaptions {
    /// `--task_name coco_karpathy`: `<root>/annotations/coco_karpathy_train.json` with images
    /// under `<root>/images` (or `<root>` when there is no `images` folder). A missing
    /// annotation file is an error that says where the seed's files go (`hub::coco` downloads
    /// them first where it can).
    pub fn karpathy_train(root: &Path, image_size: usize, seed: u64) -> Result<Self> {
        let annotations = root.join(TRAIN_ANNOTATIONS);
        if !annotations.is_file() {
            bail!(
                "--task_name coco_karpathy: the annotation file {} is missing (the seed's \
                 {SEED_ARCHIVE} unpacks there). Put the data under --data_root (now {}): \
                 the annotations as {} and the images they name under {} (e.g. {}), or pass \
                 --data_root with the folder that holds them",
                annotations.display(),
                root.display(),
                annotations.display(),
                root.join(IMAGES_DIR).display(),
                root.join(IMAGES_DIR)
                    .join("val2014/COCO_val2014_000000391895.jpg")
                    .display(),
            );
        }
        let images = root.join(IMAGES_DIR);
        let image_root = if images.is_dir() {
            images
        } else {
            root.to_path_buf()
        };
        Self::open(&annotations, &image_root, image_size, seed)
    }

    /// Reads `annotations` (a JSON array of `{caption, image, image_id}` records) with image
    /// paths relative to `image_root`. Unusable records are skipped and listed in
    /// [`skipped`](Self::skipped); a file that is not a JSON array, or in which no record is
    /// usable, is an error.
    pub fn open(
        annotations: &Path,
        image_root: &Path,
        image_size: usize,
        seed: u64,
    ) -> Result<Self> {
        let bytes = std::fs::read(annotations)
            .with_context(|| format!("reading annotations {}", annotations.display()))?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not valid JSON", annotations.display()))?;
        let serde_json::Value::Array(items) = value else {
            bail!(
                "{}: expected a JSON array of {{\"caption\", \"image\", \"image_id\"}} records",
                annotations.display()
            );
        };
        let mut records = Vec::with_capacity(items.len());
        let mut skipped = Vec::new();
        for (number, item) in items.into_iter().enumerate() {
            let at = format!("{}[{number}]", annotations.display());
            match parse_record(item) {
                Ok((image, caption)) => records.push(Record {
                    number,
                    image,
                    caption,
                }),
                Err(reason) => skipped.push(format!("{at}: {reason}")),
            }
        }
        if records.is_empty() {
            bail!(
                "{} holds no usable caption record; {}",
                annotations.display(),
                summarize_skips(&skipped)
            );
        }
        Ok(Self {
            annotations: annotations.to_path_buf(),
            image_root: image_root.to_path_buf(),
            records,
            skipped,
            image_size,
            seed,
        })
    }

    /// Records skipped when the file was read, each as `file[record]: reason`.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The folder image paths are relative to.
    pub fn image_root(&self) -> &Path {
        &self.image_root
    }

    /// The image file of sample `index`.
    pub fn image_path(&self, index: usize) -> Option<PathBuf> {
        self.records
            .get(index)
            .map(|r| self.image_root.join(&r.image))
    }

    /// The caption of sample `index`.
    pub fn caption(&self, index: usize) -> Option<&str> {
        self.records.get(index).map(|r| r.caption.as_str())
    }
}

fn parse_record(item: serde_json::Value) -> std::result::Result<(String, String), String> {
    let serde_json::Value::Object(mut fields) = item else {
        return Err("not a JSON object".into());
    };
    let image = match fields.remove("image") {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s,
        Some(serde_json::Value::String(_)) => return Err("empty \"image\"".into()),
        Some(_) => return Err("\"image\" is not a string".into()),
        None => return Err("no \"image\" field".into()),
    };
    let caption = match fields.remove("caption") {
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(format!("image {image}: \"caption\" is not a string")),
        None => return Err(format!("image {image}: no \"caption\" field")),
    };
    if caption.trim().is_empty() {
        return Err(format!("image {image}: empty caption"));
    }
    Ok((image, caption))
}

impl CaptionSource for CocoCaptions {
    fn len(&self) -> usize {
        self.records.len()
    }

    fn load(&self, index: u64, epoch: u64) -> Result<Sample> {
        let Some(record) = self.records.get(index as usize) else {
            bail!("sample {index} is past the {} samples", self.records.len());
        };
        let image = open_image(&self.image_root.join(&record.image))?;
        Ok(Sample {
            pixels: image.train_transform(self.image_size, self.seed, epoch, record.number as u64),
            caption: record.caption.clone(),
        })
    }

    fn describe(&self, index: u64) -> String {
        match self.records.get(index as usize) {
            Some(r) => format!(
                "{}[{}] (image {})",
                self.annotations.display(),
                r.number,
                r.image
            ),
            None => format!("{} sample {index}", self.annotations.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::loader::{Loader, LoaderPosition};
    use crate::data::sampler::DistributedSampler;
    use crate::data::tokenizer::ClipTokenizer;
    use std::sync::Arc;

    fn write_png(path: &Path, w: u32, h: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 * 9, y as u8 * 7, 80]))
            .save(path)
            .unwrap();
    }

    /// Root with the seed's layout: 4 good records, one missing image, one empty caption, one
    /// record without a caption field.
    fn karpathy_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for i in 0..4 {
            write_png(
                &root.join(format!("images/train2014/img{i}.png")),
                20 + i,
                16,
            );
        }
        let records = serde_json::json!([
            {"caption": "a red bus on a street", "image": "train2014/img0.png", "image_id": "coco_0"},
            {"caption": "two dogs playing", "image": "train2014/img1.png", "image_id": "coco_1"},
            {"caption": "a photo of nothing", "image": "train2014/missing.png", "image_id": 9},
            {"caption": "   ", "image": "train2014/img2.png", "image_id": "coco_2"},
            {"caption": "a cat on a sofa", "image": "train2014/img2.png", "image_id": "coco_2"},
            {"image": "train2014/img3.png", "image_id": "coco_3"},
            {"caption": "a kite in the sky", "image": "train2014/img3.png", "image_id": "coco_3"},
        ]);
        std::fs::create_dir_all(root.join("annotations")).unwrap();
        std::fs::write(
            root.join(TRAIN_ANNOTATIONS),
            serde_json::to_vec(&records).unwrap(),
        )
        .unwrap();
        dir
    }

    #[test]
    fn bad_records_are_skipped_and_the_rest_load_with_their_tokens() {
        let dir = karpathy_root();
        let set = CocoCaptions::karpathy_train(dir.path(), 16, 5).unwrap();
        assert_eq!(set.image_root(), dir.path().join("images"));
        // The empty caption and the record without one are skipped at open, with file and index.
        assert_eq!(set.skipped().len(), 2, "{:?}", set.skipped());
        assert!(set.skipped()[0].contains("coco_karpathy_train.json[3]"));
        assert!(set.skipped()[0].contains("empty caption"));
        assert!(set.skipped()[1].contains("[5]") && set.skipped()[1].contains("no \"caption\""));
        assert_eq!(set.len(), 5);
        // The missing image is skipped when loaded; the loader names the record and the file.
        let tokenizer = Arc::new(ClipTokenizer::new().unwrap());
        let tok = tokenizer.clone();
        let sampler = DistributedSampler::new(set.len(), 0, 5, 0, 1).unwrap();
        let mut loader = Loader::new(
            Arc::new(set),
            sampler,
            Arc::new(move |c: &str| tok.tokenize(c, 12)),
            2,
            LoaderPosition::default(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let batch = loader.next_batch().unwrap();
        assert_eq!(batch.len, 4);
        assert_eq!(batch.skipped.len(), 1, "{:?}", batch.skipped);
        let reason = &batch.skipped[0];
        assert!(
            reason.contains("coco_karpathy_train.json[2]") && reason.contains("missing.png"),
            "{reason}"
        );
        let inputs = batch.tensors.unwrap();
        assert_eq!(inputs.images.dims(), &[4, 3 * 16 * 16]);
        let mut got: Vec<Vec<u32>> = inputs.tokens.to_vec2::<u32>().unwrap();
        let mut want: Vec<Vec<u32>> = [
            "a red bus on a street",
            "two dogs playing",
            "a cat on a sofa",
            "a kite in the sky",
        ]
        .iter()
        .map(|c| tokenizer.tokenize(c, 12))
        .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn pixels_follow_the_train_transform_keyed_by_record_number() {
        let dir = karpathy_root();
        let set = CocoCaptions::karpathy_train(dir.path(), 16, 5).unwrap();
        // Sample 3 is record 4 (img2.png, "a cat on a sofa").
        assert_eq!(set.caption(3), Some("a cat on a sofa"));
        let sample = set.load(3, 2).unwrap();
        let img = open_image(&set.image_path(3).unwrap()).unwrap();
        assert_eq!(sample.pixels, img.train_transform(16, 5, 2, 4));
        assert_eq!(sample.caption, "a cat on a sofa");
    }

    #[test]
    fn missing_annotations_say_where_the_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let err = CocoCaptions::karpathy_train(dir.path(), 16, 0)
            .err()
            .unwrap()
            .to_string();
        for needle in [
            "annotations/coco_karpathy_train.json",
            "coco.tar",
            "--data_root",
            "images",
        ] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn unusable_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.json");
        std::fs::write(&file, "{\"caption\": 1").unwrap();
        let err = format!(
            "{:#}",
            CocoCaptions::open(&file, dir.path(), 8, 0).err().unwrap()
        );
        assert!(
            err.contains("a.json") && err.contains("not valid JSON"),
            "{err}"
        );
        std::fs::write(&file, "{}").unwrap();
        assert!(CocoCaptions::open(&file, dir.path(), 8, 0).is_err());
        std::fs::write(&file, r#"[{"caption": "", "image": "x.png"}, 3]"#).unwrap();
        let err = format!(
            "{:#}",
            CocoCaptions::open(&file, dir.path(), 8, 0).err().unwrap()
        );
        assert!(
            err.contains("no usable") && err.contains("2 skipped"),
            "{err}"
        );
        assert!(err.contains("a.json[1]: not a JSON object"), "{err}");
    }

    #[test]
    fn data_root_expands_home() {
        let Ok(home) = std::env::var("HOME") else {
            return;
        };
        assert_eq!(
            data_root(None),
            PathBuf::from(&home).join(".paddlemix/datasets/coco")
        );
        assert_eq!(data_root(Some(Path::new("/x"))), PathBuf::from("/x"));
    }
}
