//! The per-rank loader: decodes and augments on background threads, in a deterministic order,
//! with bounded prefetch, resumable from any (epoch, batch) position.

use super::sampler::DistributedSampler;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Batches each loader thread may have ready ahead of the training loop.
const PREFETCH_PER_THREAD: usize = 2;

/// One decoded, transformed sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `[3, S, S]` normalised pixels, channel-major.
    pub pixels: Vec<f32>,
    pub caption: String,
}

/// A map-style data set of captioned images.
pub trait CaptionSource: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `index`, transformed for `epoch` (augmentation is keyed by seed, epoch and index
    /// only, never by thread or rank).
    fn load(&self, index: u64, epoch: u64) -> Result<Sample>;
    /// Where sample `index` comes from (file and line), for bad-input reports.
    fn describe(&self, index: u64) -> String;
}

/// Where a loader is in its stream of batches; stored in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoaderPosition {
    pub epoch: u64,
    /// Next batch within the epoch.
    pub batch: usize,
}

/// A training batch for this rank.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[n, 3, S, S]` pixels.
    pub images: Vec<f32>,
    /// `[n, context]` token ids.
    pub tokens: Vec<u32>,
    /// Samples in the batch (fewer than asked when some were skipped).
    pub len: usize,
    /// The position of this batch.
    pub position: LoaderPosition,
    /// Samples that could not be used, with the reason.
    pub skipped: Vec<String>,
}

/// Turns a caption into exactly `context` token ids.
pub type Tokenize = Arc<dyn Fn(&str) -> Vec<u32> + Send + Sync>;

/// Background threads producing this rank's batches in order.
pub struct Loader {
    receivers: Vec<Receiver<Result<Batch>>>,
    next: usize,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    batches_per_epoch: usize,
}

impl Loader {
    /// Starts `threads` workers at `start`. Batch `n` of the stream is built by worker
    /// `n % threads`, so the order never depends on timing.
    pub fn new(
        source: Arc<dyn CaptionSource>,
        sampler: DistributedSampler,
        tokenize: Tokenize,
        threads: usize,
        start: LoaderPosition,
    ) -> Result<Self> {
        if source.is_empty() {
            bail!("the data set yields no samples");
        }
        let threads = threads.max(1);
        let batches_per_epoch = sampler.batches_per_epoch();
        if start.batch >= batches_per_epoch {
            bail!(
                "loader position batch {} is past the {batches_per_epoch} batches of an epoch",
                start.batch
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        for worker in 0..threads {
            let (tx, rx) = sync_channel(PREFETCH_PER_THREAD);
            receivers.push(rx);
            let (source, sampler, tokenize, stop) = (
                source.clone(),
                sampler.clone(),
                tokenize.clone(),
                stop.clone(),
            );
            let handle = std::thread::Builder::new()
                .name(format!("coca-loader-{worker}"))
                .spawn(move || {
                    let first = start.epoch as usize * batches_per_epoch + start.batch;
                    let mut perm_epoch = u64::MAX;
                    let mut perm = Vec::new();
                    let mut n = first + worker;
                    while !stop.load(Ordering::Relaxed) {
                        let position = LoaderPosition {
                            epoch: (n / batches_per_epoch) as u64,
                            batch: n % batches_per_epoch,
                        };
                        if position.epoch != perm_epoch {
                            perm = sampler.permutation(position.epoch);
                            perm_epoch = position.epoch;
                        }
                        let indices = sampler.rank_slice(&perm, position.batch);
                        let batch = build_batch(source.as_ref(), indices, position, &tokenize);
                        if tx.send(batch).is_err() {
                            return;
                        }
                        n += threads;
                    }
                })?;
            handles.push(handle);
        }
        Ok(Self {
            receivers,
            next: 0,
            stop,
            threads: handles,
            batches_per_epoch,
        })
    }

    /// Full batches per epoch for this rank.
    pub fn batches_per_epoch(&self) -> usize {
        self.batches_per_epoch
    }

    /// The next batch in the stream (epochs follow one another without end).
    pub fn next_batch(&mut self) -> Result<Batch> {
        let rx = &self.receivers[self.next % self.receivers.len()];
        self.next += 1;
        match rx.recv() {
            Ok(batch) => batch,
            Err(_) => bail!("a loader thread stopped unexpectedly"),
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receivers unblocks workers waiting to send.
        self.receivers.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn build_batch(
    source: &dyn CaptionSource,
    indices: &[u64],
    position: LoaderPosition,
    tokenize: &Tokenize,
) -> Result<Batch> {
    let mut images = Vec::new();
    let mut tokens = Vec::new();
    let mut skipped = Vec::new();
    let mut len = 0;
    for &index in indices {
        match source.load(index, position.epoch) {
            Ok(sample) if sample.caption.trim().is_empty() => {
                skipped.push(format!("{}: empty caption", source.describe(index)));
            }
            Ok(sample) => {
                images.extend_from_slice(&sample.pixels);
                tokens.extend(tokenize(&sample.caption));
                len += 1;
            }
            Err(e) => skipped.push(format!("{}: {e:#}", source.describe(index))),
        }
    }
    Ok(Batch {
        images,
        tokens,
        len,
        position,
        skipped,
    })
}
