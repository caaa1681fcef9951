//! `coca-worker`: one CoCa process (training, evaluation and tools); `coca-launch` runs one per
//! device, and it runs alone, as world size 1, for local work.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use coca_worker::cli::normalize_flag_spelling;
use coca_worker::cli::stdout::print_line;
use coca_worker::device::DeviceArgs;
use coca_worker::pretrain::args::PretrainArgs;
use coca_worker::{bench, bench_data, checkpoint, pretrain, runtime, verify};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "coca-worker",
    version,
    about = "CoCa training, evaluation and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train CoCa (the seed's flags). With no data flags: the built-in demo on synthetic data.
    Pretrain(Box<PretrainArgs>),
    /// Check this implementation against a reference folder exported from open_clip.
    Verify {
        /// Folder in the layout of shared/fixtures/coca-tiny (config.json, weights.safetensors,
        /// io.safetensors, extras.*).
        #[arg(long)]
        reference: PathBuf,
        /// A checkpoint (safetensors, torch .bin/.pt, paddle .pdparams) to check against the
        /// reference weights and to run the model sections with.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Each fused op against its composition of candle primitives on the device (forward and
    /// every gradient, float32/bf16/f16); prints one JSON line, exit 1 if one differs.
    Selftest {
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Convert a checkpoint (safetensors, torch .bin/.pt, paddle .pdparams) to open_clip-named
    /// safetensors.
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// Also check the tensors against this model config (a built-in name or a JSON file).
        #[arg(long)]
        model: Option<String>,
    },
    /// Time training steps, image embedding and greedy captioning on random inputs; prints one
    /// JSON line.
    Bench {
        /// A built-in config name or a config JSON file.
        #[arg(long, default_value = "coca_ViT-B-32")]
        model: String,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Timed steps after one warm-up step.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Split the model over this many workers (run under `coca-launch`); only the
        /// training step is measured then.
        #[arg(long, default_value_t = 1)]
        tensor_parallel_degree: usize,
        /// Also measure caption latency (`False`: training and embedding only, for profiling).
        #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "true", value_parser = coca_worker::cli::parse_bool)]
        captions: bool,
        /// The training step's matrix products in bfloat16 (autocast, as `pretrain --bf16`).
        #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = coca_worker::cli::parse_bool)]
        bf16: bool,
        #[command(flatten)]
        device: DeviceArgs,
        /// Activation checkpointing in the training step (as `pretrain --grad_checkpointing`).
        #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = coca_worker::cli::parse_bool)]
        grad_checkpointing: bool,
    },
    /// Evaluate: zero-shot classification, image-text retrieval, captioning; prints one JSON line per evaluation.
    Eval(Box<coca_worker::eval::cli::EvalArgs>),
    /// Write L2-normalised image or text embeddings to .safetensors or .npy.
    Embed(Box<coca_worker::eval::embed::EmbedArgs>),
    /// Caption images: prints `path<TAB>caption` per image.
    Caption(Box<coca_worker::eval::caption::CaptionArgs>),
    /// All-reduce bus bandwidth over the job's world (run under `coca-launch`); rank 0 prints
    /// one JSON line.
    BenchCollectives {
        /// Bytes per all-reduce (f32 elements × 4); several sizes comma-separated, one line
        /// each (e.g. 1048576,16777216,268435456,1073741824 for 1 MiB–1 GiB).
        #[arg(long, value_delimiter = ',', default_value = "67108864")]
        bytes: Vec<usize>,
        /// Where the buffers live: cpu (host rings), or cuda (NCCL in the NCCL build).
        #[command(flatten)]
        device: DeviceArgs,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        iters: usize,
    },
    /// Bytes of parameters, gradients and optimizer state per rank under ZeRO stage 1 and 2 and
    /// tensor parallelism, from the buffers of real trainers; one JSON line per layout.
    BenchMemory {
        #[arg(long, default_value = "coca_ViT-L-14")]
        model: String,
        /// Sharding degrees to report (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
        sharding: Vec<usize>,
        /// Tensor-parallel degrees to report (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "2,4")]
        tensor_parallel: Vec<usize>,
        /// Samples per micro-batch for the activation estimate; above 0, one training step of
        /// one process, and one of a member of each `--tensor_parallel` degree, is also run and
        /// its peak resident memory measured.
        #[arg(long, default_value_t = 0)]
        batch: usize,
        /// Activation checkpointing (as `pretrain --grad_checkpointing`).
        #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = coca_worker::cli::parse_bool)]
        grad_checkpointing: bool,
        /// `--bf16 True` / `--fp16 True` (as `pretrain`'s): the measured step and the estimate
        /// under autocast.
        #[command(flatten)]
        precision: coca_worker::cli::precision::PrecisionArgs,
        /// Where the measured step runs (with `--batch`): cpu, or cuda (device memory).
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Used by `coca-launch` before it starts any worker: parses a worker command and runs every
    /// check it can make without the model (the job's size comes from WORLD_SIZE); prints one
    /// JSON line with a training command's memory estimate per worker.
    #[command(hide = true)]
    CheckArgs {
        /// The worker command, as `coca-launch` would pass it.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Tokenizer strings/s and loader images/s (JPEG decode + train transform, 1 and 2
    /// threads); prints one JSON line.
    BenchData {
        #[arg(long, default_value_t = 256)]
        images: usize,
        #[arg(long, default_value_t = 224)]
        image_size: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
}

/// Exit code for a verification or data mismatch (2 is a usage or input error).
const EXIT_MISMATCH: u8 = 1;
const EXIT_ERROR: u8 = 2;

/// `check-args`: the checks of `command` that need no model, and the memory estimate of a
/// training command.
fn check_args(command: Vec<String>) -> Result<ExitCode> {
    let argv = std::iter::once("coca-worker".to_string()).chain(normalize_flag_spelling(command));
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        // `--help`, `--version`: the workers print them.
        Err(e) if !e.use_stderr() => {
            print_line(serde_json::json!({ "memory": null }))?;
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => {
            let _ = e.print();
            return Ok(ExitCode::from(EXIT_ERROR));
        }
    };
    let memory = match cli.command {
        Command::Pretrain(mut args) => {
            // An elastic job's launcher checks the per-device batch of its smallest layout too.
            pretrain::elastic::apply_launcher_batch(&mut args, |k| std::env::var(k).ok())?;
            let (world, _) = coca_worker::distributed::context::env_world_rank()?;
            let checked = pretrain::preflight::check(&args, world, 0)?;
            coca_worker::device::check_launched_kind()?;
            // A GPU worker's estimate is of its device memory (its own check at start compares
            // it with the card); the launcher checks only what it keeps on the host.
            let on_gpu = coca_worker::device::launched_for_gpu() || args.device.device.is_gpu();
            let estimate = coca_worker::memory_estimate::estimate(
                &checked.config,
                args.tensor_parallel_degree,
                args.sharding_parallel_degree,
                args.zero_stage()?,
                checked.batch(&args),
                args.grad_checkpointing,
                args.precision.compute_dtype(),
                coca_worker::memory_estimate::OpsPath::for_kind(on_gpu),
            )?;
            Some(serde_json::json!({
                "estimate": estimate,
                "on_gpu": on_gpu,
                "per_device_train_batch_size": checked.batch(&args),
                "model": args.model.as_deref().unwrap_or(pretrain::model_source::DEMO_MODEL),
            }))
        }
        Command::Eval(args) => {
            coca_worker::eval::cli::check(&args)?;
            None
        }
        Command::Embed(args) => {
            coca_worker::eval::embed::check(&args)?;
            None
        }
        Command::Caption(args) => {
            coca_worker::eval::caption::check(&args)?;
            None
        }
        _ => None,
    };
    print_line(serde_json::json!({ "memory": memory }))?;
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::CheckArgs { command } => check_args(command),
        Command::Pretrain(args) => match pretrain::run::run(*args)? {
            pretrain::run::Ended::Completed => Ok(ExitCode::SUCCESS),
            pretrain::run::Ended::Preempted(_) => {
                Ok(ExitCode::from(coca_common::preempt::EXIT_PREEMPTED as u8))
            }
        },
        Command::Verify {
            reference,
            checkpoint,
            device,
        } => {
            let reports = verify::verify(&reference, checkpoint.as_deref(), &device.open()?)?;
            let failed = reports
                .iter()
                .filter(|r| r.status == verify::Status::Fail)
                .count();
            let passed = reports
                .iter()
                .filter(|r| r.status == verify::Status::Pass)
                .count();
            for r in &reports {
                print_line(r)?;
            }
            print_line(format_args!("verify: {passed} passed, {failed} failed"))?;
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_MISMATCH)
            })
        }
        Command::Selftest { device } => {
            let device = device.open()?;
            let checks = coca_worker::selftest::run(&device)?;
            let ok = checks.iter().all(|c| c.ok);
            let line = serde_json::json!({
                "selftest": "fused ops vs compositions",
                "device": coca_worker::device::device_name(&device),
                "ok": ok,
                "checks": checks,
            });
            print_line(line)?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_MISMATCH)
            })
        }
        Command::Convert {
            input,
            output,
            model,
        } => {
            if let Some(model) = model {
                let config = coca_worker::model::CocaConfig::resolve(&model)?;
                let tensors = checkpoint::read_state_dict(&input)?;
                checkpoint::check_against_model(&tensors, &config)
                    .with_context(|| format!("checkpoint {}", input.display()))?;
            }
            let n = checkpoint::convert(&input, &output)?;
            print_line(format_args!("wrote {n} tensors to {}", output.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(args) => {
            for line in coca_worker::eval::cli::run(&args)? {
                print_line(line)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Embed(args) => {
            if let Some(n) = coca_worker::eval::embed::run(&args)? {
                print_line(format_args!(
                    "wrote {n} embeddings to {}",
                    args.out.display()
                ))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Caption(args) => {
            coca_worker::eval::caption::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchData {
            images,
            image_size,
            batch,
        } => {
            let line = bench_data::run(&bench_data::DataBenchOptions {
                images,
                image_size,
                batch,
            })?;
            print_line(line)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchMemory {
            model,
            sharding,
            tensor_parallel,
            batch,
            grad_checkpointing,
            precision,
            device,
        } => {
            precision.check()?;
            let device = device.open()?;
            coca_worker::cuda_setup::check_precision(&device, precision.compute_dtype())?;
            let opts = coca_worker::bench_memory::MemoryBenchOptions {
                model,
                sharding,
                tensor_parallel,
                batch,
                grad_checkpointing,
                compute: precision.compute_dtype(),
                device,
            };
            for line in coca_worker::bench_memory::run(&opts)? {
                print_line(line)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchCollectives {
            bytes,
            device,
            warmup,
            iters,
        } => {
            let ctx = coca_worker::distributed::context::RankContext::from_env(1, 1)?;
            let device = device.open()?;
            let world =
                coca_worker::distributed::job_groups::WorldGroup::for_device(&ctx, &device)?;
            let placement = coca_worker::comm::PlacementRule::from_env()?.placement(&device);
            // Every operation against the host rings' result first: what the timed backend
            // computes is right before its speed is.
            let host = coca_worker::comm::HostTransport::shared(world.comm.transport().clone());
            let checked = coca_worker::comm::bench::check_against_host(
                world.comm.as_ref(),
                host.as_ref(),
                &placement,
            )
            .with_context(|| {
                format!(
                    "rank {}: the {} backend's collectives",
                    ctx.rank, world.backend
                )
            })?;
            let checked: serde_json::Map<String, serde_json::Value> = checked
                .into_iter()
                .map(|(op, diff)| (op.to_string(), serde_json::json!(diff)))
                .collect();
            for size in bytes {
                let report = coca_worker::comm::bench::bench_all_reduce(
                    world.comm.as_ref(),
                    &placement,
                    size,
                    warmup,
                    iters,
                )?;
                if ctx.is_main() {
                    print_line(serde_json::json!({
                            "collective": "all_reduce",
                            "backend": world.backend,
                            "device": coca_worker::device::device_name(&device),
                            "ranks": report.size,
                            "bytes": report.bytes,
                            "seconds": report.seconds,
                            "algbw_gb_s": report.algbw_gbps,
                            "busbw_gb_s": report.busbw_gbps,
                            "checked_max_abs_diff": checked,
                    }))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            model,
            batch,
            steps,
            tensor_parallel_degree,
            captions,
            bf16,
            device,
            grad_checkpointing,
        } => {
            let line = bench::run(&bench::BenchOptions {
                model,
                batch,
                steps,
                tensor_parallel_degree,
                captions,
                bf16,
                device,
                grad_checkpointing,
            })?;
            if let Some(line) = line {
                print_line(line)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    runtime::huge_page_heap();
    runtime::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(coca_common::log_style::stderr_colour())
        .init();
    coca_worker::simd::warn_on_unknown_bf16_products();
    let cli = Cli::parse_from(normalize_flag_spelling(std::env::args()));
    match run(cli) {
        Ok(code) => code,
        Err(e) if coca_worker::cli::stdout::is_output_closed(&e) => {
            ExitCode::from(coca_worker::cli::stdout::EXIT_OUTPUT_CLOSED)
        }
        Err(e) => {
            eprintln!("coca-worker: error: {e:#}");
            match coca_worker::comm::peer_failure::exit_code(&e) {
                Some(code) => ExitCode::from(code as u8),
                None => ExitCode::from(EXIT_ERROR),
            }
        }
    }
}
