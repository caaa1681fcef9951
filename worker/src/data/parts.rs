//! Locating the files of a sharded data set (LAION part files, webdataset `.tar` shards) and
//! deciding which of them, or which of their records, a data-parallel rank reads.
//!
//! # Splitting policy
//!
//! With `F` files (in the order the file list, brace pattern or sorted directory gives them) and a
//! data-parallel world of `W` ranks:
//!
//! * **`F >= W`: split by file.** File `i` belongs to rank `i % W`, and a rank opens only its own
//!   files; the other ranks' files are never read.
//! * **`F < W`: split by record.** Some rank would get no file at all, so every rank indexes every
//!   file and keeps the `j`-th usable record (counted over all files in order) when
//!   `j % W == rank`.
//!
//! Either way each usable record lands on exactly one rank. Loader threads are *not* given files
//! of their own: the sources index their files up front (see [`super::laion`] and
//! [`super::webdataset`]), which makes a rank's share a map-style
//! [`CaptionSource`](super::loader::CaptionSource) that any loader thread can read at random, so
//! the loader's usual rule (batch `n` is built by thread `n % threads`) applies unchanged and the
//! number of threads never changes which samples a rank sees.
//!
//! Ranks split by file can hold different numbers of samples; a multi-rank trainer must agree on
//! a step count (e.g. `--max_steps`) rather than derive it from each rank's epoch length.

use crate::hub::env::expand_home;
use anyhow::{bail, Context, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// This process's place in the data-parallel world, for sources split by file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    /// Data-parallel rank, `0..world`.
    pub rank: usize,
    /// Data-parallel world size (at least 1).
    pub world: usize,
}

/// How a sharded data set is divided among ranks (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// File `i` goes to rank `i % world`.
    ByFile,
    /// Usable record `j` (over all files in order) goes to rank `j % world`.
    ByRecord,
}

impl ShardSpec {
    /// The only rank of a one-process run.
    pub fn single() -> Self {
        Self { rank: 0, world: 1 }
    }

    /// Rank `rank` of `world`; an error when the rank is outside the world.
    pub fn new(rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            bail!("rank {rank} is outside a data-parallel world of {world}");
        }
        Ok(Self { rank, world })
    }

    /// The policy for a data set of `files` files.
    pub fn split(&self, files: usize) -> Split {
        if files >= self.world {
            Split::ByFile
        } else {
            Split::ByRecord
        }
    }

    /// Whether this rank opens file `index` of `files` under this policy.
    pub fn opens_file(&self, index: usize, files: usize) -> bool {
        match self.split(files) {
            Split::ByFile => index % self.world == self.rank,
            Split::ByRecord => true,
        }
    }

    /// Whether this rank keeps usable record `index` (counted over all files) under
    /// [`Split::ByRecord`].
    pub fn keeps_record(&self, index: usize) -> bool {
        index % self.world == self.rank
    }
}

/// Expands shell-style braces, as webdataset's `braceexpand` does: numeric ranges
/// `{000..009}` (zero-padded to the wider end when either end has a leading zero; descending
/// ranges count down) and lists `{a,b,c}`; several groups multiply out left to right.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            bail!("unmatched `}}` in {pattern:?}");
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = match pattern[open..].find('}') {
        Some(c) => open + c,
        None => bail!("unmatched `{{` in {pattern:?}"),
    };
    let (head, body, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    if head.contains('}') {
        bail!("unmatched `}}` in {pattern:?}");
    }
    let choices: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let parse = |s: &str| -> Result<u64> {
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                bail!("{{{body}}} in {pattern:?}: range ends must be non-negative integers");
            }
            s.parse::<u64>()
                .with_context(|| format!("{{{body}}} in {pattern:?}: number out of range"))
        };
        let (lo, hi) = (parse(a)?, parse(b)?);
        let padded = (a.len() > 1 && a.starts_with('0')) || (b.len() > 1 && b.starts_with('0'));
        let width = if padded { a.len().max(b.len()) } else { 0 };
        let count = lo.abs_diff(hi) + 1;
        if count > 10_000_000 {
            bail!("{{{body}}} in {pattern:?} names {count} files, more than 10 million");
        }
        let numbers: Box<dyn Iterator<Item = u64>> = if lo <= hi {
            Box::new(lo..=hi)
        } else {
            Box::new((hi..=lo).rev())
        };
        numbers.map(|n| format!("{n:0width$}")).collect()
    } else if body.contains(',') {
        body.split(',').map(str::to_string).collect()
    } else {
        bail!("{{{body}}} in {pattern:?}: expected a range {{000..009}} or a list {{a,b}}");
    };
    let rest = expand_braces(tail)?;
    let mut out = Vec::with_capacity(choices.len() * rest.len());
    for c in &choices {
        for r in &rest {
            out.push(format!("{head}{c}{r}"));
        }
    }
    Ok(out)
}

/// The paths of a file list naming `what` (for the messages: "part files", "images"): one per
/// line, blank lines ignored, relative paths resolved against the list's folder (`~`
/// expanded). An error when the list cannot be read, holds no path, or looks like one of the
/// files it should name rather than a list.
pub fn read_file_list(list: &Path, what: &str) -> Result<Vec<PathBuf>> {
    let text =
        std::fs::read(list).with_context(|| format!("reading file list {}", list.display()))?;
    let text = String::from_utf8(text).map_err(|_| {
        anyhow::anyhow!(
            "{} is not a file list (UTF-8 text, one path per line): pass a list naming the \
             {what}, not one of the {what} itself",
            list.display()
        )
    })?;
    let base = list.parent().unwrap_or(Path::new("."));
    let mut paths = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.contains('\t') {
            bail!(
                "{}:{}: a file list has one path per line, but this line holds tab-separated \
                 columns: pass a list naming the {what}, not one of the {what} itself",
                list.display(),
                n + 1
            );
        }
        let path = expand_home(line);
        paths.push(if path.is_absolute() {
            path
        } else {
            base.join(path)
        });
    }
    if paths.is_empty() {
        bail!("file list {} names no files", list.display());
    }
    Ok(paths)
}

/// The `.tar` files directly inside `dir`, sorted by name.
pub fn tar_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if path.is_file() && path.extension().is_some_and(|e| e == "tar") {
            out.push(path);
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("{} holds no .tar shards", dir.display());
    }
    Ok(out)
}

/// `len` bytes of `path` from byte `offset`.
pub fn read_range(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file
        .metadata()
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len();
    if offset.checked_add(len as u64).is_none_or(|end| end > size) {
        bail!(
            "{} is {size} bytes long, too short for {len} bytes at offset {offset} (truncated, or \
             changed after it was indexed?)",
            path.display()
        );
    }
    file.seek(SeekFrom::Start(offset))
        .with_context(|| format!("seeking in {}", path.display()))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf).with_context(|| {
        format!(
            "reading {len} bytes at offset {offset} of {} (was the file changed after it was indexed?)",
            path.display()
        )
    })?;
    Ok(buf)
}

/// A short summary of skip reports for an error message: the count and the first few.
pub fn summarize_skips(skipped: &[String]) -> String {
    const SHOWN: usize = 5;
    if skipped.is_empty() {
        return "nothing was skipped".to_string();
    }
    let mut s = format!("{} skipped:", skipped.len());
    for reason in skipped.iter().take(SHOWN) {
        s.push_str("\n  ");
        s.push_str(reason);
    }
    if skipped.len() > SHOWN {
        s.push_str(&format!("\n  ... and {} more", skipped.len() - SHOWN));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_like_braceexpand() {
        assert_eq!(
            expand_braces("a/s-{000..003}.tar").unwrap(),
            ["a/s-000.tar", "a/s-001.tar", "a/s-002.tar", "a/s-003.tar"]
        );
        assert_eq!(expand_braces("{8..11}").unwrap(), ["8", "9", "10", "11"]);
        assert_eq!(expand_braces("{2..0}").unwrap(), ["2", "1", "0"]);
        assert_eq!(expand_braces("{09..10}").unwrap(), ["09", "10"]);
        assert_eq!(
            expand_braces("{a,b}-{0..1}.tar").unwrap(),
            ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        for bad in ["{0..", "x}", "{x..3}", "{abc}", "{1..-2}"] {
            assert!(expand_braces(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_record_goes_to_exactly_one_rank() {
        for files in [1usize, 2, 3, 5, 8] {
            for world in 1..=4 {
                let specs: Vec<ShardSpec> = (0..world)
                    .map(|r| ShardSpec::new(r, world).unwrap())
                    .collect();
                for f in 0..files {
                    let openers = specs.iter().filter(|s| s.opens_file(f, files)).count();
                    match specs[0].split(files) {
                        Split::ByFile => assert_eq!(openers, 1),
                        Split::ByRecord => assert_eq!(openers, world),
                    }
                }
                for j in 0..20 {
                    assert_eq!(specs.iter().filter(|s| s.keeps_record(j)).count(), 1);
                }
            }
        }
        assert!(ShardSpec::new(2, 2).is_err());
        assert!(ShardSpec::new(0, 0).is_err());
    }

    #[test]
    fn ranges_past_the_end_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_range(&path, 2, 3).unwrap(), b"234");
        assert_eq!(read_range(&path, 10, 0).unwrap(), b"");
        let err = format!("{:#}", read_range(&path, 8, 1 << 40).unwrap_err());
        assert!(err.contains("too short"), "{err}");
        assert!(read_range(&path, u64::MAX, 2).is_err());
    }

    #[test]
    fn file_lists_resolve_relative_paths_and_reject_part_files() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.txt");
        std::fs::write(&list, "a.gz\n\n/abs/b.tsv\n  sub/c.tsv  \n").unwrap();
        assert_eq!(
            read_file_list(&list, "part files").unwrap(),
            [
                dir.path().join("a.gz"),
                PathBuf::from("/abs/b.tsv"),
                dir.path().join("sub/c.tsv")
            ]
        );
        std::fs::write(&list, "\n \n").unwrap();
        assert!(
            format!("{:#}", read_file_list(&list, "part files").unwrap_err())
                .contains("names no files")
        );
        std::fs::write(&list, "x\t{}\t\t\tAAAA\n").unwrap();
        let err = format!("{:#}", read_file_list(&list, "part files").unwrap_err());
        assert!(err.contains("list.txt:1"), "{err}");
        assert!(err.contains("naming the part files, not one of"), "{err}");
        std::fs::write(&list, b"\xff\xd8\xff\xe0 a JPEG").unwrap();
        let err = format!("{:#}", read_file_list(&list, "images").unwrap_err());
        assert!(err.contains("naming the images"), "{err}");
    }
}
