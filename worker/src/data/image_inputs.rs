//! The image files a command reads (`embed --images`, `caption`), from what a user names on
//! the command line: image files, folders of images, and lists of paths. A folder of a million
//! images is one argument, not a shell glob past the kernel's argument limit.
//!
//! Expanded before the model loads, so a misspelt path is an error at once, naming it.

use super::image_folder::{image_files_under, IMAGE_EXTENSIONS};
use super::parts::read_file_list;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The image files `inputs` and `list` name, in order: each input a file (taken as an image,
/// whatever its extension) or a folder (every image file under it, by [`IMAGE_EXTENSIONS`], in
/// torchvision's `ImageFolder` order: [`image_files_under`]); then the paths `list` names, one
/// per line, relative ones against the list's folder. `flag` names where the inputs came from,
/// for the messages. An error for a path that does not exist, a folder without images, a list
/// that names nothing, and no images at all.
pub fn expand_image_inputs(
    inputs: &[PathBuf],
    list: Option<&Path>,
    flag: &str,
) -> Result<Vec<PathBuf>> {
    let mut files = Vec::with_capacity(inputs.len());
    for input in inputs {
        let meta = std::fs::metadata(input)
            .with_context(|| format!("{flag} {}: no such file or folder", input.display()))?;
        if meta.is_dir() {
            let found = image_files_under(input)?;
            if found.is_empty() {
                bail!(
                    "{flag} {}: the folder holds no image files ({}), in it or below it",
                    input.display(),
                    IMAGE_EXTENSIONS.join(", ")
                );
            }
            files.extend(found);
        } else {
            files.push(input.clone());
        }
    }
    if let Some(list) = list {
        files.extend(
            read_file_list(list, "images")
                .with_context(|| format!("--image_list {}", list.display()))?,
        );
    }
    if files.is_empty() {
        bail!("{flag}: no images given");
    }
    Ok(files)
}

/// The file beside `out` that lists, one path per line, the image behind each of its rows:
/// `emb.npy` → `emb.paths.txt`.
pub fn paths_file_for(out: &Path) -> PathBuf {
    out.with_extension("paths.txt")
}

/// `paths` as the text of a [`paths_file_for`] file: one path per line, in row order. An error
/// for a path that is not UTF-8 or holds a line break, which the file could not list
/// unambiguously.
pub fn paths_text(paths: &[PathBuf]) -> Result<String> {
    let mut text = String::new();
    for path in paths {
        let Some(line) = path.to_str() else {
            bail!(
                "{}: the image's path is not UTF-8, so the list of rows cannot name it",
                path.display()
            );
        };
        if line.contains(['\n', '\r']) {
            bail!(
                "{line:?}: the image's path holds a line break, so the list of rows cannot name it"
            );
        }
        text.push_str(line);
        text.push('\n');
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_folders_and_lists_expand_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let folder = root.join("photos");
        for name in ["b/2.JPG", "b/1.png", "a.jpg", "notes.txt", "c/d/3.webp"] {
            let path = folder.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"x").unwrap();
        }
        std::fs::create_dir_all(root.join("empty/sub")).unwrap();
        let single = root.join("single.bin");
        std::fs::write(&single, b"x").unwrap();
        let list = root.join("lists").join("more.txt");
        std::fs::create_dir_all(list.parent().unwrap()).unwrap();
        std::fs::write(&list, "../photos/a.jpg\n\n/abs/x.png\n").unwrap();

        let got = expand_image_inputs(&[single.clone(), folder.clone()], Some(&list), "--images")
            .unwrap();
        let expected = [
            single.clone(),
            folder.join("a.jpg"),
            folder.join("b/1.png"),
            folder.join("b/2.JPG"),
            folder.join("c/d/3.webp"),
            root.join("lists/../photos/a.jpg"),
            PathBuf::from("/abs/x.png"),
        ];
        assert_eq!(got, expected);

        let err = |inputs: &[PathBuf], list: Option<&Path>| {
            format!(
                "{:#}",
                expand_image_inputs(inputs, list, "--images").unwrap_err()
            )
        };
        let missing = root.join("missing.jpg");
        let e = err(&[single.clone(), missing], None);
        assert!(
            e.contains("--images") && e.contains("missing.jpg: no such file"),
            "{e}"
        );
        let e = err(&[root.join("empty")], None);
        assert!(
            e.contains("empty") && e.contains("holds no image files"),
            "{e}"
        );
        let e = err(&[], None);
        assert!(e.contains("no images given"), "{e}");
        std::fs::write(&list, "\n").unwrap();
        let e = err(&[], Some(&list));
        assert!(
            e.contains("--image_list") && e.contains("names no files"),
            "{e}"
        );
    }

    /// Folders sort as path strings (`a-b` before `a/b`, as Python sorts them), a link to a
    /// folder elsewhere is followed, and a link back up the tree is skipped rather than walked
    /// for ever.
    #[test]
    fn links_are_followed_but_never_in_a_circle() {
        let tmp = tempfile::tempdir().unwrap();
        let folder = tmp.path().join("photos");
        let elsewhere = tmp.path().join("elsewhere");
        for path in [
            folder.join("a/b/1.jpg"),
            folder.join("a-b/2.jpg"),
            elsewhere.join("3.png"),
        ] {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"x").unwrap();
        }
        std::os::unix::fs::symlink(&elsewhere, folder.join("linked")).unwrap();
        std::os::unix::fs::symlink(&folder, folder.join("a/b/up")).unwrap();
        let got = expand_image_inputs(std::slice::from_ref(&folder), None, "--images").unwrap();
        assert_eq!(
            got,
            [
                folder.join("a-b/2.jpg"),
                folder.join("a/b/1.jpg"),
                folder.join("linked/3.png"),
            ]
        );
    }

    #[test]
    fn the_row_list_names_each_row_or_refuses() {
        assert_eq!(
            paths_file_for(Path::new("out/emb.npy")),
            Path::new("out/emb.paths.txt")
        );
        let paths = [PathBuf::from("a/1.jpg"), PathBuf::from("b 2.png")];
        assert_eq!(paths_text(&paths).unwrap(), "a/1.jpg\nb 2.png\n");
        let e = format!(
            "{:#}",
            paths_text(&[PathBuf::from("bad\nname.jpg")]).unwrap_err()
        );
        assert!(e.contains("line break"), "{e}");
        use std::os::unix::ffi::OsStrExt;
        let not_utf8 = PathBuf::from(std::ffi::OsStr::from_bytes(b"caf\xe9.jpg"));
        let e = format!("{:#}", paths_text(&[not_utf8]).unwrap_err());
        assert!(e.contains("not UTF-8"), "{e}");
    }
}
