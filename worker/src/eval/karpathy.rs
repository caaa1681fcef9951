//! Karpathy-split evaluation files (COCO / Flickr `*_karpathy_test.json`): a JSON array of
//! records `{"image": "val2014/x.jpg", "caption": "..." | ["...", ...]}`, grouped by image in
//! first-appearance order. Images are relative to `--data_root` when given, else to the JSON
//! file's folder (or its `images/` subfolder when the file is found there).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// One image and its reference captions.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalImage {
    /// The `image` field as written.
    pub name: String,
    /// The file to read.
    pub path: PathBuf,
    /// Its reference captions.
    pub captions: Vec<String>,
}

/// Reads `json`; errors name the file and the record at fault.
pub fn read_eval_split(json: &Path, data_root: Option<&Path>) -> Result<Vec<EvalImage>> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("cannot read {}", json.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", json.display()))?;
    let Some(records) = value.as_array() else {
        bail!("{}: expected a JSON array of records", json.display());
    };
    let base = match data_root {
        Some(r) => r.to_path_buf(),
        None => json.parent().unwrap_or(Path::new(".")).to_path_buf(),
    };
    let mut images: Vec<EvalImage> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = Default::default();
    for (i, record) in records.iter().enumerate() {
        let Some(name) = record.get("image").and_then(|v| v.as_str()) else {
            bail!("{}: record {i} has no string \"image\"", json.display());
        };
        let captions: Vec<String> = match record.get("caption") {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|c| {
                    c.as_str().map(str::to_string).with_context(|| {
                        format!("{}: record {i} has a non-string caption", json.display())
                    })
                })
                .collect::<Result<_>>()?,
            _ => bail!(
                "{}: record {i} has no \"caption\" (a string or a list of strings)",
                json.display()
            ),
        };
        let slot = *index.entry(name.to_string()).or_insert_with(|| {
            let direct = base.join(name);
            let nested = base.join("images").join(name);
            let path = if !direct.exists() && nested.exists() {
                nested
            } else {
                direct
            };
            images.push(EvalImage {
                name: name.to_string(),
                path,
                captions: Vec::new(),
            });
            images.len() - 1
        });
        images[slot].captions.extend(captions);
    }
    if images.is_empty() {
        bail!("{}: no records", json.display());
    }
    Ok(images)
}
