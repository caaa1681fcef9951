//! Evaluation's images in batches, for every command that reads image files (zero-shot,
//! retrieval, captioning, `embed`, `caption`): decoded and transformed on
//! `--dataloader_num_workers` threads ahead of the model, in order, and put on the model's
//! device by the thread that decoded them, as the training loader does. The model's forward
//! pass then does not wait for its batch to be decoded (nor, on a GPU, copied to the device):
//! one B-32 forward pass on a GPU embeds images far faster than one CPU thread decodes them.

use crate::data::preprocess::open_image;
use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc;

/// Decoded batches waiting for the model (one more is being decoded meanwhile).
const READY_AHEAD: usize = 1;

/// A progress bar taken off the terminal however the work ends.
struct ClearedOnDrop(ProgressBar);

impl Drop for ClearedOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// How the images of an evaluation are read (the seed's `--per_device_eval_batch_size`,
/// `--dataloader_num_workers`, `--disable_tqdm`).
#[derive(Debug, Clone, Copy)]
pub struct ImageBatches {
    /// Images per forward pass.
    pub batch_size: usize,
    /// Threads decoding and transforming images ahead of the model (0: the calling thread
    /// decodes each batch just before its forward pass).
    pub decode_threads: usize,
    /// A progress bar on stderr (drawn only when stderr is a terminal; callers set it on one
    /// rank).
    pub progress: bool,
}

impl ImageBatches {
    /// `batch_size` images per pass, decoded by the calling thread, without a progress bar.
    pub fn serial(batch_size: usize) -> Self {
        Self {
            batch_size,
            decode_threads: 0,
            progress: false,
        }
    }

    /// Calls `each(range, images, labels)` for consecutive batches of `count` images, in
    /// order: `images` `[n, 3, image_size, image_size]` on `device`, image `i` and its label
    /// being `decode(i)` (pixels as [`crate::data::preprocess::LoadedImage::eval_transform`]
    /// makes them). Stops at the first error of `decode` or `each` and returns it; the
    /// decoding threads stop with it. The progress bar, if any, is labelled `what`.
    pub fn for_each<L: Send>(
        &self,
        what: &str,
        count: usize,
        image_size: usize,
        device: &Device,
        decode: impl Fn(usize) -> Result<(Vec<f32>, L)> + Sync,
        mut each: impl FnMut(Range<usize>, Tensor, Vec<L>) -> Result<()>,
    ) -> Result<()> {
        ensure!(self.batch_size > 0, "the batch size must be positive");
        let bar = ClearedOnDrop(self.progress_bar(what, count));
        let mut each = |range: Range<usize>, images: Tensor, labels: Vec<L>| -> Result<()> {
            let n = range.len() as u64;
            each(range, images, labels)?;
            bar.0.inc(n);
            Ok(())
        };
        let ranges = (0..count)
            .step_by(self.batch_size)
            .map(|start| start..(start + self.batch_size).min(count));
        let batch = |range: Range<usize>, pool: Option<&rayon::ThreadPool>| {
            let decoded: Vec<(Vec<f32>, L)> = match pool {
                Some(pool) => {
                    pool.install(|| range.into_par_iter().map(&decode).collect::<Result<_>>())?
                }
                None => range.map(&decode).collect::<Result<_>>()?,
            };
            let n = decoded.len();
            let mut pixels = Vec::with_capacity(n * 3 * image_size * image_size);
            let mut labels = Vec::with_capacity(n);
            for (image, label) in decoded {
                pixels.extend(image);
                labels.push(label);
            }
            let images = Tensor::from_vec(pixels, (n, 3, image_size, image_size), device)?;
            Ok::<_, anyhow::Error>((images, labels))
        };
        if self.decode_threads == 0 {
            for range in ranges {
                let (images, labels) = batch(range.clone(), None)?;
                each(range, images, labels)?;
            }
            return Ok(());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.decode_threads)
            .thread_name(|i| format!("eval-decode-{i}"))
            .build()
            .context("cannot start the --dataloader_num_workers threads")?;
        std::thread::scope(|scope| {
            let (ready, batches) = mpsc::sync_channel(READY_AHEAD);
            let producer = std::thread::Builder::new()
                .name("eval-batches".into())
                .spawn_scoped(scope, || {
                    for range in ranges {
                        let made = batch(range.clone(), Some(&pool)).map(|b| (range, b));
                        let failed = made.is_err();
                        // The consumer stopped (an error of its own): so does the decoding.
                        if ready.send(made).is_err() || failed {
                            break;
                        }
                    }
                    drop(ready);
                })
                .context("cannot start the image decoding thread")?;
            let mut outcome = Ok(());
            for made in batches.iter() {
                if let Err(e) =
                    made.and_then(|(range, (images, labels))| each(range, images, labels))
                {
                    outcome = Err(e);
                    break;
                }
            }
            drop(batches);
            if producer.join().is_err() {
                outcome = outcome.and(Err(anyhow::anyhow!("the image decoding thread panicked")));
            }
            outcome
        })
    }

    /// A bar of `count` images labelled `what`, or a hidden one without `progress`.
    fn progress_bar(&self, what: &str, count: usize) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(count as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} images [{elapsed} < {eta}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(what.to_string());
        bar
    }

    /// [`Self::for_each`] over image files: `each(range, images)` for consecutive batches of
    /// `paths`. A file that cannot be read or decoded is an error naming it.
    pub fn for_each_file(
        &self,
        what: &str,
        paths: &[PathBuf],
        image_size: usize,
        device: &Device,
        mut each: impl FnMut(Range<usize>, Tensor) -> Result<()>,
    ) -> Result<()> {
        self.for_each(
            what,
            paths.len(),
            image_size,
            device,
            |i| Ok((open_image(&paths[i])?.eval_transform(image_size), ())),
            |range, images, _| each(range, images),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SIZE: usize = 2;

    /// Image `i`: every pixel `i`, labelled `10 i`.
    fn synthetic(i: usize) -> Result<(Vec<f32>, usize)> {
        Ok((vec![i as f32; 3 * SIZE * SIZE], 10 * i))
    }

    fn batches(
        threads: usize,
        batch_size: usize,
        count: usize,
    ) -> Vec<(Range<usize>, Vec<f32>, Vec<usize>)> {
        let mut seen = Vec::new();
        let opts = ImageBatches {
            batch_size,
            decode_threads: threads,
            progress: false,
        };
        opts.for_each(
            "test",
            count,
            SIZE,
            &Device::Cpu,
            synthetic,
            |range, images, labels| {
                assert_eq!(images.dims(), [range.len(), 3, SIZE, SIZE]);
                seen.push((range, images.flatten_all()?.to_vec1::<f32>()?, labels));
                Ok(())
            },
        )
        .unwrap();
        seen
    }

    #[test]
    fn every_thread_count_gives_the_same_batches_in_order() {
        let serial = batches(0, 4, 10);
        let ranges: Vec<_> = serial.iter().map(|(r, _, _)| r.clone()).collect();
        assert_eq!(ranges, [0..4, 4..8, 8..10]);
        for (range, pixels, labels) in &serial {
            let expected: Vec<f32> = range
                .clone()
                .flat_map(|i| vec![i as f32; 3 * SIZE * SIZE])
                .collect();
            assert_eq!(pixels, &expected);
            assert_eq!(labels, &range.clone().map(|i| 10 * i).collect::<Vec<_>>());
        }
        for threads in [1, 3] {
            assert_eq!(
                batches(threads, 4, 10),
                serial,
                "{threads} decoding threads"
            );
        }
        assert!(batches(2, 4, 0).is_empty());
        let zero = ImageBatches::serial(0).for_each(
            "test",
            3,
            SIZE,
            &Device::Cpu,
            synthetic,
            |_, _, _| Ok(()),
        );
        assert!(format!("{:#}", zero.unwrap_err()).contains("batch size must be positive"));
    }

    #[test]
    fn a_decoding_error_stops_the_batches_and_is_returned() {
        for threads in [0, 2] {
            let opts = ImageBatches {
                batch_size: 3,
                decode_threads: threads,
                progress: false,
            };
            let mut delivered = Vec::new();
            let result = opts.for_each(
                "test",
                20,
                SIZE,
                &Device::Cpu,
                |i| match i {
                    7 => anyhow::bail!("image {i} is corrupt"),
                    _ => synthetic(i),
                },
                |range, _, _| {
                    delivered.push(range);
                    Ok(())
                },
            );
            let message = format!("{:#}", result.unwrap_err());
            assert!(message.contains("image 7 is corrupt"), "{message}");
            assert_eq!(delivered, [0..3, 3..6], "{threads} decoding threads");
        }
    }

    #[test]
    fn an_error_of_the_consumer_stops_the_decoding() {
        let decoded = AtomicUsize::new(0);
        let opts = ImageBatches {
            batch_size: 2,
            decode_threads: 2,
            progress: false,
        };
        let mut calls = 0;
        let result = opts.for_each(
            "test",
            1000,
            SIZE,
            &Device::Cpu,
            |i| {
                decoded.fetch_add(1, Ordering::Relaxed);
                synthetic(i)
            },
            |_, _, _| {
                calls += 1;
                match calls {
                    2 => anyhow::bail!("the model failed"),
                    _ => Ok(()),
                }
            },
        );
        assert!(format!("{:#}", result.unwrap_err()).contains("the model failed"));
        // Two batches consumed, one ready and one being decoded when the consumer stopped, and
        // one more the decoding thread may have finished before it saw the stop.
        let decoded = decoded.load(Ordering::Relaxed);
        assert!(
            decoded <= 2 * 5,
            "{decoded} images decoded after the consumer stopped"
        );
    }
}
