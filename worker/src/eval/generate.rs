//! Caption generation.

use crate::data::tokenizer::{EOT, PAD, SOT};
use crate::model::CoCa;
use anyhow::Result;
use candle_core::{Device, Tensor, D};

/// Greedy decoding from `<start_of_text>`, as open_clip's `generate` with top-k 1: at each step
/// the most likely token, the end token forbidden while fewer than `min_len` tokens exist
/// (min-length processing) and forced at the last position; a row stops at `<end_of_text>` and
/// is padded with 0 after it. Returns rows of at most `max_len` ids, sot included.
pub fn greedy(
    model: &CoCa,
    images: &Tensor,
    max_len: usize,
    min_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let (_, image_embs) = model.encode_image(images)?;
    let b = images.dim(0)?;
    let max_len = max_len.min(model.config.text_cfg.context_length);
    let mut seqs: Vec<Vec<u32>> = vec![vec![SOT]; b];
    let mut done = vec![false; b];
    let device: &Device = images.device();
    while seqs[0].len() < max_len && done.iter().any(|d| !d) {
        let t = seqs[0].len();
        let prefix = Tensor::from_vec(seqs.concat(), (b, t), device)?;
        let mut logits = model.next_token_logits(&image_embs, &prefix)?;
        if t < min_len {
            // Forbid the end token by pushing its logit to -inf.
            let vocab = logits.dim(D::Minus1)?;
            let mut mask = vec![0f32; vocab];
            mask[EOT as usize] = f32::NEG_INFINITY;
            logits = logits.broadcast_add(&Tensor::from_vec(mask, vocab, device)?)?;
        }
        let mut next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        if t + 1 == max_len {
            next.iter_mut().for_each(|n| *n = EOT);
        }
        for ((seq, finished), token) in seqs.iter_mut().zip(done.iter_mut()).zip(next) {
            if *finished {
                seq.push(PAD);
            } else {
                seq.push(token);
                *finished = token == EOT;
            }
        }
    }
    Ok(seqs)
}
