//! Files written whole or not at all: through a temporary file beside the final one, synced
//! and renamed, so that a crash or an error mid-write never leaves a truncated file (or
//! clobbers a good one) under the final name. Checkpoints, embeddings and their row lists are
//! written this way.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Writes `path` by calling `write` on a temporary path in the same folder (creating the folder
/// if needed), then syncing it and renaming it to `path`. On any error the temporary file is
/// removed and `path` is left as it was.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = temporary_path(dir, path)?;
    let result = write(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|file| file.sync_all())
                .with_context(|| format!("cannot sync {}", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomically`] of `bytes`.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |tmp| Ok(std::fs::write(tmp, bytes)?))
}

/// The hidden temporary name `path` is written under: `.{name}.tmp-{pid}` in `dir`.
fn temporary_path(dir: &Path, path: &Path) -> Result<PathBuf> {
    let file_name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy();
    Ok(dir.join(format!(".{file_name}.tmp-{}", std::process::id())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub").join("out.bin");
        write_bytes_atomically(&path, b"first").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let err = write_atomically(&path, |tmp| {
            std::fs::write(tmp, b"half")?;
            anyhow::bail!("the writer failed")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("the writer failed"), "{err:#}");
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out.bin"], "the temporary file is removed");
        write_bytes_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert!(write_bytes_atomically(Path::new("/"), b"x").is_err());
    }
}
