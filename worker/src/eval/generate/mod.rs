//! Caption generation with open_clip's `CoCa.generate` semantics (open_clip 3.x):
//! `top_k` / `top_p` sampling (greedy is top-k 1) and diverse group beam search with Hugging Face
//! transformers' `BeamSearchScorer`.
//!
//! Decoding runs on a key/value cache: each step feeds only the new token through the text
//! tower and the decoder ([`Decoding`] chooses how). A float32 model on the CPU runs
//! [`CachedDecoder`], whose weights ([`DecodeWeights`], float32 in place or a bfloat16 copy) the
//! row kernels in `kernels/` stream once per step for all sequences; any other device or dtype
//! (and the CPU under [`crate::model::ops::force_portable`]) runs [`TensorCacheDecoder`], the
//! model's own layers over a cache of tensors. [`RecomputeDecoder`] recomputes the whole prefix
//! each step with the model's forward pass, as open_clip does; all three give the same logits
//! (see the tests).

pub mod beam;
mod cached;
mod decoding;
pub(crate) mod kernels;
pub mod processors;
mod tensor_cache;
mod weights;

pub use cached::CachedDecoder;
pub use decoding::Decoding;
pub use tensor_cache::TensorCacheDecoder;
pub use weights::{DecodePrecision, DecodeWeights};

use crate::data::tokenizer::{EOT, PAD, SOT};
use crate::model::CoCa;
use crate::rng::SplitMix64;
use anyhow::{bail, ensure, Result};
use beam::{BeamSearchScorer, Candidates};
use candle_core::{Device, Tensor};
use std::str::FromStr;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationType {
    /// The most likely token (open_clip's `top_k` with `top_k=1`, without sampling).
    Greedy,
    /// Sample among the `top_k` most likely tokens.
    TopK,
    /// Sample from the smallest set of tokens holding probability `top_p` (nucleus).
    TopP,
    /// Diverse group beam search.
    BeamSearch,
}

impl FromStr for GenerationType {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "greedy" => Ok(Self::Greedy),
            "top_k" | "top-k" => Ok(Self::TopK),
            "top_p" | "top-p" => Ok(Self::TopP),
            "beam_search" | "beam-search" => Ok(Self::BeamSearch),
            _ => Err(format!(
                "unknown generation type {s:?}: expected greedy, top_k, top_p or beam_search"
            )),
        }
    }
}

/// `CoCa.generate`'s parameters; the defaults are open_clip 3.x's.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub generation_type: GenerationType,
    /// Length of the output rows, sot and the final eos included.
    pub seq_len: usize,
    /// `eos` is forbidden while a sequence is shorter than this.
    pub min_seq_len: usize,
    /// Divides the filtered logits before sampling.
    pub temperature: f32,
    /// Tokens kept by `top_k` sampling.
    pub top_k: usize,
    /// Probability mass kept by `top_p` sampling.
    pub top_p: f32,
    /// Beams per image (beam search).
    pub num_beams: usize,
    /// Groups the beams are split into (diverse beam search).
    pub num_beam_groups: usize,
    /// HF's repetition penalty (1 = none).
    pub repetition_penalty: f32,
    /// HF's Hamming diversity penalty between beam groups; open_clip passes none (0).
    pub diversity_penalty: f32,
    /// Beam-search length penalty (the exponent of the length).
    pub length_penalty: f64,
    /// Seed of the sampling RNG (`top_k`, `top_p`).
    pub seed: u64,
    /// Start-of-text id (49406).
    pub sot: u32,
    /// End-of-text id (49407).
    pub eos: u32,
    /// Padding id (0).
    pub pad: u32,
    /// How the key/value-cache decoder holds the weights it reads every step.
    pub decode_precision: DecodePrecision,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            generation_type: GenerationType::BeamSearch,
            seq_len: 30,
            min_seq_len: 5,
            temperature: 1.0,
            top_k: 1,
            top_p: 0.1,
            num_beams: 6,
            num_beam_groups: 3,
            repetition_penalty: 1.0,
            diversity_penalty: 0.0,
            length_penalty: 1.0,
            seed: 0,
            sot: SOT,
            eos: EOT,
            pad: PAD,
            decode_precision: DecodePrecision::F32,
        }
    }
}

impl GenerateOptions {
    /// Checks the values against each other and against the model's context length.
    pub fn validate(&self, model: &CoCa) -> Result<()> {
        let ctx = model
            .config
            .text_cfg
            .context_length
            .min(model.config.multimodal_cfg.context_length);
        ensure!(
            self.seq_len > self.min_seq_len,
            "--seq_len ({}) must be larger than --min_seq_len ({})",
            self.seq_len,
            self.min_seq_len
        );
        ensure!(
            self.seq_len >= 2 && self.seq_len <= ctx + 1,
            "--seq_len must be between 2 and the model's context length + 1 ({}), got {}",
            ctx + 1,
            self.seq_len
        );
        ensure!(
            self.temperature > 0.0 && self.temperature.is_finite(),
            "--temperature must be positive, got {}",
            self.temperature
        );
        ensure!(
            self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite(),
            "--repetition_penalty must be positive, got {}",
            self.repetition_penalty
        );
        ensure!(
            self.diversity_penalty >= 0.0 && self.diversity_penalty.is_finite(),
            "--diversity_penalty must be at least 0, got {}",
            self.diversity_penalty
        );
        match self.generation_type {
            GenerationType::TopK => ensure!(self.top_k > 0, "--top_k must be positive"),
            GenerationType::TopP => ensure!(
                self.top_p > 0.0 && self.top_p <= 1.0,
                "--top_p must be in (0, 1], got {}",
                self.top_p
            ),
            GenerationType::BeamSearch => {
                BeamSearchScorer::new(1, self.num_beams, self.num_beam_groups, 1.0)?;
            }
            GenerationType::Greedy => {}
        }
        Ok(())
    }
}

/// Next-token logits for a batch of sequences that grow by one token per call.
pub trait StepDecoder {
    /// Logits `[rows][vocab]` for the token after each of `seqs` (all of one length; each is the
    /// previous call's sequence of that row, after [`Self::reorder`], plus new tokens).
    fn next_logits(&mut self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;
    /// Row `i` continues what row `sources[i]` was (beam search).
    fn reorder(&mut self, sources: &[usize]) -> Result<()>;
}

/// Recomputes the whole prefix through both text towers each step (open_clip's way).
pub struct RecomputeDecoder<'a> {
    model: &'a CoCa,
    image_embs: Tensor,
}

impl<'a> RecomputeDecoder<'a> {
    /// Decoding for image tokens `image_embs` `[rows, Q, width]`, one row per sequence.
    pub fn new(model: &'a CoCa, image_embs: Tensor) -> Self {
        Self { model, image_embs }
    }
}

/// Each row of `x` repeated `n` times in place (PyTorch's `repeat_interleave` on dim 0): one
/// row of image tokens per sequence.
pub(super) fn repeat_rows(x: &Tensor, n: usize) -> Result<Tensor> {
    let b = x.dim(0)?;
    let idx: Vec<u32> = (0..b as u32)
        .flat_map(|i| std::iter::repeat_n(i, n))
        .collect();
    let idx = Tensor::from_vec(idx, b * n, x.device())?;
    Ok(x.contiguous()?.index_select(&idx, 0)?)
}

/// The ids of `seqs` (all of one length) from position `from` on, as `[rows, len − from]` on
/// `device`: what a decoder with `from` positions cached has not seen yet.
pub(super) fn prefix_tensor(seqs: &[Vec<u32>], from: usize, device: &Device) -> Result<Tensor> {
    let t = seqs.first().map_or(0, Vec::len);
    ensure!(
        t > from && seqs.iter().all(|s| s.len() == t),
        "decoding rows must have one length, longer than the cached {from}"
    );
    let ids: Vec<u32> = seqs
        .iter()
        .flat_map(|s| s[from..].iter().copied())
        .collect();
    Ok(Tensor::from_vec(ids, (seqs.len(), t - from), device)?)
}

impl StepDecoder for RecomputeDecoder<'_> {
    fn next_logits(&mut self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let prefix = prefix_tensor(seqs, 0, self.image_embs.device())?;
        let logits = self.model.next_token_logits(&self.image_embs, &prefix)?;
        Ok(logits.to_vec2::<f32>()?)
    }

    fn reorder(&mut self, _sources: &[usize]) -> Result<()> {
        Ok(())
    }
}

/// Captions for preprocessed images `[B, 3, S, S]`: rows of token ids from sot, ending with eos
/// and padded with `pad` to a common width (at most `seq_len`). Uses the key/value cache
/// [`Decoding::new`] chooses.
pub fn generate(model: &CoCa, images: &Tensor, opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
    search(&Decoding::new(model, opts.decode_precision)?, images, opts)
}

/// [`generate`] with a decoding built once for many batches (`opts.decode_precision` is the
/// one it was built with).
pub fn generate_using(
    decoding: &Decoding,
    images: &Tensor,
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    search(decoding, images, opts)
}

/// [`generate`] with the cache (`cached`) or recomputing the prefix every step.
pub fn generate_with(
    model: &CoCa,
    images: &Tensor,
    opts: &GenerateOptions,
    cached: bool,
) -> Result<Vec<Vec<u32>>> {
    match cached {
        true => generate(model, images, opts),
        false => search(&Decoding::Recompute(model), images, opts),
    }
}

/// Encodes the images, then runs the search of `opts` with `decoding`.
fn search(decoding: &Decoding, images: &Tensor, opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
    let model = decoding.model();
    opts.validate(model)?;
    let (_, image_embs) = model.encode_image(images)?;
    let b = images.dim(0)?;
    let rows_per_image = match opts.generation_type {
        GenerationType::BeamSearch => opts.num_beams,
        _ => 1,
    };
    // The search runs on a pool thread: the decoding kernels' parallel products then split by
    // work stealing instead of waking the pool from outside it (and parking this thread) for
    // each of the ~120 products of a step.
    let search = || -> Result<Vec<Vec<u32>>> {
        let mut decoder = decoding.decoder(&image_embs, rows_per_image)?;
        match opts.generation_type {
            GenerationType::BeamSearch => beam_search(decoder.as_mut(), b, opts),
            _ => sample_search(decoder.as_mut(), b, opts),
        }
    };
    rayon::join(search, || ()).0
}

/// Greedy captions of at most `max_len` ids with `eos` forbidden below `min_len` (the fixture's
/// `generate.greedy` settings), on the key/value cache.
pub fn greedy(
    model: &CoCa,
    images: &Tensor,
    max_len: usize,
    min_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let opts = GenerateOptions {
        generation_type: GenerationType::Greedy,
        seq_len: max_len,
        min_seq_len: min_len.min(max_len.saturating_sub(1)),
        ..GenerateOptions::default()
    };
    generate(model, images, &opts)
}

/// open_clip's sampling loop: per step, rows that ended (last token eos or pad) get `pad`; the
/// others get min-length and repetition processing of their prefix, the top-k/top-p filter,
/// then a draw at `temperature`, and `eos` at the last position (which needs no logits, so
/// none are computed for it). Stops when every row ended or the rows reach `seq_len`.
fn sample_search(
    decoder: &mut dyn StepDecoder,
    b: usize,
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    let mut out: Vec<Vec<u32>> = vec![vec![opts.sot]; b];
    let mut rng = SplitMix64(opts.seed);
    loop {
        let cur_len = out[0].len();
        let ended: Vec<bool> = out
            .iter()
            .map(|s| matches!(s.last(), Some(&t) if t == opts.eos || t == opts.pad))
            .collect();
        if ended.iter().all(|&e| e) {
            break;
        }
        if cur_len + 1 == opts.seq_len {
            // The last position is eos for every row still open: no logits needed.
            for (seq, &ended) in out.iter_mut().zip(&ended) {
                seq.push(if ended { opts.pad } else { opts.eos });
            }
            break;
        }
        let logits = decoder.next_logits(&out)?;
        for ((seq, mut row), &ended) in out.iter_mut().zip(logits).zip(&ended) {
            if ended {
                seq.push(opts.pad);
                continue;
            }
            processors::min_length(&mut row, cur_len, opts.min_seq_len, opts.eos);
            processors::repetition_penalty(&mut row, seq, opts.repetition_penalty);
            let token = match opts.generation_type {
                GenerationType::Greedy => processors::argmax(&row),
                GenerationType::TopK => {
                    processors::top_k(&mut row, opts.top_k);
                    processors::sample(&row, opts.temperature, &mut rng)
                }
                GenerationType::TopP => {
                    processors::top_p(&mut row, opts.top_p);
                    processors::sample(&row, opts.temperature, &mut rng)
                }
                GenerationType::BeamSearch => bail!("beam search is not a sampling method"),
            };
            seq.push(token);
        }
        if out[0].len() >= opts.seq_len {
            break;
        }
    }
    Ok(out)
}

/// open_clip's `_generate_beamsearch`: `num_beams` beams per image in `num_beam_groups` groups,
/// scored by the sum of processed logits (open_clip applies no log-softmax), groups processed
/// in order with HF's `BeamSearchScorer`; runs until every group is done or the beams reach
/// `seq_len`.
fn beam_search(
    decoder: &mut dyn StepDecoder,
    b: usize,
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    let nb = opts.num_beams;
    let groups = opts.num_beam_groups;
    let gs = nb / groups;
    let mut scorer = BeamSearchScorer::new(b, nb, groups, opts.length_penalty)?;
    let mut ids: Vec<Vec<u32>> = vec![vec![opts.sot]; b * nb];
    let mut beam_scores: Vec<f32> = (0..b * nb)
        .map(|r| if r % gs == 0 { 0.0 } else { -1e9 })
        .collect();
    loop {
        let logits = decoder.next_logits(&ids)?;
        let mut current = vec![0u32; b * nb];
        let mut sources: Vec<usize> = (0..b * nb).collect();
        let snapshot = ids.clone();
        for g in 0..groups {
            let rows: Vec<usize> = (0..b)
                .flat_map(|i| (0..gs).map(move |k| i * nb + g * gs + k))
                .collect();
            let group_ids: Vec<Vec<u32>> = rows.iter().map(|&r| snapshot[r].clone()).collect();
            let mut candidates: Vec<Candidates> = Vec::with_capacity(b);
            for i in 0..b {
                let mut flat: Vec<(f32, u32, usize)> = Vec::new();
                for k in 0..gs {
                    let r = rows[i * gs + k];
                    let mut row = logits[r].clone();
                    processors::min_length(
                        &mut row,
                        group_ids[i * gs + k].len(),
                        opts.min_seq_len,
                        opts.eos,
                    );
                    processors::repetition_penalty(
                        &mut row,
                        &group_ids[i * gs + k],
                        opts.repetition_penalty,
                    );
                    if opts.diversity_penalty > 0.0 && g > 0 {
                        let previous = &current[i * nb..i * nb + g * gs];
                        processors::hamming_diversity(&mut row, previous, opts.diversity_penalty);
                    }
                    let base = beam_scores[r];
                    flat.extend(
                        row.iter()
                            .enumerate()
                            .map(|(t, &l)| (l + base, t as u32, k)),
                    );
                }
                candidates.push(top_candidates(flat, 2 * gs, logits[0].len()));
            }
            let step = scorer.process(g, &group_ids, &candidates, opts.eos, opts.pad)?;
            for (j, &r) in rows.iter().enumerate() {
                let src = rows[step.sources[j]];
                beam_scores[r] = step.scores[j];
                ids[r] = snapshot[src].clone();
                ids[r].push(step.tokens[j]);
                current[r] = step.tokens[j];
                sources[r] = src;
            }
        }
        decoder.reorder(&sources)?;
        if scorer.is_done() || ids[0].len() >= opts.seq_len {
            break;
        }
    }
    Ok(scorer.finalize(&ids, &beam_scores, opts.seq_len, opts.eos, opts.pad))
}

/// The `k` best `(score, token, beam)` of a group, as `torch.topk(sorted=True)` over the
/// flattened `[beam · vocab + token]` scores: larger first, lower flat index first on ties.
fn top_candidates(mut flat: Vec<(f32, u32, usize)>, k: usize, vocab: usize) -> Candidates {
    let key = |c: &(f32, u32, usize)| c.2 * vocab + c.1 as usize;
    let cmp = |a: &(f32, u32, usize), b: &(f32, u32, usize)| {
        b.0.total_cmp(&a.0).then(key(a).cmp(&key(b)))
    };
    let k = k.min(flat.len());
    if k < flat.len() {
        flat.select_nth_unstable_by(k - 1, cmp);
        flat.truncate(k);
    }
    flat.sort_by(cmp);
    flat
}
