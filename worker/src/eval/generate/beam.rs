//! Hugging Face transformers' `BeamSearchScorer` and `BeamHypotheses` for group (diverse) beam
//! search, as open_clip's `CoCa._generate_beamsearch` drives them: one set of finished
//! hypotheses per image and group, length penalty applied as `score / len^length_penalty`, and
//! `early_stopping` false (the heuristic "no open beam can still beat the worst kept one").

use anyhow::{bail, Result};

/// The finished hypotheses of one image and group, best `capacity` kept.
#[derive(Debug, Clone)]
pub struct BeamHypotheses {
    capacity: usize,
    length_penalty: f64,
    /// `(score, tokens)` in insertion order, as HF keeps them.
    pub beams: Vec<(f64, Vec<u32>)>,
    worst_score: f64,
}

impl BeamHypotheses {
    /// Empty, keeping at most `capacity` hypotheses.
    pub fn new(capacity: usize, length_penalty: f64) -> Self {
        Self {
            capacity,
            length_penalty,
            beams: Vec::new(),
            worst_score: 1e9,
        }
    }

    /// Offers `tokens` with summed score `sum_scores` over `generated_len` positions.
    pub fn add(&mut self, tokens: Vec<u32>, sum_scores: f64, generated_len: usize) {
        let score = sum_scores / (generated_len as f64).powf(self.length_penalty);
        if self.beams.len() < self.capacity || score > self.worst_score {
            self.beams.push((score, tokens));
            if self.beams.len() > self.capacity {
                // sorted((s, idx)): the smallest score, the lower index first on ties.
                let mut order: Vec<(f64, usize)> = self
                    .beams
                    .iter()
                    .enumerate()
                    .map(|(i, (s, _))| (*s, i))
                    .collect();
                order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                self.beams.remove(order[0].1);
                self.worst_score = order[1].0;
            } else {
                self.worst_score = score.min(self.worst_score);
            }
        }
    }

    /// HF's `is_done` with `early_stopping=False`.
    pub fn is_done(&self, best_sum_scores: f64, cur_len: usize) -> bool {
        if self.beams.len() < self.capacity {
            return false;
        }
        let highest = best_sum_scores / (cur_len as f64).powf(self.length_penalty);
        self.worst_score >= highest
    }
}

/// One group's candidates for one image: the `2·group_size` best `(score, token, beam)` with
/// `beam` the row inside the group's rows of that image.
pub type Candidates = Vec<(f32, u32, usize)>;

/// What [`BeamSearchScorer::process`] returns for one group: per row of the group's rows
/// (image-major), the new score, token and source row (an index into the group's rows).
#[derive(Debug, Clone)]
pub struct GroupStep {
    /// Running score of each continued beam.
    pub scores: Vec<f32>,
    /// The token each beam appends.
    pub tokens: Vec<u32>,
    /// The row (within the group's rows) each beam continues.
    pub sources: Vec<usize>,
}

/// `BeamSearchScorer(batch_size, num_beams, num_beam_groups, length_penalty, do_early_stopping=False)`.
#[derive(Debug, Clone)]
pub struct BeamSearchScorer {
    batch: usize,
    groups: usize,
    group_size: usize,
    /// `hyps[b * groups + g]`.
    hyps: Vec<BeamHypotheses>,
    done: Vec<bool>,
}

impl BeamSearchScorer {
    /// `num_beams` must be a multiple of `num_beam_groups`, and larger than 1.
    pub fn new(batch: usize, num_beams: usize, groups: usize, length_penalty: f64) -> Result<Self> {
        if num_beams <= 1 {
            bail!("--num_beams must be greater than 1 for beam search, got {num_beams}");
        }
        if groups == 0 || groups > num_beams || !num_beams.is_multiple_of(groups) {
            bail!(
                "--num_beam_groups must divide --num_beams and be at most it, got {groups} groups \
                 of {num_beams} beams"
            );
        }
        let group_size = num_beams / groups;
        Ok(Self {
            batch,
            groups,
            group_size,
            hyps: (0..batch * groups)
                .map(|_| BeamHypotheses::new(group_size, length_penalty))
                .collect(),
            done: vec![false; batch * groups],
        })
    }

    /// Whether every image's every group is done.
    pub fn is_done(&self) -> bool {
        self.done.iter().all(|&d| d)
    }

    /// HF's `process` for group `group`: `rows` are the group's current sequences (image-major,
    /// `group_size` per image), `candidates[b]` image `b`'s top `2·group_size` continuations,
    /// sorted best first. A candidate ending in `eos` among the first `group_size` becomes a
    /// finished hypothesis; the others continue the beams.
    pub fn process(
        &mut self,
        group: usize,
        rows: &[Vec<u32>],
        candidates: &[Candidates],
        eos: u32,
        pad: u32,
    ) -> Result<GroupStep> {
        let gs = self.group_size;
        let n = self.batch * gs;
        let cur_len = rows.first().map_or(0, Vec::len) + 1;
        let mut step = GroupStep {
            scores: vec![0.0; n],
            tokens: vec![0; n],
            sources: vec![0; n],
        };
        for (b, cands) in candidates.iter().enumerate() {
            let bg = b * self.groups + group;
            if self.done[bg] {
                for i in 0..gs {
                    step.scores[b * gs + i] = 0.0;
                    step.tokens[b * gs + i] = pad;
                    step.sources[b * gs + i] = 0;
                }
                continue;
            }
            let mut beam = 0;
            for (rank, &(score, token, index)) in cands.iter().enumerate() {
                let row = b * gs + index;
                if token == eos {
                    if rank >= gs {
                        continue;
                    }
                    self.hyps[bg].add(rows[row].clone(), score as f64, cur_len);
                } else {
                    step.scores[b * gs + beam] = score;
                    step.tokens[b * gs + beam] = token;
                    step.sources[b * gs + beam] = row;
                    beam += 1;
                }
                if beam == gs {
                    break;
                }
            }
            if beam < gs {
                bail!("beam search: more than {gs} of the candidates end the sequence");
            }
            let best = cands.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
            self.done[bg] = self.done[bg] || self.hyps[bg].is_done(best as f64, cur_len);
        }
        Ok(step)
    }

    /// HF's `finalize`: open beams of unfinished groups join the hypotheses; per image the best
    /// hypothesis over all its groups, followed by `eos` when shorter than `max_len`, padded with
    /// `pad` to a common width when lengths differ. `rows[b * num_beams + j]` and `scores` are the
    /// final beams.
    pub fn finalize(
        mut self,
        rows: &[Vec<u32>],
        scores: &[f32],
        max_len: usize,
        eos: u32,
        pad: u32,
    ) -> Vec<Vec<u32>> {
        for bg in 0..self.hyps.len() {
            if self.done[bg] {
                continue;
            }
            for k in 0..self.group_size {
                let row = bg * self.group_size + k;
                let tokens = rows[row].clone();
                let len = tokens.len();
                self.hyps[bg].add(tokens, scores[row] as f64, len);
            }
        }
        let best: Vec<Vec<u32>> = (0..self.batch)
            .map(|b| {
                let mut candidates: Vec<&(f64, Vec<u32>)> = self.hyps
                    [b * self.groups..(b + 1) * self.groups]
                    .iter()
                    .flat_map(|h| h.beams.iter())
                    .collect();
                // sorted(key=score) is stable; pop() takes the last of the largest.
                candidates.sort_by(|a, b| a.0.total_cmp(&b.0));
                candidates.last().map(|c| c.1.clone()).unwrap_or_default()
            })
            .collect();
        let longest = best.iter().map(Vec::len).max().unwrap_or(0);
        let width = (longest + 1).min(max_len);
        best.into_iter()
            .map(|mut seq| {
                if seq.len() < width {
                    seq.push(eos);
                }
                seq.resize(width.max(seq.len()), pad);
                seq
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypotheses_keep_the_best_and_track_the_worst() {
        let mut h = BeamHypotheses::new(2, 1.0);
        h.add(vec![1], -4.0, 2); // -2
        h.add(vec![2], -2.0, 2); // -1
        assert_eq!(h.worst_score, -2.0);
        h.add(vec![3], -9.0, 3); // -3: not better than the worst
        assert_eq!(h.beams.len(), 2);
        h.add(vec![4], -1.5, 3); // -0.5 replaces -2
        let kept: Vec<u32> = h.beams.iter().map(|b| b.1[0]).collect();
        assert_eq!(kept, vec![2, 4]);
        assert_eq!(h.worst_score, -1.0);
        assert!(h.is_done(-2.5, 2)); // best attainable -1.25 <= worst -1
        assert!(!h.is_done(-1.0, 2));
    }

    #[test]
    fn scorer_rejects_bad_group_counts() {
        assert!(BeamSearchScorer::new(1, 6, 4, 1.0).is_err());
        assert!(BeamSearchScorer::new(1, 1, 1, 1.0).is_err());
        assert!(BeamSearchScorer::new(1, 6, 3, 1.0).is_ok());
    }
}
