//! `coca-worker embed`: L2-normalised image or text embeddings written to `.safetensors`
//! (tensor `embeddings`) or `.npy` (float32, C order).

use super::host_gather::gather_rows_via_host;
use super::image_batches::ImageBatches;
use super::model_args::ModelArgs;
use crate::atomic_file::write_bytes_atomically;
use crate::checkpoint::write_safetensors_atomic;
use crate::cli::precision::PrecisionArgs;
use crate::data::image_inputs::{expand_image_inputs, paths_file_for, paths_text};
use crate::data::tokenizer::ClipTokenizer;
use crate::distributed::context::RankContext;
use crate::distributed::share::DealtBatches;
use crate::hub::{Hub, HubEnv, NodeGate};
use crate::model::CoCa;
use crate::preflight::writable_dir;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use std::path::{Path, PathBuf};

/// `coca-worker embed` flags.
#[derive(Debug, Clone, Args)]
pub struct EmbedArgs {
    /// The model.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images to embed: files, and folders (every image file under them, in torchvision's
    /// `ImageFolder` order). Row `i` of `--out` is the image on line `i` of the paths file
    /// written beside it (`e.npy` → `e.paths.txt`).
    #[arg(long, num_args = 1.., conflicts_with = "texts")]
    pub images: Vec<PathBuf>,
    /// A file listing images to embed after `--images`, one path per line (relative paths
    /// against the list's folder).
    #[arg(long, conflicts_with = "texts")]
    pub image_list: Option<PathBuf>,
    /// Texts to embed.
    #[arg(long, num_args = 1..)]
    pub texts: Vec<String>,
    /// A UTF-8 file of texts to embed after `--texts`, one per line (every line, blank ones
    /// too, is a row, so that row `i` is line `i`).
    #[arg(long, conflicts_with_all = ["images", "image_list"])]
    pub text_list: Option<PathBuf>,
    /// Output file: `.safetensors` (tensor `embeddings`) or `.npy`.
    #[arg(long)]
    pub out: PathBuf,
    /// Inputs per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Threads decoding the images ahead of the model (0: the main thread, before each
    /// batch's forward pass).
    #[arg(long, default_value_t = 2)]
    pub dataloader_num_workers: usize,
    /// The seed's precision flags, as `eval` takes them: `--bf16 True`/`--fp16 True` compute
    /// the matrix products in half precision (autocast: open_clip's `--precision amp_bf16`),
    /// everything else in float32; the embeddings are written in float32.
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

/// Normalised embeddings `[N, embed_dim]` of image files, read as `batches` says.
pub fn embed_images(model: &CoCa, paths: &[PathBuf], batches: &ImageBatches) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(paths.len().div_ceil(batches.batch_size.max(1)));
    embed_each_batch(model, paths, batches, |part| {
        parts.push(part);
        Ok(())
    })?;
    rows_or_none(model, &parts)
}

/// [`embed_images`], handing each batch's embeddings to `each` as soon as they are computed.
pub fn embed_each_batch(
    model: &CoCa,
    paths: &[PathBuf],
    batches: &ImageBatches,
    mut each: impl FnMut(Tensor) -> Result<()>,
) -> Result<()> {
    ensure!(batches.batch_size > 0, "--batch_size must be positive");
    let size = model.config.vision_cfg.image_size;
    batches.for_each_file("embed", paths, size, model.device(), |_, images| {
        each(model.image_features(&images)?)
    })
}

/// `parts` concatenated, or `[0, embed_dim]` in host memory when there are none: CUDA has no
/// zero-size allocation, and the callers that can have none (a rank with an empty share of an
/// evaluation) move their rows to the host to gather them anyway.
fn rows_or_none(model: &CoCa, parts: &[Tensor]) -> Result<Tensor> {
    if parts.is_empty() {
        return Ok(Tensor::zeros(
            (0, model.config.embed_dim),
            DType::F32,
            &Device::Cpu,
        )?);
    }
    Ok(Tensor::cat(parts, 0)?)
}

/// Normalised embeddings `[N, embed_dim]` of texts (tokenized at the model's context length).
pub fn embed_texts(model: &CoCa, texts: &[String], batch_size: usize) -> Result<Tensor> {
    ensure!(batch_size > 0, "--batch_size must be positive");
    let tokenizer = ClipTokenizer::new()?;
    let ctx = model.config.text_cfg.context_length;
    let parts = texts
        .chunks(batch_size)
        .map(|chunk| {
            let ids: Vec<u32> = chunk
                .iter()
                .flat_map(|t| tokenizer.tokenize(t, ctx))
                .collect();
            let ids = Tensor::from_vec(ids, (chunk.len(), ctx), model.device())?;
            Ok(model.encode_text(&ids)?.0)
        })
        .collect::<Result<Vec<_>>>()?;
    rows_or_none(model, &parts)
}

/// A float32 `[rows, cols]` array as NumPy's `.npy` format 1.0.
pub fn npy_bytes(data: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + length (2) + header + newline, padded to 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend(b"\x93NUMPY\x01\x00");
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    out
}

/// Reads a 2-D little-endian float32 C-order `.npy` file (what [`npy_bytes`] writes).
pub fn read_npy(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    ensure!(
        bytes.len() >= 10 && &bytes[..6] == b"\x93NUMPY",
        "{} is not a .npy file",
        path.display()
    );
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(bytes.get(10..10 + len).context("truncated header")?)
        .with_context(|| format!("{}: header is not text", path.display()))?;
    ensure!(
        header.contains("'<f4'") && header.contains("'fortran_order': False"),
        "{}: only little-endian float32 C-order arrays are read",
        path.display()
    );
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .with_context(|| format!("{}: no shape in the header", path.display()))?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("{}: bad shape {shape_text:?}", path.display()))?;
    let data: Vec<f32> = bytes[10 + len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    ensure!(
        data.len() == shape.iter().product::<usize>(),
        "{}: data does not fit shape {shape:?}",
        path.display()
    );
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Writes `embeddings` `[N, E]` to `out` in the format its extension names, whole or not at
/// all.
pub fn write_embeddings(embeddings: &Tensor, out: &Path) -> Result<()> {
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "safetensors" => {
            write_safetensors_atomic(&[("embeddings".to_string(), embeddings.clone())], out)
                .with_context(|| format!("cannot write --out {}", out.display()))
        }
        "npy" => {
            let (rows, cols) = embeddings.dims2()?;
            let data: Vec<f32> = embeddings.flatten_all()?.to_vec1()?;
            write_bytes_atomically(out, &npy_bytes(&data, rows, cols))
                .with_context(|| format!("cannot write --out {}", out.display()))
        }
        _ => bail!(
            "--out {}: the file name must end in .safetensors or .npy",
            out.display()
        ),
    }
}

/// The lines of the UTF-8 text file `path` (`--text_list`), without their line ends (`\n` or
/// `\r\n`); a final line end adds no empty line.
fn read_text_lines(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read(path)
        .with_context(|| format!("--text_list {}: cannot read it", path.display()))?;
    let text = String::from_utf8(text)
        .map_err(|e| anyhow::anyhow!("--text_list {}: not UTF-8 text ({e})", path.display()))?;
    Ok(text.lines().map(str::to_string).collect())
}

/// What `embed` reads, from its flags ([`check`]).
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedInputs {
    /// Image files, in row order, and the text of their [`paths_file_for`] file.
    Images { files: Vec<PathBuf>, rows: String },
    /// Texts, in row order.
    Texts(Vec<String>),
}

impl EmbedInputs {
    /// How many rows the embeddings will have.
    pub fn len(&self) -> usize {
        match self {
            Self::Images { files, .. } => files.len(),
            Self::Texts(texts) => texts.len(),
        }
    }

    /// Whether there is nothing to embed (never, after [`check`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `embed`'s checks that need no model (also `coca-launch`'s, before any worker starts): the
/// output's format and folder, one kind of input, the precision flags and the model's name,
/// and every input expanded: folders walked, lists read.
pub fn check(args: &EmbedArgs) -> Result<EmbedInputs> {
    let ext = args.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    ensure!(
        ext == "safetensors" || ext == "npy",
        "--out {}: the file name must end in .safetensors or .npy",
        args.out.display()
    );
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        writable_dir(dir, "--out")?;
    }
    let by_image = !args.images.is_empty() || args.image_list.is_some();
    let by_text = !args.texts.is_empty() || args.text_list.is_some();
    if by_image == by_text {
        bail!(
            "pass either --images FILES_OR_FOLDERS... (or --image_list FILE) or --texts TEXT... \
             (or --text_list FILE)"
        );
    }
    ensure!(args.batch_size > 0, "--batch_size must be positive");
    args.precision.check()?;
    args.model.check()?;
    if by_image {
        let files = expand_image_inputs(&args.images, args.image_list.as_deref(), "--images")?;
        let rows = paths_text(&files)?;
        return Ok(EmbedInputs::Images { files, rows });
    }
    let texts = match &args.text_list {
        Some(list) => [args.texts.clone(), read_text_lines(list)?].concat(),
        None => args.texts.clone(),
    };
    if texts.is_empty() {
        bail!("--text_list: the file holds no lines, and no --texts were given");
    }
    Ok(EmbedInputs::Texts(texts))
}

/// Runs `embed`. Under `coca-launch` the batches are dealt to the ranks in turn
/// ([`DealtBatches`]) and rank 0 gathers each round's rows, in order, so the file equals one
/// process's and only rank 0 holds all of it (in host memory). Rank 0 writes it (for images, the rows' paths
/// first, to [`paths_file_for`] `--out`; each file whole or not at all) and gets the number of
/// rows; the other ranks get `None`.
pub fn run(args: &EmbedArgs) -> Result<Option<usize>> {
    let inputs = check(args)?;
    let ctx = RankContext::from_env(1, 1)?;
    let hub = Hub::new(HubEnv::from_env(), NodeGate::for_rank(&ctx)?);
    let loaded = args.model.load_with(&hub, args.precision.autocast())?;
    let model = &loaded.model;
    let deal = DealtBatches {
        len: inputs.len(),
        batch: args.batch_size,
        rank: ctx.world.rank(),
        world: ctx.world.size(),
    };
    // Gathered through host memory ([`gather_rows_via_host`]: a rank with no batch in the last
    // round sends an empty host tensor), and kept there by rank 0 when there are several ranks.
    let gathered_on = match deal.world {
        1 => model.device().clone(),
        _ => Device::Cpu,
    };
    let mut rounds = Vec::with_capacity(if ctx.is_main() { deal.rounds() } else { 0 });
    let mut gather_round = |rows: Tensor| -> Result<()> {
        let all = gather_rows_via_host(&rows, &ctx.world, &gathered_on)
            .context("gathering the ranks' embeddings")?;
        if ctx.is_main() {
            rounds.push(all);
        }
        Ok(())
    };
    let mine = deal.mine();
    match &inputs {
        EmbedInputs::Texts(texts) => {
            let mine: Vec<String> = mine.iter().map(|&i| texts[i].clone()).collect();
            for batch in mine.chunks(args.batch_size) {
                gather_round(embed_texts(model, batch, args.batch_size)?)?;
            }
        }
        EmbedInputs::Images { files, .. } => {
            let mine: Vec<PathBuf> = mine.iter().map(|&i| files[i].clone()).collect();
            let batches = ImageBatches {
                batch_size: args.batch_size,
                decode_threads: args.dataloader_num_workers,
                progress: ctx.is_main(),
            };
            embed_each_batch(model, &mine, &batches, &mut gather_round)?;
        }
    }
    // The last round gives some ranks no batch; they still take part in its gather.
    let done = mine.len().div_ceil(args.batch_size);
    for _ in done..deal.rounds() {
        let dim = model.config.embed_dim;
        gather_round(Tensor::zeros((0, dim), DType::F32, &gathered_on)?)?;
    }
    if !ctx.is_main() {
        return Ok(None);
    }
    let embeddings = rows_or_none(model, &rounds)?;
    if let EmbedInputs::Images { rows, .. } = &inputs {
        let paths_file = paths_file_for(&args.out);
        write_bytes_atomically(&paths_file, rows.as_bytes()).with_context(|| {
            format!("writing the rows' image paths to {}", paths_file.display())
        })?;
    }
    write_embeddings(&embeddings, &args.out)?;
    Ok(Some(embeddings.dim(0)?))
}
