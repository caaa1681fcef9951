//! `coca-worker caption`: captions for image files.

use super::generate::{generate_using, DecodePrecision, Decoding, GenerateOptions, GenerationType};
use super::image_batches::ImageBatches;
use super::model_args::ModelArgs;
use crate::cli::stdout::print_line;
use crate::data::image_inputs::expand_image_inputs;
use crate::data::tokenizer::ClipTokenizer;
use crate::distributed::context::RankContext;
use crate::distributed::share::{all_gather_strings, DealtBatches};
use crate::hub::{Hub, HubEnv, NodeGate};
use crate::model::autocast::Autocast;
use crate::model::CoCa;
use anyhow::{ensure, Context, Result};
use clap::Args;
use std::path::PathBuf;

/// `CoCa.generate`'s settings as flags (open_clip 3.x defaults).
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// greedy, top_k, top_p or beam_search.
    #[arg(long, default_value = "beam_search")]
    pub generation_type: GenerationType,
    /// Output length, sot and eos included. Default: 30, or the model's context length + 1
    /// when shorter.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// End-of-text is forbidden while a caption is shorter than this.
    #[arg(long, default_value_t = 5)]
    pub min_seq_len: usize,
    /// Divides the filtered logits before sampling.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Tokens kept by top_k sampling.
    #[arg(long, default_value_t = 1)]
    pub top_k: usize,
    /// Probability mass kept by top_p sampling.
    #[arg(long, default_value_t = 0.1)]
    pub top_p: f32,
    /// Beams per image (beam_search).
    #[arg(long, default_value_t = 6)]
    pub num_beams: usize,
    /// Groups the beams are split into (beam_search).
    #[arg(long, default_value_t = 3)]
    pub num_beam_groups: usize,
    /// Hugging Face's repetition penalty (1 = none).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Hamming diversity penalty between beam groups (open_clip uses none).
    #[arg(long, default_value_t = 0.0)]
    pub diversity_penalty: f32,
    /// Seed of the sampling RNG (top_k, top_p).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// fp32, or bf16: read the text tower's and decoder's matrices as a bfloat16 copy while
    /// decoding. Faster while a step decodes up to about 20 sequences (batch × beams; one
    /// image's greedy caption about 1.4×); sums and activations stay float32, and captions can
    /// differ from fp32's.
    #[arg(long, default_value = "fp32")]
    pub decode_precision: DecodePrecision,
}

impl GenerateArgs {
    /// The options for `model`.
    pub fn options(&self, model: &CoCa) -> GenerateOptions {
        let ctx = model
            .config
            .text_cfg
            .context_length
            .min(model.config.multimodal_cfg.context_length);
        GenerateOptions {
            generation_type: self.generation_type,
            seq_len: self.seq_len.unwrap_or(30.min(ctx + 1)),
            min_seq_len: self.min_seq_len,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            num_beams: self.num_beams,
            num_beam_groups: self.num_beam_groups,
            repetition_penalty: self.repetition_penalty,
            diversity_penalty: self.diversity_penalty,
            seed: self.seed,
            decode_precision: self.decode_precision,
            ..GenerateOptions::default()
        }
    }
}

/// `coca-worker caption` flags.
#[derive(Debug, Clone, Args)]
pub struct CaptionArgs {
    /// Images: files, and folders (every image file under them, in torchvision's
    /// `ImageFolder` order).
    #[arg(required_unless_present = "image_list")]
    pub images: Vec<PathBuf>,
    /// A file listing images to caption after the ones named before it, one path per line
    /// (relative paths against the list's folder).
    #[arg(long)]
    pub image_list: Option<PathBuf>,
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The generation settings.
    #[command(flatten)]
    pub generate: GenerateArgs,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Threads decoding the images ahead of the model (0: the main thread, before each
    /// batch's captions).
    #[arg(long, default_value_t = 2)]
    pub dataloader_num_workers: usize,
}

/// Batches from which captioning first moves the decoding weights onto huge pages: the move
/// costs about what 15 batches of decoding save (see
/// [`super::generate::DecodeWeights::move_to_huge_pages`]).
const HUGE_PAGES_FROM_BATCHES: usize = 16;

/// Captions `model` writes for `paths`, in order, the images read as `batches` says.
pub fn caption_files(
    model: &CoCa,
    paths: &[PathBuf],
    opts: &GenerateOptions,
    batches: &ImageBatches,
) -> Result<Vec<String>> {
    let mut captions = Vec::with_capacity(paths.len());
    caption_each_batch(model, paths, opts, batches, |batch| {
        captions.extend(batch);
        Ok(())
    })?;
    Ok(captions)
}

/// [`caption_files`], handing each batch's captions to `each` as soon as they are written.
pub fn caption_each_batch(
    model: &CoCa,
    paths: &[PathBuf],
    opts: &GenerateOptions,
    batches: &ImageBatches,
    mut each: impl FnMut(Vec<String>) -> Result<()>,
) -> Result<()> {
    ensure!(batches.batch_size > 0, "--batch_size must be positive");
    opts.validate(model)?;
    let tokenizer = ClipTokenizer::new()?;
    let size = model.config.vision_cfg.image_size;
    let decoding = Decoding::new(model, opts.decode_precision)?;
    if paths.len().div_ceil(batches.batch_size) >= HUGE_PAGES_FROM_BATCHES {
        decoding.move_to_huge_pages();
    }
    batches.for_each_file("caption", paths, size, model.device(), |_, images| {
        let captions = generate_using(&decoding, &images, opts)?
            .iter()
            .map(|ids| tokenizer.decode(ids).trim().to_string())
            .collect();
        each(captions)
    })
}

/// `caption`'s checks that need no model (also `coca-launch`'s, before any worker starts): the
/// batch size, the model's name and the images, expanded (folders walked, lists read).
pub fn check(args: &CaptionArgs) -> Result<Vec<PathBuf>> {
    ensure!(args.batch_size > 0, "--batch_size must be positive");
    args.model.check()?;
    expand_image_inputs(&args.images, args.image_list.as_deref(), "caption")
}

/// Runs `caption`: one `path<TAB>caption` line per image on stdout, printed as each batch is
/// done (a reader that closes it stops the command: [`crate::cli::stdout::OutputClosed`]). Under `coca-launch` the batches are dealt to the ranks in turn ([`DealtBatches`]):
/// after each round rank 0 gathers the round's captions and prints them, in order.
pub fn run(args: &CaptionArgs) -> Result<()> {
    let images = check(args)?;
    let ctx = RankContext::from_env(1, 1)?;
    let hub = Hub::new(HubEnv::from_env(), NodeGate::for_rank(&ctx)?);
    let loaded = args.model.load_with(&hub, Autocast::off())?;
    let opts = args.generate.options(&loaded.model);
    let batches = ImageBatches {
        batch_size: args.batch_size,
        decode_threads: args.dataloader_num_workers,
        progress: ctx.is_main(),
    };
    let deal = DealtBatches {
        len: images.len(),
        batch: args.batch_size,
        rank: ctx.world.rank(),
        world: ctx.world.size(),
    };
    let mine: Vec<PathBuf> = deal.mine().into_iter().map(|i| images[i].clone()).collect();
    let round = std::cell::Cell::new(0);
    let print_round = |captions: Vec<String>| -> Result<()> {
        let all = all_gather_strings(ctx.world.as_ref(), &captions)
            .context("gathering the ranks' captions")?;
        if ctx.is_main() {
            for (path, caption) in images[deal.round(round.get())].iter().zip(all) {
                print_line(format_args!("{}\t{caption}", path.display()))?;
            }
        }
        round.set(round.get() + 1);
        Ok(())
    };
    caption_each_batch(&loaded.model, &mine, &opts, &batches, print_round)?;
    // The last round gives some ranks no batch; they still take part in its gather.
    while round.get() < deal.rounds() {
        print_round(Vec::new())?;
    }
    Ok(())
}
