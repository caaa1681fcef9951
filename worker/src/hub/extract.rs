//! Unpacking a downloaded data-set archive (tar) with a progress bar: into a staging folder
//! beside the destination first, then moved into place entry by entry, so that an interrupted
//! extraction never leaves a half-filled data set that looks complete.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Unpacks `archive` and moves its top folder `top` (or, when it has none, its whole content)
/// to `parent/top`, replacing what is there under the same names. Returns `parent/top`.
pub fn extract_tar(archive: &Path, parent: &Path, top: &str) -> Result<PathBuf> {
    let staging = parent.join(format!(".{top}.extracting"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot remove {}", staging.display()))?;
    }
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let file = File::open(archive).with_context(|| format!("cannot read {}", archive.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = ProgressBar::new(size);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {wide_bar}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(format!("extracting {}", archive.display()));
    tracing::info!("extracting {} into {}", archive.display(), parent.display());
    let mut tar = tar::Archive::new(bar.wrap_read(file));
    let entries = tar
        .entries()
        .with_context(|| format!("{} is not a tar archive", archive.display()))?;
    for entry in entries {
        let mut entry = entry.with_context(|| format!("reading {}", archive.display()))?;
        // `unpack_in` refuses paths that would leave the staging folder.
        entry.unpack_in(&staging).with_context(|| {
            format!(
                "extracting {} into {}",
                archive.display(),
                staging.display()
            )
        })?;
    }
    bar.finish_and_clear();
    let content = if staging.join(top).is_dir() {
        staging.join(top)
    } else {
        staging.clone()
    };
    let dest = parent.join(top);
    std::fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let children = std::fs::read_dir(&content)
        .with_context(|| format!("cannot list {}", content.display()))?;
    let mut moved = 0;
    for child in children {
        let child = child.with_context(|| format!("cannot list {}", content.display()))?;
        let target = dest.join(child.file_name());
        if target.is_dir() {
            std::fs::remove_dir_all(&target)
        } else if target.exists() {
            std::fs::remove_file(&target)
        } else {
            Ok(())
        }
        .with_context(|| format!("cannot replace {}", target.display()))?;
        std::fs::rename(child.path(), &target).with_context(|| {
            format!(
                "cannot move {} to {}",
                child.path().display(),
                target.display()
            )
        })?;
        moved += 1;
    }
    std::fs::remove_dir_all(&staging)
        .with_context(|| format!("cannot remove {}", staging.display()))?;
    if moved == 0 {
        bail!("{} is empty", archive.display());
    }
    Ok(dest)
}
