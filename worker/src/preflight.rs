//! Checks that need no model, shared by the commands that run them before building one (and by
//! `coca-worker check-args`, which `coca-launch` runs once before starting any worker).

use anyhow::{Context, Result};
use std::path::Path;

/// Creates `dir` if needed and proves it writable by creating and removing a file there; the
/// error names `flag` and the folder.
pub fn writable_dir(dir: &Path, flag: &str) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{flag} {}: cannot create the folder", dir.display()))?;
    let probe = dir.join(format!(".coca-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("{flag} {}: the folder is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_in_the_way_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        writable_dir(&tmp.path().join("a/b"), "--output_dir").unwrap();
        assert!(tmp.path().join("a/b").is_dir());
        let file = tmp.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let e = writable_dir(&file.join("sub"), "--output_dir").unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("--output_dir") && text.contains("sub"),
            "{text}"
        );
    }
}
