//! `--task_name coco_karpathy` as the seed has it: when the annotations or the images are
//! missing under the data root, PaddleMIX's `coco.tar` is downloaded into the root's parent
//! (PaddleMIX's `DATA_HOME`, `$PPMIX_HOME/datasets`, for the default root) and extracted there,
//! with the downloader's rules (resume, retries, MD5 as PaddleMIX publishes it, one rank per
//! node, offline mode).

use super::checksum::Checksum;
use super::extract::extract_tar;
use super::{Expected, Hub};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The training annotations, relative to the data root.
pub const TRAIN_ANNOTATIONS: &str = "annotations/coco_karpathy_train.json";
/// The image folder, relative to the data root, in the seed's layout.
pub const IMAGES_DIR: &str = "images";
/// The archive the seed downloads when the annotations are absent.
pub const SEED_ARCHIVE: &str = "coco.tar";

/// The MD5 of `coco.tar` that PaddleMIX checks (its `coco_clip.py`).
pub const SEED_ARCHIVE_MD5: &str = "e670ce82b14b3f45d08c9370808ee1e7";
/// The folder name the archive unpacks to and a downloadable data root must have.
pub const TOP: &str = "coco";

/// Where the archive comes from.
#[derive(Debug, Clone)]
pub struct Archive {
    /// Its URL.
    pub url: String,
    /// Its MD5, when known.
    pub md5: Option<String>,
}

impl Archive {
    /// The seed's `coco.tar` on PaddleMIX's host (or the mirror `COCA_PADDLEMIX_DATA_URL`).
    pub fn seed(hub: &Hub) -> Self {
        Self {
            url: format!("{}/{SEED_ARCHIVE}", hub.env.paddlemix_data_url),
            md5: Some(SEED_ARCHIVE_MD5.to_string()),
        }
    }
}

/// What the set needs under `root` and does not find.
pub fn missing(root: &Path) -> Vec<PathBuf> {
    let annotations = root.join(TRAIN_ANNOTATIONS);
    let images = root.join(IMAGES_DIR);
    let mut out = Vec::new();
    if !annotations.is_file() {
        out.push(annotations);
    }
    if !images.is_dir() {
        out.push(images);
    }
    out
}

/// Downloads and extracts `archive` when the set is incomplete under `root`. Only a root named
/// `coco` is filled (the archive unpacks to `coco/`); another is an error naming what is
/// missing.
pub fn ensure_karpathy(root: &Path, hub: &Hub, archive: &Archive) -> Result<()> {
    // Every rank goes through the gate, complete or not, so that none waits for a word its
    // node's downloader never sends.
    hub.gate.once(&archive.url, |may_download| {
        fetch_if_missing(root, hub, archive, may_download)
    })
}

fn fetch_if_missing(root: &Path, hub: &Hub, archive: &Archive, may_download: bool) -> Result<()> {
    let absent = missing(root);
    if absent.is_empty() {
        return Ok(());
    }
    let list = absent
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" and ");
    let parent = match (root.file_name(), root.parent()) {
        (Some(name), Some(parent)) if name == TOP => parent.to_path_buf(),
        _ => bail!(
            "--task_name coco_karpathy: {list} missing. The seed's {SEED_ARCHIVE} unpacks to a \
             folder named {TOP}; --data_root {} is not one, so nothing is downloaded: put the \
             files there, or leave --data_root out to use PaddleMIX's data folder",
            root.display()
        ),
    };
    tracing::info!("coco_karpathy: {list} missing; fetching {}", archive.url);
    let tar = parent.join(SEED_ARCHIVE);
    let expected = Expected {
        size: None,
        checksum: archive.md5.clone().map(Checksum::Md5),
    };
    hub.downloader(may_download)
        .fetch(&archive.url, &tar, &expected)
        .with_context(|| format!("--task_name coco_karpathy: {list} missing"))?;
    extract_tar(&tar, &parent, TOP)?;
    let still = missing(root);
    if !still.is_empty() {
        bail!(
            "{} did not provide {}",
            archive.url,
            still
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        );
    }
    std::fs::remove_file(&tar).with_context(|| format!("cannot remove {}", tar.display()))?;
    tracing::info!("coco_karpathy: extracted into {}", root.display());
    Ok(())
}
