//! open_clip's released CoCa weights by tag (`--model coca_ViT-B-32 --pretrained
//! laion2b_s13b_b90k`), found in and downloaded into the Hugging Face hub's cache layout, as
//! `huggingface_hub` keeps it:
//!
//! ```text
//! <cache>/models--<org>--<name>/refs/<revision>             the commit the revision points at
//! <cache>/models--<org>--<name>/snapshots/<commit>/<file>   a link to ../../blobs/<etag>
//! <cache>/models--<org>--<name>/blobs/<etag>                the bytes
//! ```
//!
//! A download first asks `<endpoint>/<repo>/resolve/<revision>/<file>` for its metadata without
//! following the redirect (`X-Repo-Commit`, `X-Linked-Etag` — the SHA-256 of an LFS file,
//! checked after the download — `X-Linked-Size`, and the `Location` of the bytes).

use super::checksum::{bare_etag, Checksum};
use super::{Expected, Hub};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// open_clip's pretrained tags for the CoCa configs (its `pretrained.py`): (config, tag,
/// Hugging Face repository).
pub const OPEN_CLIP_TAGS: &[(&str, &str, &str)] = &[
    (
        "coca_ViT-B-32",
        "laion2b_s13b_b90k",
        "laion/CoCa-ViT-B-32-laion2B-s13B-b90k",
    ),
    (
        "coca_ViT-B-32",
        "mscoco_finetuned_laion2b_s13b_b90k",
        "laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k",
    ),
    (
        "coca_ViT-L-14",
        "laion2b_s13b_b90k",
        "laion/CoCa-ViT-L-14-laion2B-s13B-b90k",
    ),
    (
        "coca_ViT-L-14",
        "mscoco_finetuned_laion2b_s13b_b90k",
        "laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k",
    ),
];

/// The weight files open_clip looks for in a hub repository, preferred first.
pub const WEIGHT_FILES: &[&str] = &["open_clip_model.safetensors", "open_clip_pytorch_model.bin"];

/// The repository of `model`'s pretrained `tag`.
pub fn tag_repo(model: &str, tag: &str) -> Option<&'static str> {
    OPEN_CLIP_TAGS
        .iter()
        .find(|(m, t, _)| *m == model && t.eq_ignore_ascii_case(tag))
        .map(|(_, _, repo)| *repo)
}

/// The tags known for `model` (for error messages).
pub fn tags_of(model: &str) -> Vec<&'static str> {
    OPEN_CLIP_TAGS
        .iter()
        .filter(|(m, _, _)| *m == model)
        .map(|(_, t, _)| *t)
        .collect()
}

/// A repository's folder in the cache.
pub fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The cached copy of `file` at `revision` (a branch or tag with a `refs/` entry, or a commit).
pub fn cached(cache: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let dir = repo_dir(cache, repo);
    let commit = std::fs::read_to_string(dir.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let path = dir.join("snapshots").join(commit).join(file);
    path.is_file().then_some(path)
}

/// The first of `files` in the cache, else the first the hub has, downloaded into the cache
/// (one rank per node).
pub fn weights(hub: &Hub, repo: &str, revision: &str, files: &[&str]) -> Result<PathBuf> {
    let cache = &hub.env.hf_cache;
    let find = || files.iter().find_map(|f| cached(cache, repo, revision, f));
    // Every rank goes through the gate, cached or not, so that none waits for a word its
    // node's downloader never sends.
    let what = format!("hf:{repo}@{revision}");
    hub.gate.once(&what, |may_download| {
        if let Some(path) = find() {
            return Ok(path);
        }
        let base = format!("{}/{repo}/resolve/{revision}", hub.env.hf_endpoint);
        if !may_download || hub.env.offline {
            let dir = repo_dir(cache, repo);
            bail!(
                "{repo} is not in the Hugging Face cache {} and downloads are off \
                 (COCA_OFFLINE / HF_HUB_OFFLINE). Fetch {base}/{} on a machine with network \
                 access (`huggingface-cli download {repo}`) and copy {} here, or pass \
                 --pretrained FILE",
                cache.display(),
                files[0],
                dir.display()
            );
        }
        for file in files {
            let url = format!("{base}/{file}");
            if let Some(meta) = head(hub, &url)? {
                return store(hub, repo, revision, file, &url, meta);
            }
        }
        bail!("{repo} has none of {} at {base}", files.join(", "))
    })
}

/// What the hub says about a file before sending it.
struct Meta {
    commit: String,
    etag: String,
    size: Option<u64>,
    location: String,
}

/// The file's metadata, `None` when the hub does not have it (404).
fn head(hub: &Hub, url: &str) -> Result<Option<Meta>> {
    let response = hub
        .downloader(true)
        .agent()
        .head(url)
        .config()
        .max_redirects(0)
        .build()
        .call()
        .with_context(|| format!("asking {url} for its metadata"))?;
    let status = response.status().as_u16();
    if status == 404 {
        return Ok(None);
    }
    if !(200..400).contains(&status) {
        bail!("HTTP {status} for {url} (a gated or private repository needs a token, which this build does not send)");
    }
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let etag = header("x-linked-etag")
        .or_else(|| header("etag"))
        .ok_or_else(|| anyhow!("{url}: the hub sent no ETag"))?;
    let commit = header("x-repo-commit").ok_or_else(|| anyhow!("{url}: no X-Repo-Commit"))?;
    let size = header("x-linked-size")
        .or_else(|| (status == 200).then(|| header("content-length")).flatten())
        .and_then(|v| v.trim().parse().ok());
    let location = match header("location") {
        Some(l) if l.starts_with("http://") || l.starts_with("https://") => l,
        Some(l) => format!("{}{l}", hub.env.hf_endpoint),
        None => url.to_string(),
    };
    Ok(Some(Meta {
        commit,
        etag: bare_etag(&etag).to_string(),
        size,
        location,
    }))
}

/// Downloads the blob and lays out the snapshot link and the ref.
fn store(
    hub: &Hub,
    repo: &str,
    revision: &str,
    file: &str,
    url: &str,
    meta: Meta,
) -> Result<PathBuf> {
    let dir = repo_dir(&hub.env.hf_cache, repo);
    if meta.etag.contains('/') || meta.commit.contains('/') || meta.commit.is_empty() {
        bail!(
            "{url}: unusable ETag {:?} or commit {:?}",
            meta.etag,
            meta.commit
        );
    }
    let blob = dir.join("blobs").join(&meta.etag);
    let expected = Expected {
        size: meta.size,
        checksum: Checksum::from_etag(&meta.etag),
    };
    hub.downloader(true)
        .fetch(&meta.location, &blob, &expected)
        .with_context(|| format!("{repo}: {file}"))?;
    let snapshot = dir.join("snapshots").join(&meta.commit).join(file);
    let folder = snapshot.parent().unwrap_or(&dir);
    std::fs::create_dir_all(folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    if !snapshot.exists() {
        let target = Path::new("../../blobs").join(&meta.etag);
        if std::os::unix::fs::symlink(&target, &snapshot).is_err() {
            std::fs::copy(&blob, &snapshot)
                .with_context(|| format!("cannot write {}", snapshot.display()))?;
        }
    }
    if revision != meta.commit {
        let refs = dir.join("refs");
        std::fs::create_dir_all(&refs)
            .with_context(|| format!("cannot create {}", refs.display()))?;
        std::fs::write(refs.join(revision), &meta.commit)
            .with_context(|| format!("cannot write {}", refs.join(revision).display()))?;
    }
    Ok(snapshot)
}
