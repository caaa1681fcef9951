//! One file over HTTP(S), done properly: written to `<dest>.part` under an exclusive lock (so
//! two processes never write it at once) and renamed to `<dest>` only when complete; a partial
//! file is resumed with an HTTP `Range` request; a dropped connection or a server error is
//! retried with exponential back-off (a bounded number of times); the size is checked against
//! `Content-Length` / `Content-Range` and any size the caller knows; the content is checked
//! against a SHA-256 `ETag` (the Hugging Face hub's LFS files), a `Content-MD5` header, or a
//! digest the caller knows. A progress bar shows bytes and rate. Offline (`COCA_OFFLINE=1` /
//! `HF_HUB_OFFLINE=1`) nothing is requested and the error names the URL and where to put the
//! file by hand.

use super::checksum::Checksum;
use super::HubEnv;
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the caller knows about a file before downloading it.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// Its size in bytes.
    pub size: Option<u64>,
    /// Its digest.
    pub checksum: Option<Checksum>,
}

/// The error of a download attempted while offline (callers tell it apart to explain).
#[derive(Debug, thiserror::Error)]
#[error(
    "offline (COCA_OFFLINE / HF_HUB_OFFLINE is set): {url} is not downloaded. Put the file there \
     by hand: {dest} (in the folder {folder})"
)]
pub struct Offline {
    /// The URL that would have been fetched.
    pub url: String,
    /// Where the file is looked for.
    pub dest: String,
    /// Its folder.
    pub folder: String,
}

/// Downloads files (see the module documentation).
#[derive(Clone)]
pub struct Downloader {
    agent: ureq::Agent,
    offline: bool,
    /// Attempts after the first one.
    retries: u32,
    /// The first back-off; it doubles each retry, up to 30 s.
    backoff: Duration,
}

/// Bytes copied between progress updates and checks.
const CHUNK: usize = 1 << 20;
/// The longest pause between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A failed attempt: worth retrying or not.
enum Attempt {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

impl Downloader {
    /// A downloader with the process's settings: 5 retries, back-off from 1 s.
    pub fn new(env: &HubEnv) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("coca/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self {
            agent,
            offline: env.offline,
            retries: 5,
            backoff: Duration::from_secs(1),
        }
    }

    /// Sets the number of retries and the first back-off.
    pub fn with_retries(mut self, retries: u32, backoff: Duration) -> Self {
        self.retries = retries;
        self.backoff = backoff;
        self
    }

    /// Whether requests are refused (offline mode).
    pub fn offline(&self) -> bool {
        self.offline
    }

    /// The same downloader, refusing every request (offline).
    pub fn without_network(mut self) -> Self {
        self.offline = true;
        self
    }

    /// The HTTP client (for metadata requests such as the hub's `HEAD`).
    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    /// The error for `url` while offline, naming where the file goes.
    pub fn offline_error(url: &str, dest: &Path) -> anyhow::Error {
        anyhow!(Offline {
            url: url.to_string(),
            dest: dest.display().to_string(),
            folder: dest
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        })
    }

    /// Downloads `url` to `dest` unless `dest` exists. Returns whether a download happened.
    pub fn fetch(&self, url: &str, dest: &Path, expected: &Expected) -> Result<bool> {
        if dest.is_file() {
            return Ok(false);
        }
        if self.offline {
            return Err(Self::offline_error(url, dest));
        }
        let folder = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create the folder {}", folder.display()))?;
        let part = part_path(dest);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
            .with_context(|| format!("cannot open {}", part.display()))?;
        lock_exclusive(&file, &part)?;
        // Another process may have finished it while this one waited for the lock.
        if dest.is_file() {
            return Ok(false);
        }
        let started = Instant::now();
        let result = self.fetch_locked(url, &mut file, &part, expected);
        let hint = || {
            format!(
                "downloading {url}; to put the file there by hand: {} (in {})",
                dest.display(),
                folder.display()
            )
        };
        let total = result.with_context(hint)?;
        file.sync_all()
            .with_context(|| format!("cannot write {}", part.display()))?;
        std::fs::rename(&part, dest)
            .with_context(|| format!("cannot rename {} to {}", part.display(), dest.display()))?;
        tracing::info!(
            "downloaded {url} to {} ({total} bytes in {:.1} s)",
            dest.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(true)
    }

    /// Fills the locked `.part` file (resuming what it holds) and checks it; returns its size.
    fn fetch_locked(
        &self,
        url: &str,
        file: &mut File,
        part: &Path,
        expected: &Expected,
    ) -> Result<u64> {
        let bar = progress_bar(url);
        let mut server_checksum = None;
        let mut last_error = None;
        let mut total = None;
        for attempt in 0..=self.retries {
            if attempt > 0 {
                let pause = self
                    .backoff
                    .saturating_mul(1 << (attempt - 1).min(16))
                    .min(MAX_BACKOFF);
                if let Some(e) = &last_error {
                    tracing::warn!(
                        "{url}: {e:#}; retrying in {:.1} s ({attempt}/{})",
                        pause.as_secs_f64(),
                        self.retries
                    );
                }
                std::thread::sleep(pause);
            }
            match self.attempt(url, file, part, expected, &bar, &mut server_checksum) {
                Ok(size) => {
                    total = Some(size);
                    break;
                }
                Err(Attempt::Fatal(e)) => {
                    bar.abandon();
                    discard(file, part);
                    return Err(e);
                }
                Err(Attempt::Retry(e)) => last_error = Some(e),
            }
        }
        bar.finish_and_clear();
        let Some(total) = total else {
            let e = last_error.unwrap_or_else(|| anyhow!("no attempt made"));
            return Err(e.context(format!(
                "gave up after {} attempts (the partial file {} is kept and resumed next time)",
                self.retries + 1,
                part.display()
            )));
        };
        if let Some(want) = expected.size {
            if total != want {
                discard(file, part);
                bail!("wrong size: the server sent {total} bytes, {want} were expected");
            }
        }
        for checksum in expected.checksum.iter().chain(server_checksum.iter()) {
            if let Err(e) = checksum.verify(part) {
                discard(file, part);
                return Err(e.context("the download is corrupt and was removed"));
            }
        }
        Ok(total)
    }

    /// One request: appends to `file` from its current length. Returns the complete size.
    fn attempt(
        &self,
        url: &str,
        file: &mut File,
        part: &Path,
        expected: &Expected,
        bar: &ProgressBar,
        server_checksum: &mut Option<Checksum>,
    ) -> std::result::Result<u64, Attempt> {
        let io = |e: std::io::Error| Attempt::Fatal(anyhow!(e).context(part.display().to_string()));
        let have = file.metadata().map_err(io)?.len();
        let mut request = self.agent.get(url);
        if have > 0 {
            request = request.header("Range", &format!("bytes={have}-"));
        }
        let response = request
            .call()
            .map_err(|e| Attempt::Retry(anyhow!(e).context("no response")))?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let length = header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
        let (start, total) = match status {
            200 => (0, length),
            206 => {
                let range = header("content-range").unwrap_or_default();
                let (start, total) = parse_content_range(&range)
                    .ok_or_else(|| Attempt::Fatal(anyhow!("unreadable Content-Range {range:?}")))?;
                if start != have {
                    return Err(Attempt::Fatal(anyhow!(
                        "asked for bytes from {have}, the server sent from {start}"
                    )));
                }
                (start, total.or(length.map(|l| start + l)))
            }
            416 => {
                // Nothing left to send: complete when the server's size is what we have.
                let range = header("content-range").unwrap_or_default();
                let total = range
                    .rsplit('/')
                    .next()
                    .and_then(|t| t.trim().parse::<u64>().ok());
                if total == Some(have) {
                    return Ok(have);
                }
                file.set_len(0).map_err(io)?;
                return Err(Attempt::Retry(anyhow!(
                    "the server refused to resume at byte {have} (size {total:?}); starting over"
                )));
            }
            s if s >= 500 || s == 408 || s == 429 => {
                return Err(Attempt::Retry(anyhow!("HTTP {status}")))
            }
            _ => return Err(Attempt::Fatal(anyhow!("HTTP {status} for {url}"))),
        };
        if let (Some(total), Some(want)) = (total, expected.size) {
            if total != want {
                return Err(Attempt::Fatal(anyhow!(
                    "wrong size: the server announces {total} bytes, {want} were expected"
                )));
            }
        }
        // A strong entity tag names the whole file, whatever range is sent; Content-MD5 only
        // the bytes sent, so it counts only for a whole-file response.
        let etag = header("x-linked-etag").or_else(|| header("etag"));
        let md5 = (start == 0)
            .then(|| header("content-md5"))
            .flatten()
            .and_then(|v| Checksum::from_content_md5(&v));
        if let Some(c) = etag.as_deref().and_then(Checksum::from_etag).or(md5) {
            *server_checksum = Some(c);
        }
        file.set_len(start).map_err(io)?;
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        bar.set_length(total.unwrap_or(0));
        bar.set_position(start);
        let mut reader = response.into_body().into_reader();
        let mut buf = vec![0u8; CHUNK];
        let mut written = start;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    file.flush().map_err(io)?;
                    return Err(Attempt::Retry(
                        anyhow!(e).context(format!("connection lost after {written} bytes")),
                    ));
                }
            };
            file.write_all(&buf[..n]).map_err(io)?;
            written += n as u64;
            bar.set_position(written);
            if total.is_some_and(|t| written > t) {
                return Err(Attempt::Fatal(anyhow!(
                    "wrong size: the server sent more than the {} bytes it announced",
                    total.unwrap_or_default()
                )));
            }
        }
        file.flush().map_err(io)?;
        match total {
            Some(t) if written < t => Err(Attempt::Retry(anyhow!(
                "connection closed after {written} of {t} bytes"
            ))),
            _ => Ok(written),
        }
    }
}

/// `<dest>.part`.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`): the start and the total.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim();
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// Empties and removes a `.part` file that turned out wrong (a retry starts afresh).
fn discard(file: &File, part: &Path) {
    let _ = file.set_len(0);
    let _ = std::fs::remove_file(part);
}

/// Waits for an exclusive lock on `file` (released when it is closed), saying so when another
/// process holds it.
fn lock_exclusive(file: &File, path: &Path) -> Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: flock on a file descriptor this `File` owns for the duration of the call.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    tracing::info!(
        "{} is being downloaded by another process; waiting for it",
        path.display()
    );
    // SAFETY: as above.
    if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot lock {}", path.display()));
    }
    Ok(())
}

fn progress_bar(url: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "{msg} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {wide_bar}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    let name = url.rsplit('/').next().unwrap_or(url);
    bar.set_message(format!("downloading {name}"));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_are_parsed() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn part_file_sits_beside_the_destination() {
        assert_eq!(
            part_path(Path::new("/a/b/model_state.pdparams")),
            Path::new("/a/b/model_state.pdparams.part")
        );
    }
}
