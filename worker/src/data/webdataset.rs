//! webdataset `.tar` shards: `--task_name` a brace pattern (`shards-{000..009}.tar`), a
//! directory of `.tar` files (sorted by name), a single `.tar`, or a file list naming `.tar`
//! files one per line.
//!
//! A sample is the group of members that share a key, webdataset's way: the key is the member
//! path up to the first `.` of its file name and the extension is the rest (`dir/000123.jpg` is
//! key `dir/000123`, extension `jpg`). A sample needs one image (`jpg`, `jpeg`, `png`, `webp`,
//! `bmp` or `gif`) and a caption: a `txt` member (UTF-8, trimmed), or else a `json` member with a
//! string `caption` field. Other members (`cls`, `__key__`, ...) are ignored.
//!
//! # Indexing
//!
//! A rank's shards are indexed when the source is opened (members are walked with seeks, so
//! image data is not read): each sample keeps its caption and where its image lies in the shard,
//! and the image is read back when the sample is loaded. That makes the shards a map-style
//! [`CaptionSource`] for the shuffling sampler and the multi-threaded loader. Which shards (or
//! samples) a rank indexes follows [`super::parts`]: shard `i` goes to rank `i % world`, or, with
//! fewer shards than ranks, usable sample `j` to rank `j % world`. Compressed shards
//! (`.tar.gz`) are not read: decompress them first.
//!
//! # Bad input
//!
//! A key with an image but no caption, a caption but no image, an empty caption, a `json`
//! caption that does not parse, a shard that cannot be opened and a damaged tar (the samples
//! before the damage are kept) are skipped when indexing and listed in [`WebDataset::skipped`]
//! as `shard:member: reason`. An image that does not decode is found when the sample is loaded
//! and reported by the loader with [`CaptionSource::describe`] (`shard:member`). Augmentation is
//! keyed by `(seed, epoch, shard number << 40 | sample number within the shard)`.

use super::loader::{CaptionSource, Sample};
use super::parts::{read_range, summarize_skips, ShardSpec, Split};
use super::preprocess::decode_image;
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Member extensions taken as the sample's image, in order of preference.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "webp", "bmp", "gif"];
/// Caption members larger than this are skipped rather than read.
const MAX_CAPTION_BYTES: u64 = 1 << 20;

/// This rank's share of a set of webdataset shards, indexed (see the module docs).
pub struct WebDataset {
    shards: Vec<PathBuf>,
    samples: Vec<WdsSample>,
    skipped: Vec<String>,
    split: Split,
    image_size: usize,
    seed: u64,
}

struct WdsSample {
    shard: u32,
    /// Position of the sample within its shard (augmentation key).
    number: u64,
    /// The image member's name.
    member: Box<str>,
    offset: u64,
    len: u64,
    caption: Box<str>,
}

/// Members of one key, as found in the shard.
#[derive(Default)]
struct Group {
    key: String,
    /// `(extension, member name, data offset, size)` of every image member.
    images: Vec<(String, String, u64, u64)>,
    txt: Option<(String, Result<String, String>)>,
    json: Option<(String, Result<String, String>)>,
}

impl WebDataset {
    /// Indexes the shards of `shards` (in order) that belong to this rank. An error when no
    /// shard is given or no usable sample is found.
    pub fn open(shards: &[PathBuf], spec: ShardSpec, image_size: usize, seed: u64) -> Result<Self> {
        if shards.is_empty() {
            bail!("no webdataset shards given");
        }
        if shards.len() >= (1 << 24) {
            bail!(
                "{} shards are more than this reader supports (2^24)",
                shards.len()
            );
        }
        let split = spec.split(shards.len());
        let mut samples = Vec::new();
        let mut skipped = Vec::new();
        for (i, path) in shards.iter().enumerate() {
            if spec.opens_file(i, shards.len()) {
                index_shard(i as u32, path, &mut samples, &mut skipped);
            }
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
                "the webdataset shards of rank {} of {} ({} first) hold no usable sample; {}",
                spec.rank,
                spec.world,
                shards[0].display(),
                summarize_skips(&skipped)
            );
        }
        Ok(Self {
            shards: shards.to_vec(),
            samples,
            skipped,
            split,
            image_size,
            seed,
        })
    }

    /// Samples, members and shards skipped while indexing, each as `shard:member: reason`.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// How the shards were divided among ranks.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Caption of sample `index`.
    pub fn caption(&self, index: usize) -> Option<&str> {
        self.samples.get(index).map(|s| &*s.caption)
    }

    /// `(shard, image member)` of sample `index`.
    pub fn location(&self, index: usize) -> Option<(&Path, &str)> {
        self.samples
            .get(index)
            .map(|s| (self.shards[s.shard as usize].as_path(), &*s.member))
    }
}

/// webdataset's key/extension split: up to the first `.` of the file name, and the rest.
fn split_key(member: &str) -> Option<(&str, &str)> {
    let name_start = member.rfind('/').map_or(0, |p| p + 1);
    let dot = member[name_start..].find('.')? + name_start;
    let (key, ext) = (&member[..dot], &member[dot + 1..]);
    (dot > name_start && !ext.is_empty()).then_some((key, ext))
}

fn read_caption(entry: &mut impl Read, size: u64, json: bool) -> Result<String, String> {
    if size > MAX_CAPTION_BYTES {
        return Err(format!("caption member of {size} bytes is too large"));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| format!("read error: {e}"))?;
    let caption = if json {
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("not valid JSON: {e}"))?;
        match value.get("caption") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => return Err("\"caption\" is not a string".into()),
            None => return Err("no \"caption\" field".into()),
        }
    } else {
        String::from_utf8(bytes).map_err(|_| "caption is not UTF-8 text".to_string())?
    };
    let caption = caption.trim();
    if caption.is_empty() {
        return Err("empty caption".into());
    }
    Ok(caption.to_string())
}

fn index_shard(shard: u32, path: &Path, samples: &mut Vec<WdsSample>, skipped: &mut Vec<String>) {
    let shown = path.display();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            skipped.push(format!("{shown}: cannot open shard: {e}"));
            return;
        }
    };
    let mut archive = tar::Archive::new(file);
    let entries = match archive.entries_with_seek() {
        Ok(e) => e,
        Err(e) => {
            skipped.push(format!("{shown}: not a readable tar file: {e}"));
            return;
        }
    };
    let mut groups: Vec<Group> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut last_member = String::from("(start)");
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                skipped.push(format!(
                    "{shown}: damaged tar after member {last_member}: {e}; the rest of the shard is skipped"
                ));
                break;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => {
                skipped.push(format!(
                    "{shown}: member after {last_member} has a bad name: {e}"
                ));
                continue;
            }
        };
        last_member = member.clone();
        let Some((key, ext)) = split_key(&member) else {
            continue;
        };
        let ext = ext.to_ascii_lowercase();
        let g = *by_key.entry(key.to_string()).or_insert_with(|| {
            groups.push(Group {
                key: key.to_string(),
                ..Group::default()
            });
            groups.len() - 1
        });
        let group = &mut groups[g];
        let size = entry.size();
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            group
                .images
                .push((ext, member, entry.raw_file_position(), size));
        } else if ext == "txt" && group.txt.is_none() {
            group.txt = Some((member, read_caption(&mut entry, size, false)));
        } else if ext == "json" && group.json.is_none() {
            group.json = Some((member, read_caption(&mut entry, size, true)));
        }
    }
    for (number, group) in groups.into_iter().enumerate() {
        let image = IMAGE_EXTENSIONS
            .iter()
            .find_map(|want| group.images.iter().find(|(ext, ..)| ext == want));
        // A txt caption wins; a json one is used when there is no txt.
        let caption = group.txt.as_ref().or(group.json.as_ref());
        match (image, caption) {
            (Some((_, member, offset, len)), Some((_, Ok(caption)))) => samples.push(WdsSample {
                shard,
                number: number as u64,
                member: member.as_str().into(),
                offset: *offset,
                len: *len,
                caption: caption.as_str().into(),
            }),
            (Some(_), Some((caption_member, Err(reason)))) => {
                skipped.push(format!("{shown}:{caption_member}: {reason}"));
            }
            (Some((_, member, ..)), None) => skipped.push(format!(
                "{shown}:{member}: no caption ({}.txt or {}.json)",
                group.key, group.key
            )),
            (None, Some((caption_member, _))) => {
                skipped.push(format!(
                    "{shown}:{caption_member}: no image for key {}",
                    group.key
                ));
            }
            (None, None) => {}
        }
    }
}

impl CaptionSource for WebDataset {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn load(&self, index: u64, epoch: u64) -> Result<Sample> {
        let Some(sample) = self.samples.get(index as usize) else {
            bail!("sample {index} is past the {} samples", self.samples.len());
        };
        let bytes = read_range(
            &self.shards[sample.shard as usize],
            sample.offset,
            usize::try_from(sample.len)?,
        )?;
        let image = decode_image(&bytes)?;
        let key = (u64::from(sample.shard) << 40) | sample.number;
        Ok(Sample {
            pixels: image.train_transform(self.image_size, self.seed, epoch, key),
            caption: sample.caption.to_string(),
        })
    }

    fn describe(&self, index: u64) -> String {
        match self.location(index as usize) {
            Some((shard, member)) => format!("{}:{member}", shard.display()),
            None => format!("webdataset sample {index}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::parts::expand_braces;
    use std::collections::BTreeSet;

    fn encoded(w: u32, h: u32, format: image::ImageFormat) -> Vec<u8> {
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([x as u8 * 11, y as u8 * 13, 90])
        }))
        .write_to(&mut std::io::Cursor::new(&mut out), format)
        .unwrap();
        out
    }

    fn write_tar(path: &Path, members: &[(&str, Vec<u8>)]) {
        let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
        for (name, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, &data[..]).unwrap();
        }
        builder.finish().unwrap();
    }

    /// Shard `i` of a set: a jpg+txt pair, a png+json pair, and (in shard 0) an orphan image, a
    /// caption without an image, a json without a caption, and an undecodable image.
    fn write_shards(dir: &Path, count: usize) -> Vec<String> {
        let mut captions = Vec::new();
        for i in 0..count {
            let mut members = vec![
                (
                    format!("{i}/000.jpg"),
                    encoded(12, 10, image::ImageFormat::Jpeg),
                ),
                (
                    format!("{i}/000.txt"),
                    format!(" jpeg sample {i}\n").into_bytes(),
                ),
                (
                    format!("{i}/001.png"),
                    encoded(9, 14, image::ImageFormat::Png),
                ),
                (
                    format!("{i}/001.json"),
                    serde_json::to_vec(
                        &serde_json::json!({"caption": format!("png sample {i}"), "w": 9}),
                    )
                    .unwrap(),
                ),
                (format!("{i}/001.cls"), b"3".to_vec()),
            ];
            captions.push(format!("jpeg sample {i}"));
            captions.push(format!("png sample {i}"));
            if i == 0 {
                members.push(("0/002.png".into(), encoded(8, 8, image::ImageFormat::Png)));
                members.push(("0/003.txt".into(), b"caption without image".to_vec()));
                members.push(("0/004.png".into(), encoded(8, 8, image::ImageFormat::Png)));
                members.push(("0/004.json".into(), b"{\"text\": \"x\"}".to_vec()));
                members.push((
                    "0/005.jpg".into(),
                    b"\xFF\xD8\xFF\xE0 not really a jpeg".to_vec(),
                ));
                members.push(("0/005.txt".into(), b"broken image".to_vec()));
                members.push(("README".into(), b"no extension".to_vec()));
            }
            let members: Vec<(&str, Vec<u8>)> = members
                .iter()
                .map(|(n, d)| (n.as_str(), d.clone()))
                .collect();
            write_tar(&dir.join(format!("shard-{i:03}.tar")), &members);
        }
        captions
    }

    #[test]
    fn pairs_load_and_orphans_are_skipped_with_their_member() {
        let dir = tempfile::tempdir().unwrap();
        let captions = write_shards(dir.path(), 1);
        let set = WebDataset::open(
            &[dir.path().join("shard-000.tar")],
            ShardSpec::single(),
            16,
            0,
        )
        .unwrap();
        let skipped = set.skipped().join("\n");
        assert_eq!(set.skipped().len(), 3, "{skipped}");
        assert!(
            skipped.contains("shard-000.tar:0/002.png: no caption"),
            "{skipped}"
        );
        assert!(
            skipped.contains("shard-000.tar:0/003.txt: no image"),
            "{skipped}"
        );
        assert!(
            skipped.contains("shard-000.tar:0/004.json: no \"caption\""),
            "{skipped}"
        );
        assert_eq!(set.len(), 3);
        let mut loaded = BTreeSet::new();
        for i in 0..set.len() as u64 {
            match set.load(i, 1) {
                Ok(s) => {
                    assert_eq!(s.pixels.len(), 3 * 16 * 16);
                    loaded.insert(s.caption);
                }
                Err(e) => {
                    assert_eq!(
                        set.describe(i),
                        format!("{}:0/005.jpg", dir.path().join("shard-000.tar").display())
                    );
                    assert!(format!("{e:#}").contains("Jpeg"), "{e:#}");
                }
            }
        }
        assert_eq!(loaded, captions.into_iter().collect());
    }

    #[test]
    fn brace_patterns_split_shards_across_ranks() {
        let dir = tempfile::tempdir().unwrap();
        let captions: BTreeSet<String> = write_shards(dir.path(), 3).into_iter().collect();
        let pattern = format!("{}/shard-{{000..002}}.tar", dir.path().display());
        let shards: Vec<PathBuf> = expand_braces(&pattern)
            .unwrap()
            .into_iter()
            .map(PathBuf::from)
            .collect();
        for world in 1..=4 {
            let mut seen = Vec::new();
            for rank in 0..world {
                let set = WebDataset::open(&shards, ShardSpec::new(rank, world).unwrap(), 8, 0)
                    .unwrap_or_else(|e| panic!("{e:#}"));
                for i in 0..set.len() as u64 {
                    if let Ok(s) = set.load(i, 0) {
                        seen.push(s.caption);
                    }
                }
            }
            assert_eq!(seen.len(), captions.len(), "world {world}");
            assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), captions);
        }
    }

    #[test]
    fn shards_without_samples_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.tar");
        write_tar(&path, &[("a.txt", b"lonely".to_vec())]);
        let missing = dir.path().join("missing.tar");
        let err = format!(
            "{:#}",
            WebDataset::open(&[path, missing], ShardSpec::single(), 8, 0)
                .err()
                .unwrap()
        );
        assert!(err.contains("no usable sample"), "{err}");
        assert!(err.contains("empty.tar:a.txt: no image"), "{err}");
        assert!(err.contains("missing.tar: cannot open shard"), "{err}");
    }

    #[test]
    fn keys_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(
            split_key("a/b.c/000.seg.png"),
            Some(("a/b.c/000", "seg.png"))
        );
        assert_eq!(split_key("000.jpg"), Some(("000", "jpg")));
        assert_eq!(split_key("README"), None);
        assert_eq!(split_key("dir/.hidden"), None);
        assert_eq!(split_key("x."), None);
    }
}
