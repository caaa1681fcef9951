//! `coca-worker bench`: training-step, embedding and captioning speed on random inputs.
//!
//! A benchmark, not a test: it prints one JSON line that the README's tables are made from.

use crate::distributed::context::RankContext;
use crate::eval::generate::kernels::{linear, F32View, Matrix};
use crate::eval::generate::{
    generate_using, generate_with, DecodePrecision, DecodeWeights, Decoding, GenerateOptions,
    GenerationType,
};
use crate::kernel_profile::KernelWindows;
use crate::model::autocast::Autocast;
use crate::model::tensor_parallel::TensorParallel;
use crate::model::{CoCa, CocaConfig, CocaLossConfig};
use crate::train::adamw::AdamWConfig;
use crate::train::groups::TowerGroups;
use crate::train::schedule::CosineSchedule;
use crate::train::trainable::trainable_model_parallel;
use crate::train::trainer::{Trainer, TrainerConfig};
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::time::Instant;

/// What `bench` measures.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: String,
    pub batch: usize,
    pub steps: usize,
    /// Tensor-parallel degree (run under `coca-launch` with that many workers); above 1 only
    /// the training step is measured.
    pub tensor_parallel_degree: usize,
    /// Whether to measure caption latency too (it takes longer than the rest).
    pub captions: bool,
    /// Whether the model computes its matrix products in bfloat16 (autocast).
    pub bf16: bool,
    /// Where to compute (`--device`).
    pub device: crate::device::DeviceArgs,
    /// Activation checkpointing in the training step.
    pub grad_checkpointing: bool,
}

/// Random normalised images `[B, 3, S, S]` and token rows `[B, T]` shaped like real captions:
/// sot, words, eot, then padding.
pub fn random_batch(
    config: &CocaConfig,
    batch: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let s = config.vision_cfg.image_size;
    let images = Tensor::randn(0f32, 1.0, (batch, 3, s, s), device)?;
    let t = config.text_cfg.context_length;
    let vocab = config.text_cfg.vocab_size as u32;
    let mut ids = vec![0u32; batch * t];
    let mut rng = crate::rng::SplitMix64(0x2545_F491_4F6C_DD1D);
    for (b, row) in ids.chunks_mut(t).enumerate() {
        let len = 2 + (b * 7 + 5) % (t - 1);
        for (i, id) in row.iter_mut().enumerate().take(len) {
            *id = match i {
                0 => 49406.min(vocab - 2),
                _ if i + 1 == len => 49407.min(vocab - 1),
                _ => 1 + rng.below(vocab as u64 - 3) as u32,
            };
        }
    }
    Ok((images, Tensor::from_vec(ids, (batch, t), device)?))
}

/// Minor page faults of this process so far (first touches of fresh heap memory show here: on
/// some virtual machines each costs tens of microseconds, which the step times then include).
fn minor_page_faults() -> i64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    usage.ru_minflt
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Median seconds of a greedy caption of `image` on the device's tensor cache,
/// [`CAPTION_TOKENS`] new tokens.
fn device_caption_latency(model: &CoCa, image: &Tensor, steps: usize) -> Result<f64> {
    let caption_len = (CAPTION_TOKENS + 1).min(model.config.text_cfg.context_length);
    let greedy = GenerateOptions {
        generation_type: GenerationType::Greedy,
        seq_len: caption_len,
        min_seq_len: caption_len - 1,
        ..GenerateOptions::default()
    };
    let decoding = Decoding::new(model, DecodePrecision::F32)?;
    let mut times = Vec::new();
    for step in 0..=steps {
        let start = Instant::now();
        generate_using(&decoding, image, &greedy)?;
        model.device().synchronize()?;
        if step > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// `cpu` or `cuda:N`, for the report.
/// New tokens generated for the caption-latency figure.
pub const CAPTION_TOKENS: usize = 20;

/// Runs the benchmark and returns its JSON line (`None` on ranks other than 0): the median training step (forward, backward,
/// clipping and AdamW), image embedding throughput, and greedy caption latency for one image (on the key/value cache, and
/// recomputing the prefix each step as open_clip does).
pub fn run(opts: &BenchOptions) -> Result<Option<serde_json::Value>> {
    ensure!(
        opts.batch > 0 && opts.steps > 0,
        "--batch and --steps must be positive"
    );
    let config = CocaConfig::resolve(&opts.model)?;
    let device = opts.device.open()?;
    let ctx = RankContext::from_env(opts.tensor_parallel_degree, 1)?;
    ensure!(
        ctx.topology.dp == 1,
        "bench measures one model: run it with --tensor_parallel_degree equal to the number of \
         workers"
    );
    let autocast = Autocast::new(if opts.bf16 { DType::BF16 } else { DType::F32 });
    let tp = TensorParallel::new(ctx.tensor.clone()).with_autocast(autocast);
    let (mut model, vars) = trainable_model_parallel(&config, None, 0, DType::F32, &device, &tp)?;
    model.set_grad_checkpointing(opts.grad_checkpointing);
    let (images, text) = random_batch(&config, opts.batch, &device)?;
    let trainer_config = TrainerConfig {
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        schedule: CosineSchedule {
            warmup_steps: 0,
            total_steps: opts.steps as u64 + 1,
        },
        loss: CocaLossConfig::default(),
        span: Default::default(),
        buffers: crate::comm::PlacementRule::from_env()?,
    };
    let mut trainer = Trainer::new(
        model,
        &vars,
        &TowerGroups::uniform(1e-5, 0.1),
        trainer_config,
    )?;
    let mut step_times = Vec::new();
    let mut step_faults = Vec::new();
    // The step's two calls, timed apart: forward + loss + backward (+ the flat gradient), then
    // clipping + AdamW.
    let (mut backward_times, mut update_times) = (Vec::new(), Vec::new());
    // Windows in the GPU kernel timeline, when scripts/cuda/kernel_profile.c records one.
    let windows = KernelWindows::from_env();
    for step in 0..=opts.steps {
        let (start, faults) = (Instant::now(), minor_page_faults());
        windows.open(c"forward_backward", step > 0);
        trainer.backward(&images, &text, 1.0)?;
        device.synchronize()?;
        windows.close(step > 0);
        let backward_done = start.elapsed().as_secs_f64();
        windows.open(c"update", step > 0);
        trainer.update()?;
        device.synchronize()?;
        windows.close(step > 0);
        if step > 0 {
            let total = start.elapsed().as_secs_f64();
            step_times.push(total);
            step_faults.push(minor_page_faults() - faults);
            backward_times.push(backward_done);
            update_times.push(total - backward_done);
        }
    }
    let step = median(step_times.clone());
    // The most bytes the device's tensors held during training (open_clip's bench reports
    // torch's `max_memory_allocated`, the same measure); the card's memory in use, below,
    // also counts what the pool keeps reserved.
    let device_peak = crate::cuda_setup::pool_usage(&device)?.map(|(_, high)| high);
    if !tp.is_single() {
        return Ok(ctx.is_main().then(|| {
            serde_json::json!({
                "model": opts.model,
                "batch": opts.batch,
                "steps": opts.steps,
                "tensor_parallel_degree": tp.size(),
                "grad_checkpointing": opts.grad_checkpointing,
                "threads_per_rank": rayon::current_num_threads(),
                "train_step_s": step,
                "train_samples_per_s": opts.batch as f64 / step,
            })
        }));
    }
    // Inference over detached weights records no graph; under --bf16 it computes in bf16, as
    // open_clip's embedding under torch.autocast does.
    let weights: HashMap<String, Tensor> = vars.tensors().into_iter().collect();
    let frozen = CoCa::new_parallel(
        &config,
        VarBuilder::from_tensors(weights, DType::F32, &device),
        &tp,
    )?;
    // The forward pass and the loss alone (the same arithmetic as the step's, without the
    // graph's bookkeeping), so the step splits into forward, backward and optimizer.
    let mut forward_times = Vec::new();
    for step in 0..=opts.steps {
        let start = Instant::now();
        windows.open(c"forward", step > 0);
        let out = frozen.forward(&images, &text)?;
        crate::model::coca_loss(&out, &CocaLossConfig::default())?;
        device.synchronize()?;
        windows.close(step > 0);
        if step > 0 {
            forward_times.push(start.elapsed().as_secs_f64());
        }
    }
    let forward = median(forward_times);
    let phases = serde_json::json!({
        "forward_and_loss_s": forward,
        "backward_s": (median(backward_times) - forward).max(0.0),
        "optimizer_s": median(update_times),
    });
    let mut embed_times = Vec::new();
    for step in 0..=opts.steps {
        let start = Instant::now();
        windows.open(c"embed", step > 0);
        frozen.image_features(&images)?;
        device.synchronize()?;
        windows.close(step > 0);
        if step > 0 {
            embed_times.push(start.elapsed().as_secs_f64());
        }
    }
    let flops = crate::model::flops::train_per_sample(&config) * opts.batch as f64;
    let mut report = serde_json::json!({
        "model": opts.model,
        "batch": opts.batch,
        "steps": opts.steps,
        "device": crate::device::device_name(&device),
        "tf32": opts.device.tf32,
        "bf16": opts.bf16,
        "threads": rayon::current_num_threads(),
        "grad_checkpointing": opts.grad_checkpointing,
        "cpu_model": crate::simd::cpu_model(),
        "cpu_kernels": crate::simd::KernelFamily::active().name(),
        "heap_huge_pages": crate::runtime::heap_on_huge_pages(),
        "gemm_kernels": crate::simd::gemm_family(),
        "bf16_product_kernels": crate::simd::bf16_product_kernels(),
        "train_step_s": step,
        "train_step_times_s": step_times,
        "train_page_faults_per_step": step_faults,
        "train_phases_s": phases,
        "train_samples_per_s": opts.batch as f64 / step,
        "train_model_flops_per_step": flops,
        "train_tflops": flops / step / 1e12,
        "device_memory_peak_bytes": device_peak,
        "device_memory_in_use_bytes": crate::cuda_setup::memory_in_use(&device)?,
        "embed_images_per_s": opts.batch as f64 / median(embed_times),
    });
    if !device.is_cpu() && opts.captions {
        // The decoding row kernels are the CPU's: on a device, greedy captioning on the
        // key/value cache as tensors.
        if let Some(report) = report.as_object_mut() {
            report.insert(
                "greedy_caption_s".into(),
                device_caption_latency(&frozen, &images.narrow(0, 0, 1)?, opts.steps)?.into(),
            );
        }
        return Ok(Some(report));
    }
    if !opts.captions {
        return Ok(Some(report));
    }
    if let (Some(report), serde_json::Value::Object(caption)) = (
        report.as_object_mut(),
        caption_latency(&frozen, &images.narrow(0, 0, 1)?, opts.steps)?,
    ) {
        report.extend(caption);
    }
    Ok(Some(report))
}

/// Greedy caption latency for `image` (`[1, 3, S, S]`), CAPTION_TOKENS new tokens as
/// open_clip's `generate` makes them, median of `steps` after a warm-up: on the key/value cache
/// with float32 and with bfloat16 decoding weights (built once and moved onto huge pages, as
/// a long `eval --captioning` run does; the build times are reported), and
/// recomputing the prefix (open_clip's way); beam search as `caption` runs it by default; the
/// image encoding alone and the bandwidth floor of the float32 decoding steps, probed right
/// after each float32 caption.
fn caption_latency(model: &CoCa, image: &Tensor, steps: usize) -> Result<serde_json::Value> {
    let config = &model.config;
    let caption_len = (CAPTION_TOKENS + 1).min(config.text_cfg.context_length);
    // Greedy with end-of-text forbidden until the last position: exactly CAPTION_TOKENS new.
    let greedy = GenerateOptions {
        generation_type: GenerationType::Greedy,
        seq_len: caption_len,
        min_seq_len: caption_len - 1,
        ..GenerateOptions::default()
    };
    let start = Instant::now();
    let f32_weights = DecodeWeights::new(model, DecodePrecision::F32)?;
    f32_weights.move_to_huge_pages();
    let bytes_per_step = f32_weights.bytes_per_step();
    // The bench measures the row kernels: the CPU decoding, whatever the portable-ops switch.
    let f32_weights = Decoding::Kernels(Box::new(f32_weights));
    let f32_build = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let bf16_weights = DecodeWeights::new(model, DecodePrecision::Bf16)?;
    bf16_weights.move_to_huge_pages();
    let bf16_weights = Decoding::Kernels(Box::new(bf16_weights));
    let bf16_build = start.elapsed().as_secs_f64();
    let bf16 = GenerateOptions {
        decode_precision: DecodePrecision::Bf16,
        ..greedy.clone()
    };
    let timed = |run: &dyn Fn() -> Result<()>| -> Result<f64> {
        let mut times = Vec::new();
        for step in 0..=steps {
            let start = Instant::now();
            run()?;
            if step > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        Ok(median(times))
    };
    let encode = timed(&|| model.encode_image(image).map(drop).map_err(Into::into))?;
    // The host's memory bandwidth varies over seconds: each float32 caption is followed by a
    // probe of the streaming rate, so the floor is taken at the same moments.
    let probe = StreamProbe::new(bytes_per_step)?;
    let (mut cached_times, mut rates) = (Vec::new(), Vec::new());
    for step in 0..=steps {
        let start = Instant::now();
        generate_using(&f32_weights, image, &greedy)?;
        let elapsed = start.elapsed().as_secs_f64();
        let rate = probe.bytes_per_s()?;
        if step > 0 {
            cached_times.push(elapsed);
            rates.push(rate);
        }
    }
    let (cached, stream) = (median(cached_times), median(rates));
    let cached_bf16 = timed(&|| generate_using(&bf16_weights, image, &bf16).map(drop))?;
    let recompute = timed(&|| generate_with(model, image, &greedy, false).map(drop))?;
    // `caption`'s default: open_clip's beam search (6 beams in 3 groups), as long as greedy's.
    let beams = GenerateOptions {
        generation_type: GenerationType::BeamSearch,
        ..greedy.clone()
    };
    let beam = timed(&|| generate_using(&f32_weights, image, &beams).map(drop))?;
    // Steps that compute logits: the prefix starts at sot and the last token is eos.
    let logit_steps = caption_len - 2;
    Ok(serde_json::json!({
        "caption_new_tokens": caption_len - 1,
        "greedy_caption_s": cached,
        "greedy_caption_bf16_s": cached_bf16,
        "f32_decode_weights_build_s": f32_build,
        "bf16_decode_weights_build_s": bf16_build,
        "greedy_caption_recompute_s": recompute,
        "beam_caption_s": beam,
        "encode_one_image_s": encode,
        "decode_weight_bytes_per_step": bytes_per_step,
        "weight_stream_gb_s": stream / 1e9,
        "greedy_caption_decode_floor_s": logit_steps as f64 * bytes_per_step as f64 / stream,
    }))
}

/// How fast the decoding kernel streams float32 weights from memory: one row times a matrix
/// of as many bytes as a decoding step reads. Every float32 step reads that many bytes, so
/// `steps × bytes / rate` bounds greedy decoding from below at the moment of the probe.
struct StreamProbe {
    matrix: Tensor,
    x: Vec<f32>,
    bias: Vec<f32>,
}

impl StreamProbe {
    const WIDTH: usize = 512;

    /// A probe of `bytes`, on huge pages as the decoding weights are.
    fn new(bytes: usize) -> Result<Self> {
        let rows = bytes / std::mem::size_of::<f32>() / Self::WIDTH;
        let matrix = Tensor::ones((rows, Self::WIDTH), DType::F32, &Device::Cpu)?;
        // Advice: where the kernel declines, the probe and the weights both stay on 4 KiB pages.
        let _ = Matrix::F32(F32View::new(&matrix, "bandwidth probe")?).advise_huge_pages();
        Ok(Self {
            matrix,
            x: vec![1f32; Self::WIDTH],
            bias: vec![0f32; rows],
        })
    }

    /// Bytes per second of one pass.
    fn bytes_per_s(&self) -> Result<f64> {
        let matrix = Matrix::F32(F32View::new(&self.matrix, "bandwidth probe")?);
        let start = Instant::now();
        rayon::join(|| linear(&self.x, &matrix, &self.bias), || ()).0?;
        Ok(matrix.bytes() as f64 / start.elapsed().as_secs_f64())
    }
}
