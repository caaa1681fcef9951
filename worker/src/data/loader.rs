//! The per-rank loader: decodes and augments on background threads, in a deterministic order,
//! with bounded prefetch, resumable from any (epoch, batch) position. The same threads put each
//! batch on the training device, so on a GPU the copy overlaps the step in progress instead of
//! starting it (on the CPU the tensors take the decoded vectors as they are, no copy).

use super::sampler::DistributedSampler;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
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
    /// The inputs on the loader's device; `None` when every sample of the batch was skipped.
    pub tensors: Option<BatchTensors>,
    /// Samples in the batch (fewer than asked when some were skipped).
    pub len: usize,
    /// The position of this batch.
    pub position: LoaderPosition,
    /// Samples that could not be used, with the reason.
    pub skipped: Vec<String>,
}

/// A batch's inputs, on the device the model trains on.
#[derive(Debug, Clone)]
pub struct BatchTensors {
    /// `[n, 3·S·S]` normalised pixels, each row a channel-major `[3, S, S]` image (f32).
    pub images: Tensor,
    /// `[n, context]` token ids (u32).
    pub tokens: Tensor,
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
    /// Starts `threads` workers at `start`, delivering batches on `device`. Batch `n` of the
    /// stream is built by worker `n % threads`, so the order never depends on timing.
    pub fn new(
        source: Arc<dyn CaptionSource>,
        sampler: DistributedSampler,
        tokenize: Tokenize,
        threads: usize,
        start: LoaderPosition,
        device: &Device,
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
            let (source, sampler, tokenize, stop, device) = (
                source.clone(),
                sampler.clone(),
                tokenize.clone(),
                stop.clone(),
                device.clone(),
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
                        let batch =
                            build_batch(source.as_ref(), indices, position, &tokenize, &device);
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
    device: &Device,
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
    // No rows when every sample was skipped (zero-size device buffers are not made).
    let tensors = match (images.len().checked_div(len), tokens.len().checked_div(len)) {
        (Some(pixels), Some(context)) => {
            let on_device = || -> candle_core::Result<BatchTensors> {
                Ok(BatchTensors {
                    images: Tensor::from_vec(images, (len, pixels), device)?,
                    tokens: Tensor::from_vec(tokens, (len, context), device)?,
                })
            };
            Some(on_device().with_context(|| {
                format!(
                    "putting batch {} of epoch {} on {}",
                    position.batch,
                    position.epoch,
                    crate::device::device_name(device)
                )
            })?)
        }
        _ => None,
    };
    Ok(Batch {
        tensors,
        len,
        position,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples whose pixels are their index; those in `bad` fail to load.
    struct Numbered {
        len: usize,
        bad: Vec<u64>,
    }

    impl CaptionSource for Numbered {
        fn len(&self) -> usize {
            self.len
        }
        fn load(&self, index: u64, _epoch: u64) -> Result<Sample> {
            if self.bad.contains(&index) {
                bail!("unreadable");
            }
            Ok(Sample {
                pixels: vec![index as f32; 3 * 2 * 2],
                caption: format!("sample {index}"),
            })
        }
        fn describe(&self, index: u64) -> String {
            format!("sample {index}")
        }
    }

    #[test]
    fn batches_arrive_as_tensors_in_order_and_a_fully_skipped_batch_has_none() {
        let sampler = DistributedSampler::new(8, 3, 2, 0, 1).unwrap();
        let order = sampler.permutation(0);
        // The whole first batch and one sample of the third fail.
        let bad = vec![order[0], order[1], order[4]];
        let source = Arc::new(Numbered {
            len: 8,
            bad: bad.clone(),
        });
        let mut loader = Loader::new(
            source,
            sampler,
            Arc::new(|c: &str| vec![c.len() as u32; 3]),
            3,
            LoaderPosition::default(),
            &Device::Cpu,
        )
        .unwrap();
        for b in 0..4 {
            let batch = loader.next_batch().unwrap();
            assert_eq!(batch.position.batch, b);
            let want: Vec<u64> = order[2 * b..2 * b + 2]
                .iter()
                .copied()
                .filter(|i| !bad.contains(i))
                .collect();
            assert_eq!(batch.len, want.len());
            assert_eq!(batch.skipped.len(), 2 - want.len());
            match batch.tensors {
                None => assert!(want.is_empty(), "batch {b} lost its samples"),
                Some(t) => {
                    assert_eq!(t.images.dims(), &[want.len(), 12]);
                    assert_eq!(t.tokens.dims(), &[want.len(), 3]);
                    let firsts: Vec<f32> = t
                        .images
                        .to_vec2::<f32>()
                        .unwrap()
                        .iter()
                        .map(|row| row[0])
                        .collect();
                    let want: Vec<f32> = want.iter().map(|&i| i as f32).collect();
                    assert_eq!(firsts, want, "batch {b}");
                }
            }
        }
    }
}
