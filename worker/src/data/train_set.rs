//! What `--task_name` (with `--data_root`) names, opened as a training [`CaptionSource`].
//!
//! | `--task_name`                         | data set                                          |
//! |---------------------------------------|---------------------------------------------------|
//! | `coco_karpathy`                       | [`CocoCaptions::karpathy_train`] under `--data_root` |
//! | `FILE.json`                           | the same record format ([`CocoCaptions::open`]); images relative to `--data_root`, else to the file's folder |
//! | a pattern with `{..}` braces          | webdataset shards ([`expand_braces`]); each must end in `.tar` |
//! | a directory                           | the webdataset `.tar` shards in it               |
//! | `FILE.tar`                            | one webdataset shard                              |
//! | any other file                        | a file list: webdataset shards when every entry ends in `.tar`, else LAION part files ([`LaionParts`]) |
//!
//! (`synthetic`, the built-in demo set, is handled by the caller.) `~` is expanded in both
//! flags. Opening a set indexes it, then loads samples in order until one succeeds, so a data set
//! that yields nothing (every image missing or corrupt, ...) is an error at start rather than an
//! endless run of empty batches.

use super::coco_karpathy::{self, CocoCaptions};
use super::laion::LaionParts;
use super::loader::CaptionSource;
use super::parts::{expand_braces, read_file_list, summarize_skips, tar_files_in, ShardSpec};
use super::webdataset::WebDataset;
use crate::hub::env::expand_home;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The kind of data set a `--task_name` value names, with its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSpec {
    /// COCO Karpathy train under a data root.
    CocoKarpathy {
        /// The data root (`--data_root`, or the seed's default).
        root: PathBuf,
    },
    /// A Karpathy-format JSON file.
    CaptionJson {
        /// The annotation file.
        file: PathBuf,
        /// The folder image paths are relative to.
        image_root: PathBuf,
    },
    /// LAION part files named by a file list.
    Laion {
        /// The file list.
        list: PathBuf,
    },
    /// webdataset shards, in order.
    WebDataset {
        /// The shard files.
        shards: Vec<PathBuf>,
    },
}

/// A training set opened from `--task_name`.
pub struct TrainSet {
    /// The samples this rank reads.
    pub source: Arc<dyn CaptionSource>,
    /// Whether `source` already holds only this rank's share (sets split by file); such a
    /// source is sampled as a world of one, the others with the rank's slice of each global
    /// batch.
    pub per_rank: bool,
    /// Records skipped while indexing, each naming its file and line (or record / member).
    pub skipped: Vec<String>,
    /// One line saying what was opened, for the log.
    pub description: String,
}

/// Works out what `task_name` names (see the module documentation), without reading data.
pub fn classify(task_name: &str, data_root: Option<&Path>) -> Result<DataSpec> {
    if task_name == "coco_karpathy" {
        return Ok(DataSpec::CocoKarpathy {
            root: coco_karpathy::data_root(data_root),
        });
    }
    if task_name.contains('{') {
        let shards: Vec<PathBuf> = expand_braces(task_name)
            .with_context(|| format!("--task_name {task_name:?}"))?
            .iter()
            .map(|s| expand_home(s))
            .collect();
        if let Some(bad) = shards.iter().find(|p| !is_tar(p)) {
            bail!(
                "--task_name {task_name:?}: brace patterns name webdataset .tar shards, but it \
                 expands to {}",
                bad.display()
            );
        }
        return Ok(DataSpec::WebDataset { shards });
    }
    let path = expand_home(task_name);
    if !path.exists() {
        bail!(
            "--task_name {task_name:?}: not a built-in data set (synthetic, coco_karpathy) and \
             there is no file or folder {}",
            path.display()
        );
    }
    if path.is_dir() {
        let shards = tar_files_in(&path).with_context(|| {
            format!("--task_name {task_name:?}: a folder is read as webdataset shards")
        })?;
        return Ok(DataSpec::WebDataset { shards });
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => {
            let image_root = match data_root {
                Some(root) => expand_home(&root.to_string_lossy()),
                None => path
                    .parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
            };
            return Ok(DataSpec::CaptionJson {
                file: path,
                image_root,
            });
        }
        Some("tar") => return Ok(DataSpec::WebDataset { shards: vec![path] }),
        Some("gz" | "tgz") if task_name.ends_with(".tar.gz") || task_name.ends_with(".tgz") => {
            bail!(
                "--task_name {task_name:?}: compressed webdataset shards are not supported; \
                 decompress them to .tar"
            );
        }
        _ => {}
    }
    let entries = read_file_list(&path, "part files or shards")
        .with_context(|| format!("--task_name {task_name:?} (a file list)"))?;
    let tars = entries.iter().filter(|p| is_tar(p)).count();
    if tars == entries.len() {
        Ok(DataSpec::WebDataset { shards: entries })
    } else if tars == 0 {
        Ok(DataSpec::Laion { list: path })
    } else {
        bail!(
            "--task_name {task_name:?}: the file list mixes {tars} .tar shards with {} other \
             files; list either webdataset shards or LAION part files",
            entries.len() - tars
        )
    }
}

fn is_tar(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "tar")
}

/// Opens the data set `task_name` names for rank `spec`, with the train transform at
/// `image_size` keyed by `seed`. Errors name the flag and the file at fault; a set that yields
/// no sample is an error.
pub fn open_train_set(
    task_name: &str,
    data_root: Option<&Path>,
    image_size: usize,
    seed: u64,
    spec: ShardSpec,
) -> Result<TrainSet> {
    let data = classify(task_name, data_root)?;
    if let (Some(root), DataSpec::Laion { .. } | DataSpec::WebDataset { .. }) = (data_root, &data) {
        tracing::warn!(
            "--data_root {} is not used: LAION part files and webdataset shards are found from \
             --task_name (relative paths in a file list are relative to the list's folder)",
            root.display()
        );
    }
    let context = || format!("--task_name {task_name:?}");
    let (source, per_rank, skipped, description): (
        Arc<dyn CaptionSource>,
        bool,
        Vec<String>,
        String,
    ) = match &data {
        DataSpec::CocoKarpathy { root } => {
            let set = CocoCaptions::karpathy_train(root, image_size, seed)?;
            let description = format!(
                "COCO Karpathy train from {} (images in {})",
                root.display(),
                set.image_root().display()
            );
            let skipped = set.skipped().to_vec();
            (Arc::new(set), false, skipped, description)
        }
        DataSpec::CaptionJson { file, image_root } => {
            let set =
                CocoCaptions::open(file, image_root, image_size, seed).with_context(context)?;
            let description = format!(
                "captions from {} (images in {})",
                file.display(),
                image_root.display()
            );
            let skipped = set.skipped().to_vec();
            (Arc::new(set), false, skipped, description)
        }
        DataSpec::Laion { list } => {
            let set = LaionParts::open(list, spec, image_size, seed).with_context(context)?;
            let description = format!(
                "LAION part files listed in {} (split {:?})",
                list.display(),
                set.split()
            );
            let skipped = set.skipped().to_vec();
            (Arc::new(set), true, skipped, description)
        }
        DataSpec::WebDataset { shards } => {
            let set = WebDataset::open(shards, spec, image_size, seed).with_context(context)?;
            let description = format!(
                "{} webdataset shard(s) from {} (split {:?})",
                shards.len(),
                shards[0].display(),
                set.split()
            );
            let skipped = set.skipped().to_vec();
            (Arc::new(set), true, skipped, description)
        }
    };
    ensure_yields(source.as_ref(), &skipped).with_context(context)?;
    let description = format!("{description}: {} samples", source.len());
    Ok(TrainSet {
        source,
        per_rank,
        skipped,
        description,
    })
}

/// Loads samples of `source` in order until one succeeds; an error listing what failed (after
/// the `skipped_at_open` reports) when none does. Usually costs one image decode.
pub fn ensure_yields(source: &dyn CaptionSource, skipped_at_open: &[String]) -> Result<()> {
    let mut failures = skipped_at_open.to_vec();
    for index in 0..source.len() as u64 {
        match source.load(index, 0) {
            Ok(sample) if !sample.caption.trim().is_empty() => return Ok(()),
            Ok(_) => failures.push(format!("{}: empty caption", source.describe(index))),
            Err(e) => failures.push(format!("{}: {e:#}", source.describe(index))),
        }
    }
    bail!(
        "the data set yields no usable sample; {}",
        summarize_skips(&failures)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::loader::Sample;

    #[test]
    fn task_names_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let name = |p: &Path| p.to_str().unwrap().to_string();
        assert_eq!(
            classify("coco_karpathy", Some(Path::new("/data/coco"))).unwrap(),
            DataSpec::CocoKarpathy {
                root: PathBuf::from("/data/coco")
            }
        );
        std::fs::write(d.join("c.json"), "[]").unwrap();
        assert_eq!(
            classify(&name(&d.join("c.json")), None).unwrap(),
            DataSpec::CaptionJson {
                file: d.join("c.json"),
                image_root: d.to_path_buf()
            }
        );
        assert_eq!(
            classify(&format!("{}/s-{{0..1}}.tar", d.display()), None).unwrap(),
            DataSpec::WebDataset {
                shards: vec![d.join("s-0.tar"), d.join("s-1.tar")]
            }
        );
        assert!(classify(&format!("{}/s-{{0..1}}.gz", d.display()), None).is_err());
        std::fs::write(d.join("list"), "a.tar\nb.tar\n").unwrap();
        assert_eq!(
            classify(&name(&d.join("list")), None).unwrap(),
            DataSpec::WebDataset {
                shards: vec![d.join("a.tar"), d.join("b.tar")]
            }
        );
        std::fs::write(d.join("list"), "a.gz\nb.tsv\n").unwrap();
        assert_eq!(
            classify(&name(&d.join("list")), None).unwrap(),
            DataSpec::Laion {
                list: d.join("list")
            }
        );
        std::fs::write(d.join("list"), "a.gz\nb.tar\n").unwrap();
        assert!(
            format!("{:#}", classify(&name(&d.join("list")), None).unwrap_err()).contains("mixes")
        );
        // A folder is read as shards; one without any is an error.
        assert!(classify(&name(d), None).is_err());
        std::fs::write(d.join("z.tar"), "").unwrap();
        assert_eq!(
            classify(&name(d), None).unwrap(),
            DataSpec::WebDataset {
                shards: vec![d.join("z.tar")]
            }
        );
        let err = format!("{:#}", classify("nope", None).unwrap_err());
        assert!(err.contains("not a built-in data set"), "{err}");
    }

    struct Broken;

    impl CaptionSource for Broken {
        fn len(&self) -> usize {
            3
        }
        fn load(&self, index: u64, _epoch: u64) -> Result<Sample> {
            if index == 2 {
                return Ok(Sample {
                    pixels: vec![],
                    caption: " ".into(),
                });
            }
            bail!("corrupt image")
        }
        fn describe(&self, index: u64) -> String {
            format!("f.tsv:{}", index + 1)
        }
    }

    #[test]
    fn a_set_that_yields_nothing_is_an_error() {
        let err = format!(
            "{:#}",
            ensure_yields(&Broken, &["x.tsv:9: bad".into()]).unwrap_err()
        );
        for needle in [
            "yields no usable sample",
            "4 skipped",
            "x.tsv:9: bad",
            "f.tsv:1: corrupt image",
            "f.tsv:3: empty caption",
        ] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
