//! Captioning metrics as pycocoevalcap computes them: corpus BLEU-4 (`Bleu(4)`, "closest"
//! reference length) and CIDEr-D (`Cider`: n = 1..4, idf over the reference sets, clipped
//! tf-idf, Gaussian length penalty σ = 6, ×10).
//!
//! Text is lower-cased and split into words at anything that is not a letter, digit or
//! apostrophe, with punctuation dropped: close to, not identical with, the Stanford PTB
//! tokenizer pycocoevalcap runs (which, for instance, splits "don't" into "do n't").

use std::collections::HashMap;

/// Lower-cased words, punctuation dropped.
pub fn tokenize(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

type Ngrams = HashMap<Vec<String>, usize>;

/// Per n, an n-gram's tf-idf weight.
type TfIdf = Vec<HashMap<Vec<String>, f64>>;

/// Counts of the n-grams of `words` for one n.
fn ngrams(words: &[String], n: usize) -> Ngrams {
    let mut counts = Ngrams::new();
    if words.len() >= n {
        for w in words.windows(n) {
            *counts.entry(w.to_vec()).or_default() += 1;
        }
    }
    counts
}

/// Corpus BLEU-4 of `hypotheses[i]` against `references[i]` (already tokenized), as
/// pycocoevalcap's `BleuScorer` with `option="closest"`.
pub fn bleu4(hypotheses: &[Vec<String>], references: &[Vec<Vec<String>>]) -> f64 {
    const TINY: f64 = 1e-15;
    const SMALL: f64 = 1e-9;
    let (mut correct, mut guess) = ([0f64; 4], [0f64; 4]);
    let (mut test_len, mut ref_len) = (0f64, 0f64);
    for (hyp, refs) in hypotheses.iter().zip(references) {
        test_len += hyp.len() as f64;
        // The closest reference length; the shorter on ties.
        let closest = refs
            .iter()
            .map(Vec::len)
            .min_by_key(|&l| ((l as i64 - hyp.len() as i64).abs(), l))
            .unwrap_or(0);
        ref_len += closest as f64;
        for n in 1..=4 {
            let mut max_ref: Ngrams = Ngrams::new();
            for r in refs {
                for (g, c) in ngrams(r, n) {
                    let e = max_ref.entry(g).or_default();
                    *e = (*e).max(c);
                }
            }
            let hyp_counts = ngrams(hyp, n);
            guess[n - 1] += hyp.len().saturating_sub(n - 1) as f64;
            correct[n - 1] += hyp_counts
                .iter()
                .map(|(g, &c)| c.min(max_ref.get(g).copied().unwrap_or(0)) as f64)
                .sum::<f64>();
        }
    }
    let mut product = 1.0;
    for k in 0..4 {
        product *= (correct[k] + TINY) / (guess[k] + SMALL);
    }
    let mut bleu = product.powf(0.25);
    let ratio = (test_len + TINY) / (ref_len + SMALL);
    if ratio < 1.0 {
        bleu *= (1.0 - 1.0 / ratio).exp();
    }
    bleu
}

/// Corpus CIDEr-D of `hypotheses[i]` against `references[i]` (already tokenized): the mean over
/// images, as pycocoevalcap's `CiderScorer` (document frequencies from the references of
/// these images).
pub fn cider(hypotheses: &[Vec<String>], references: &[Vec<Vec<String>>]) -> f64 {
    const SIGMA: f64 = 6.0;
    if hypotheses.is_empty() {
        return 0.0;
    }
    let mut df: HashMap<Vec<String>, f64> = HashMap::new();
    for refs in references {
        let mut seen = std::collections::HashSet::new();
        for r in refs {
            for n in 1..=4 {
                for g in ngrams(r, n).into_keys() {
                    seen.insert(g);
                }
            }
        }
        for g in seen {
            *df.entry(g).or_default() += 1.0;
        }
    }
    let log_docs = (references.len() as f64).ln();
    // Per n: tf-idf vector, its norm; and the word count.
    let vectorize = |words: &[String]| -> (TfIdf, Vec<f64>, f64) {
        let mut vecs = Vec::with_capacity(4);
        let mut norms = Vec::with_capacity(4);
        for n in 1..=4 {
            let v: HashMap<Vec<String>, f64> = ngrams(words, n)
                .into_iter()
                .map(|(g, tf)| {
                    let d = df.get(&g).copied().unwrap_or(0.0).max(1.0).ln();
                    (g, tf as f64 * (log_docs - d))
                })
                .collect();
            norms.push(v.values().map(|x| x * x).sum::<f64>().sqrt());
            vecs.push(v);
        }
        (vecs, norms, words.len() as f64)
    };
    let mut total = 0.0;
    for (hyp, refs) in hypotheses.iter().zip(references) {
        let (hv, hn, hl) = vectorize(hyp);
        let mut score = [0f64; 4];
        for r in refs {
            let (rv, rn, rl) = vectorize(r);
            let delta = hl - rl;
            for n in 0..4 {
                let mut val: f64 = hv[n]
                    .iter()
                    .map(|(g, &h)| {
                        let r = rv[n].get(g).copied().unwrap_or(0.0);
                        h.min(r) * r
                    })
                    .sum();
                if hn[n] != 0.0 && rn[n] != 0.0 {
                    val /= hn[n] * rn[n];
                }
                score[n] += val * (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
            }
        }
        let mean = score.iter().sum::<f64>() / 4.0;
        total += mean / refs.len().max(1) as f64 * 10.0;
    }
    total / hypotheses.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Vec<String> {
        tokenize(s)
    }

    #[test]
    fn tokenize_lowercases_and_drops_punctuation() {
        assert_eq!(
            t("A Cat, sitting... on 'the' MAT!"),
            ["a", "cat", "sitting", "on", "the", "mat"]
        );
    }

    #[test]
    fn bleu4_by_hand() {
        let same = bleu4(
            &[t("the cat sat on the mat")],
            &[vec![t("the cat sat on the mat")]],
        );
        assert!((same - 1.0).abs() < 1e-6);
        // Precisions 4/5, 3/4, 2/3, 1/2 → (0.2)^(1/4); brevity exp(1 - 6/5).
        let b = bleu4(&[t("a b c d e")], &[vec![t("a b c d f g"), t("x y")]]);
        let expected = 0.2f64.powf(0.25) * (-0.2f64).exp();
        assert!((b - expected).abs() < 1e-6, "{b} vs {expected}");
    }

    #[test]
    fn cider_by_hand() {
        // Two images, each hypothesis equal to its only reference: per image the 1- and
        // 2-gram cosines are 1, the 3- and 4-gram ones 0 → mean 0.5, ×10 = 5.
        let refs = vec![vec![t("a b")], vec![t("c d")]];
        let c = cider(&[t("a b"), t("c d")], &refs);
        assert!((c - 5.0).abs() < 1e-9, "{c}");
        // Second hypothesis "c": 1-gram cosine 1/√2, length penalty exp(-1/72).
        let c = cider(&[t("a b"), t("c")], &refs);
        let second = (0.5f64.sqrt() * (-1.0f64 / 72.0).exp()) / 4.0 * 10.0;
        let expected = (5.0 + second) / 2.0;
        assert!((c - expected).abs() < 1e-9, "{c} vs {expected}");
    }
}
