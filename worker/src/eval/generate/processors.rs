//! Logit processors and warpers with Hugging Face transformers' semantics, on one row of
//! float32 logits: `MinLengthLogitsProcessor`, `RepetitionPenaltyLogitsProcessor`,
//! `HammingDiversityLogitsProcessor`, `TopKLogitsWarper`, `TopPLogitsWarper`, then temperature and
//! multinomial sampling.

use crate::rng::SplitMix64;

/// `MinLengthLogitsProcessor`: while the sequence is shorter than `min_len`, `eos` is impossible.
pub fn min_length(logits: &mut [f32], seq_len: usize, min_len: usize, eos: u32) {
    if seq_len < min_len {
        if let Some(l) = logits.get_mut(eos as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// `RepetitionPenaltyLogitsProcessor`: every token already in `seq` has its logit divided by
/// `penalty` when positive and multiplied by it when negative (once per distinct token).
/// A penalty of 1 changes nothing.
pub fn repetition_penalty(logits: &mut [f32], seq: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for &t in seq {
        if !seen.insert(t) {
            continue;
        }
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// `HammingDiversityLogitsProcessor` for one beam: subtract `penalty` times the number of times
/// each token was chosen at this step by the earlier groups of the same image.
pub fn hamming_diversity(logits: &mut [f32], previous_group_tokens: &[u32], penalty: f32) {
    for &t in previous_group_tokens {
        if let Some(l) = logits.get_mut(t as usize) {
            *l -= penalty;
        }
    }
}

/// `TopKLogitsWarper(top_k)`: logits below the k-th largest become −∞ (ties are kept).
pub fn top_k(logits: &mut [f32], k: usize) {
    let k = k.max(1).min(logits.len());
    if k == logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    for l in logits.iter_mut() {
        if *l < kth {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// `TopPLogitsWarper(top_p)`: sorted ascending, the tokens whose cumulative probability is at
/// most `1 - top_p` become −∞; the most likely token is always kept.
pub fn top_p(logits: &mut [f32], p: f32) {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Ascending, as torch.sort(descending=False); stable for ties.
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return;
    }
    let exps: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] - max) as f64).exp())
        .collect();
    let total: f64 = exps.iter().sum();
    let threshold = 1.0 - p as f64;
    let mut cumulative = 0.0;
    let last = order.len() - 1;
    for (rank, (&i, e)) in order.iter().zip(&exps).enumerate() {
        cumulative += e / total;
        if cumulative <= threshold && rank != last {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A draw from `softmax(logits / temperature)` (torch.multinomial's distribution, seeded here).
pub fn sample(logits: &[f32], temperature: f32, rng: &mut SplitMix64) -> u32 {
    let scaled: Vec<f32> = logits.iter().map(|&l| l / temperature).collect();
    let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax(logits);
    }
    let weights: Vec<f64> = scaled.iter().map(|&l| ((l - max) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.next_f64() * total;
    let mut last_nonzero = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            last_nonzero = i;
            if u < w {
                return i as u32;
            }
            u -= w;
        }
    }
    last_nonzero as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_length_forbids_eos_only_while_short() {
        let mut l = vec![1.0; 4];
        min_length(&mut l, 2, 3, 3);
        assert_eq!(l[3], f32::NEG_INFINITY);
        let mut l = vec![1.0; 4];
        min_length(&mut l, 3, 3, 3);
        assert_eq!(l[3], 1.0);
    }

    #[test]
    fn repetition_penalty_scales_by_sign_once() {
        let mut l = vec![2.0, -2.0, 2.0];
        repetition_penalty(&mut l, &[0, 1, 0], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 2.0]);
    }

    #[test]
    fn top_k_keeps_ties_and_top_p_keeps_the_nucleus() {
        let mut l = vec![3.0, 1.0, 3.0, 0.0];
        top_k(&mut l, 1);
        assert_eq!(l, vec![3.0, f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY]);
        // probabilities ≈ 0.6439, 0.2369, 0.0871, 0.0321
        let mut l = vec![3.0, 2.0, 1.0, 0.0];
        top_p(&mut l, 0.8);
        assert!(l[0].is_finite() && l[1].is_finite());
        assert!(l[2] == f32::NEG_INFINITY && l[3] == f32::NEG_INFINITY);
        let mut l = vec![3.0, 2.0, 1.0, 0.0];
        top_p(&mut l, 0.01);
        assert_eq!(l.iter().filter(|x| x.is_finite()).count(), 1);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut rng = SplitMix64(7);
        let logits = vec![0.0, (3.0f32).ln(), f32::NEG_INFINITY];
        let mut counts = [0usize; 3];
        for _ in 0..4000 {
            counts[sample(&logits, 1.0, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let frac = counts[1] as f64 / 4000.0;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
    }
}
