//! An ImageFolder for zero-shot classification (the seed's `--classification_eval DIR`):
//!
//! ```text
//! DIR/images/<class>/<file>     one folder per class; classes in sorted (byte) order
//! DIR/labels.txt                optional: one display name per class, in class order
//! DIR/templates.txt             optional: one prompt template per line, `{}` for the name
//! ```
//!
//! As torchvision's `ImageFolder`: class `k` is the `k`-th class folder in sorted order, images
//! are found recursively under it (folders sorted by path, files by name, as
//! `sorted(os.walk(...))` gives them), and only files with an
//! image extension ([`IMAGE_EXTENSIONS`], any case) count; a class folder without images is an
//! error. Without `labels.txt` the display names are the 1000 ImageNet-1K class names (OpenAI's
//! list, as open_clip ships it), which then requires exactly 1000 class folders; without
//! `templates.txt` the prompts are OpenAI's 80 ImageNet templates. Both defaults are compiled
//! into the binary.

use super::preprocess::{open_image, LoadedImage};
use anyhow::{bail, Context, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The 1000 ImageNet-1K class names, one per line, in class-index order.
pub const IMAGENET_CLASSNAMES: &str = include_str!("imagenet/imagenet_classnames.txt");
/// OpenAI's 80 ImageNet prompt templates, one per line, `{}` where the class name goes.
pub const OPENAI_IMAGENET_TEMPLATES: &str = include_str!("imagenet/openai_imagenet_templates.txt");
/// File extensions (lower case) that count as images.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "bmp", "gif", "webp"];

/// The default display names: [`IMAGENET_CLASSNAMES`] as a list.
pub fn imagenet_classnames() -> Vec<String> {
    IMAGENET_CLASSNAMES.lines().map(str::to_string).collect()
}

/// The default templates: [`OPENAI_IMAGENET_TEMPLATES`] as a list.
pub fn openai_imagenet_templates() -> Vec<String> {
    OPENAI_IMAGENET_TEMPLATES
        .lines()
        .map(str::to_string)
        .collect()
}

/// A classification set laid out as described in the module documentation.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    class_dirs: Vec<String>,
    classnames: Vec<String>,
    templates: Vec<String>,
    /// `(image file, class index)`, class by class.
    images: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    /// Lists `dir/images` and reads the optional `labels.txt` and `templates.txt`. Errors name
    /// the folder or file (and line) at fault: no class folders, a class without images, a
    /// label count that differs from the class count, a template without `{}`.
    pub fn open(dir: &Path) -> Result<Self> {
        let images_dir = dir.join("images");
        if !images_dir.is_dir() {
            bail!(
                "{} is not a folder: an ImageFolder holds images/<class>/<file>",
                images_dir.display()
            );
        }
        let mut class_dirs = Vec::new();
        for entry in std::fs::read_dir(&images_dir)
            .with_context(|| format!("listing {}", images_dir.display()))?
        {
            let entry = entry.with_context(|| format!("listing {}", images_dir.display()))?;
            if entry.path().is_dir() {
                let name = entry.file_name().into_string().map_err(|n| {
                    anyhow::anyhow!(
                        "class folder {:?} in {} is not UTF-8",
                        n,
                        images_dir.display()
                    )
                })?;
                class_dirs.push(name);
            }
        }
        class_dirs.sort();
        if class_dirs.is_empty() {
            bail!("{} holds no class folders", images_dir.display());
        }
        let mut images = Vec::new();
        for (class, name) in class_dirs.iter().enumerate() {
            let folder = images_dir.join(name);
            let files = image_files_under(&folder)?;
            if files.is_empty() {
                bail!(
                    "class folder {} holds no images ({})",
                    folder.display(),
                    IMAGE_EXTENSIONS.join(", ")
                );
            }
            images.extend(files.into_iter().map(|f| (f, class)));
        }
        let labels_file = dir.join("labels.txt");
        let classnames = if labels_file.exists() {
            let labels = read_lines(&labels_file)?;
            for (n, label) in labels.iter().enumerate() {
                if label.trim().is_empty() {
                    bail!("{}:{}: empty class name", labels_file.display(), n + 1);
                }
            }
            if labels.len() != class_dirs.len() {
                bail!(
                    "{} has {} names but {} has {} class folders",
                    labels_file.display(),
                    labels.len(),
                    images_dir.display(),
                    class_dirs.len()
                );
            }
            labels
        } else {
            let names = imagenet_classnames();
            if names.len() != class_dirs.len() {
                bail!(
                    "{} has {} class folders and there is no {}: the default names are the {} \
                     ImageNet classes; write labels.txt with one name per class folder, in \
                     sorted folder order",
                    images_dir.display(),
                    class_dirs.len(),
                    labels_file.display(),
                    names.len()
                );
            }
            names
        };
        let templates_file = dir.join("templates.txt");
        let templates = if templates_file.exists() {
            let mut templates = Vec::new();
            for (n, line) in read_lines(&templates_file)?.into_iter().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                if !line.contains("{}") {
                    bail!(
                        "{}:{}: template {line:?} has no {{}} for the class name",
                        templates_file.display(),
                        n + 1
                    );
                }
                templates.push(line);
            }
            if templates.is_empty() {
                bail!("{} holds no templates", templates_file.display());
            }
            templates
        } else {
            openai_imagenet_templates()
        };
        Ok(Self {
            root: dir.to_path_buf(),
            class_dirs,
            classnames,
            templates,
            images,
        })
    }

    /// The folder this set was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Display names, one per class, in class order.
    pub fn classnames(&self) -> &[String] {
        &self.classnames
    }

    /// The class folder names, in class order.
    pub fn class_dirs(&self) -> &[String] {
        &self.class_dirs
    }

    /// Prompt templates, each with `{}` where the class name goes.
    pub fn templates(&self) -> &[String] {
        &self.templates
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there are no images (never true for an opened set).
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Class index of image `i`.
    pub fn class_of(&self, i: usize) -> Option<usize> {
        self.images.get(i).map(|(_, c)| *c)
    }

    /// Image `i`, decoded, with its class index. Errors name the file.
    pub fn get(&self, i: usize) -> Result<(LoadedImage, usize)> {
        let Some((path, class)) = self.images.get(i) else {
            bail!(
                "image {i} is past the {} images of {}",
                self.images.len(),
                self.root.display()
            );
        };
        Ok((open_image(path)?, *class))
    }

    /// The file of image `i`, for reports.
    pub fn describe(&self, i: usize) -> String {
        match self.images.get(i) {
            Some((path, _)) => path.display().to_string(),
            None => format!("{} image {i}", self.root.display()),
        }
    }
}

/// Image files (by [`IMAGE_EXTENSIONS`]) under `folder`, in torchvision's order: the folder and
/// every folder below it sorted by path string (`sorted(os.walk(..., followlinks=True))`), and
/// within each, its files sorted by name. Links to folders are followed as torchvision follows
/// them, except one that leads back to a folder it lies in: that would never end (`os.walk`
/// recurses until the path is too long), so it is skipped.
pub fn image_files_under(folder: &Path) -> Result<Vec<PathBuf>> {
    // Each pending folder with the identities (device, inode) of the folders above it.
    let mut pending = vec![(folder.to_path_buf(), Vec::new())];
    let mut files_of: Vec<(PathBuf, Vec<PathBuf>)> = Vec::new();
    while let Some((dir, mut above)) = pending.pop() {
        let meta = std::fs::metadata(&dir).with_context(|| format!("reading {}", dir.display()))?;
        let identity = (meta.dev(), meta.ino());
        if above.contains(&identity) {
            continue;
        }
        above.push(identity);
        let mut files = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            if path.is_dir() {
                pending.push((path, above.clone()));
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                files.push(path);
            }
        }
        // By the path's bytes, as Python sorts strings (`Path`'s own order goes by components).
        files.sort_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
        files_of.push((dir, files));
    }
    files_of.sort_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
    Ok(files_of.into_iter().flat_map(|(_, files)| files).collect())
}

/// The lines of a UTF-8 text file (without line ends; trailing blank lines dropped).
fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, shade: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_pixel(6, 5, image::Luma([shade]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn labels_and_templates_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_png(&root.join("images/b_dog/2.png"), 10);
        write_png(&root.join("images/b_dog/1.png"), 20);
        write_png(&root.join("images/a_cat/x.PNG"), 30);
        write_png(&root.join("images/a_cat/sub/y.png"), 40);
        std::fs::write(root.join("images/a_cat/notes.txt"), "not an image").unwrap();
        std::fs::write(root.join("labels.txt"), "cat\ndog\n").unwrap();
        std::fs::write(
            root.join("templates.txt"),
            "a photo of a {}.\n\nart of the {}.\n",
        )
        .unwrap();
        let set = ImageFolder::open(root).unwrap();
        assert_eq!(set.classnames(), ["cat", "dog"]);
        assert_eq!(set.class_dirs(), ["a_cat", "b_dog"]);
        assert_eq!(set.templates(), ["a photo of a {}.", "art of the {}."]);
        assert_eq!(set.len(), 4);
        let order: Vec<(String, usize)> = (0..set.len())
            .map(|i| {
                let (img, class) = set.get(i).unwrap();
                assert_eq!((img.image.width(), img.image.height()), (6, 5));
                let file = set.describe(i);
                (file[root.display().to_string().len()..].to_string(), class)
            })
            .collect();
        assert_eq!(
            order,
            [
                ("/images/a_cat/x.PNG".to_string(), 0),
                ("/images/a_cat/sub/y.png".to_string(), 0),
                ("/images/b_dog/1.png".to_string(), 1),
                ("/images/b_dog/2.png".to_string(), 1),
            ]
        );
        // A corrupt image is an error naming the file.
        std::fs::write(root.join("images/b_dog/2.png"), "garbage").unwrap();
        let err = format!("{:#}", set.get(3).err().unwrap());
        assert!(err.contains("2.png"), "{err}");
        assert!(set.get(4).is_err());
    }

    #[test]
    fn defaults_are_imagenet_names_and_openai_templates() {
        let names = imagenet_classnames();
        let templates = openai_imagenet_templates();
        assert_eq!(names.len(), 1000);
        assert_eq!(
            (names[0].as_str(), names[999].as_str()),
            ("tench", "toilet paper")
        );
        assert_eq!(templates.len(), 80);
        assert!(templates.iter().all(|t| t.contains("{}")));
        let dir = tempfile::tempdir().unwrap();
        let mut png = Vec::new();
        image::GrayImage::from_pixel(2, 2, image::Luma([0]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        for k in 0..1000 {
            let class = dir.path().join(format!("images/n{k:08}"));
            std::fs::create_dir_all(&class).unwrap();
            std::fs::write(class.join("0.png"), &png).unwrap();
        }
        let set = ImageFolder::open(dir.path()).unwrap();
        assert_eq!(set.classnames(), names);
        assert_eq!(set.templates(), templates);
        assert_eq!(set.len(), 1000);
        assert_eq!(set.class_of(999), Some(999));
    }

    #[test]
    fn inconsistent_folders_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(format!("{:#}", ImageFolder::open(root).err().unwrap()).contains("images"));
        write_png(&root.join("images/a/1.png"), 0);
        // Two classes without labels.txt: the ImageNet default does not fit.
        write_png(&root.join("images/b/1.png"), 0);
        let err = format!("{:#}", ImageFolder::open(root).err().unwrap());
        assert!(
            err.contains("labels.txt") && err.contains("2 class folders"),
            "{err}"
        );
        std::fs::write(root.join("labels.txt"), "one\n").unwrap();
        let err = format!("{:#}", ImageFolder::open(root).err().unwrap());
        assert!(
            err.contains("1 names") && err.contains("2 class folders"),
            "{err}"
        );
        std::fs::write(root.join("labels.txt"), "one\ntwo\n").unwrap();
        std::fs::write(root.join("templates.txt"), "a {}\nno placeholder\n").unwrap();
        let err = format!("{:#}", ImageFolder::open(root).err().unwrap());
        assert!(err.contains("templates.txt:2"), "{err}");
        std::fs::remove_file(root.join("templates.txt")).unwrap();
        std::fs::create_dir_all(root.join("images/c")).unwrap();
        std::fs::write(root.join("labels.txt"), "one\ntwo\nthree\n").unwrap();
        let err = format!("{:#}", ImageFolder::open(root).err().unwrap());
        assert!(err.contains("holds no images"), "{err}");
    }
}
