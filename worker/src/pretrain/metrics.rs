//! What a person sees of a run: the progress bar (only when stderr is a terminal), a metrics line
//! every `--logging_steps` (also appended to `output_dir/metrics.jsonl` and to TensorBoard event
//! files under `output_dir/runs/`), and a loss-curve PNG at the end.

use super::tensorboard::EventWriter;
use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

/// One logged optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub contrastive_loss: f64,
    pub caption_loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub samples_per_s: f64,
    pub skipped_samples: usize,
}

/// The progress bar and the metrics file.
pub struct RunLog {
    bar: ProgressBar,
    /// `--disable_tqdm`, or stderr is not a terminal: lines go straight to stderr (a hidden
    /// bar drops them).
    hidden: bool,
    /// `None` on ranks other than 0: one rank writes the shared files.
    jsonl: Option<PathBuf>,
    tensorboard: Option<EventWriter>,
    history: Vec<(u64, f64)>,
}

impl RunLog {
    /// A bar over `total_steps` starting at `start_step`, hidden with `--disable_tqdm` and when
    /// stderr is not a terminal (a log file, a pipe, SLURM): then the metrics lines alone show
    /// progress.
    pub fn new(output_dir: &Path, start_step: u64, total_steps: u64, hidden: bool) -> Result<Self> {
        let hidden = hidden || !std::io::stderr().is_terminal();
        Self::create(output_dir, start_step, total_steps, hidden, true)
    }

    /// For ranks other than 0: metrics lines on stderr (the rank's log), no bar, no files.
    pub fn lines_only(output_dir: &Path, start_step: u64, total_steps: u64) -> Result<Self> {
        Self::create(output_dir, start_step, total_steps, true, false)
    }

    fn create(
        output_dir: &Path,
        start_step: u64,
        total_steps: u64,
        hidden: bool,
        files: bool,
    ) -> Result<Self> {
        std::fs::create_dir_all(output_dir)
            .with_context(|| format!("cannot create {}", output_dir.display()))?;
        let bar = ProgressBar::with_draw_target(
            Some(total_steps),
            if hidden {
                ProgressDrawTarget::hidden()
            } else {
                ProgressDrawTarget::stderr()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .context("progress bar template")?,
        );
        bar.set_position(start_step);
        Ok(Self {
            bar,
            hidden,
            jsonl: files.then(|| output_dir.join("metrics.jsonl")),
            tensorboard: if files {
                Some(EventWriter::create(output_dir)?)
            } else {
                None
            },
            history: Vec::new(),
        })
    }

    /// Updates the bar after a step.
    pub fn step(&mut self, m: &StepMetrics) {
        self.history.push((m.step, m.loss));
        self.bar.set_position(m.step);
        self.bar.set_message(format!(
            "loss {:.4} (con {:.4} cap {:.4}) lr {:.2e} {:.1} samples/s",
            m.loss, m.contrastive_loss, m.caption_loss, m.learning_rate, m.samples_per_s
        ));
    }

    /// Prints a metrics line and appends it to `metrics.jsonl` and the TensorBoard events.
    pub fn log(&mut self, m: &StepMetrics) -> Result<()> {
        let line = serde_json::to_string(m)?;
        self.println(format!(
            "step {} epoch {:.2}: loss {:.4} contrastive {:.4} caption {:.4} lr {:.3e} grad_norm {:.3} {:.1} samples/s",
            m.step, m.epoch, m.loss, m.contrastive_loss, m.caption_loss, m.learning_rate, m.grad_norm, m.samples_per_s
        ));
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(
                m.step,
                &[
                    ("train/loss", m.loss),
                    ("train/contrastive_loss", m.contrastive_loss),
                    ("train/caption_loss", m.caption_loss),
                    ("train/learning_rate", m.learning_rate),
                    ("train/grad_norm", m.grad_norm),
                    ("train/samples_per_s", m.samples_per_s),
                ],
            )?;
        }
        self.append(&line)
    }

    /// Appends one JSON line to `metrics.jsonl` (rank 0 only).
    fn append(&self, line: &str) -> Result<()> {
        let Some(path) = &self.jsonl else {
            return Ok(());
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Prints a zero-shot evaluation and appends it to `metrics.jsonl` and the TensorBoard
    /// events.
    pub fn log_eval(
        &mut self,
        step: u64,
        result: &crate::eval::classification::ClassificationResult,
    ) -> Result<()> {
        let top5 = result.top5.map_or("-".to_string(), |v| format!("{v:.2}%"));
        self.println(format!(
            "step {step}: zero-shot on {} images, {} classes: top-1 {:.2}% top-5 {top5}",
            result.images, result.classes, result.top1
        ));
        if let Some(tb) = &mut self.tensorboard {
            let mut scalars = vec![("eval/zeroshot_top1", result.top1)];
            scalars.extend(result.top5.map(|v| ("eval/zeroshot_top5", v)));
            tb.scalars(step, &scalars)?;
        }
        let line = serde_json::json!({
            "step": step,
            "zeroshot_top1": result.top1,
            "zeroshot_top5": result.top5,
            "zeroshot_images": result.images,
        });
        self.append(&line.to_string())
    }

    /// Prints a line above the bar.
    pub fn println(&self, line: impl AsRef<str>) {
        if self.hidden {
            eprintln!("{}", line.as_ref());
        } else {
            self.bar.println(line.as_ref());
        }
    }

    /// Closes the bar and draws the loss curve of this run's steps into `path`.
    pub fn finish(self, path: &Path) -> Result<()> {
        self.bar.finish_and_clear();
        if self.history.len() >= 2 && self.jsonl.is_some() {
            draw_curve(&self.history, path)?;
        }
        Ok(())
    }
}

/// A plain line plot of loss against step (axes, grid, the curve; no text).
fn draw_curve(points: &[(u64, f64)], path: &Path) -> Result<()> {
    let (w, h, margin) = (640u32, 400u32, 30u32);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let finite: Vec<&(u64, f64)> = points.iter().filter(|p| p.1.is_finite()).collect();
    let (x0, x1) = (
        points[0].0 as f64,
        points[points.len() - 1].0.max(points[0].0 + 1) as f64,
    );
    let y_max = finite.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let y_min = finite.iter().map(|p| p.1).fold(f64::MAX, f64::min).min(0.0);
    let span = (y_max - y_min).max(1e-9);
    let to_px = |step: f64, loss: f64| -> (f64, f64) {
        let x = margin as f64 + (step - x0) / (x1 - x0) * (w - 2 * margin) as f64;
        let y = (h - margin) as f64 - (loss - y_min) / span * (h - 2 * margin) as f64;
        (x, y)
    };
    for i in 0..=4 {
        let y = margin + i * (h - 2 * margin) / 4;
        for x in margin..w - margin {
            img.put_pixel(x, y, Rgb([225, 225, 225]));
        }
    }
    for x in margin..w - margin {
        img.put_pixel(x, h - margin, Rgb([0, 0, 0]));
    }
    for y in margin..=h - margin {
        img.put_pixel(margin, y, Rgb([0, 0, 0]));
    }
    for pair in finite.windows(2) {
        let (a, b) = (
            to_px(pair[0].0 as f64, pair[0].1),
            to_px(pair[1].0 as f64, pair[1].1),
        );
        let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
        for k in 0..=n {
            let t = k as f64 / n as f64;
            let (x, y) = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
            for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                let (px, py) = (x as i64 + dx, y as i64 + dy);
                if px >= 0 && py >= 0 && (px as u32) < w && (py as u32) < h {
                    img.put_pixel(px as u32, py as u32, Rgb([31, 119, 180]));
                }
            }
        }
    }
    img.save(path)
        .with_context(|| format!("cannot write {}", path.display()))
}
