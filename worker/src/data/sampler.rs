//! The distributed sampler: which sample indices each rank reads for each batch.
//!
//! A permutation of the whole data set is drawn from (seed, epoch) alone; global batch `b` is
//! `perm[b·G .. (b+1)·G]` with `G` the global batch size, and data-parallel rank `r` takes the
//! `r`-th slice of it. The same seed therefore gives the same global batches whatever the world
//! size (the seed's loader gives every rank the same samples; this one does not).

use crate::rng::{mix_seed, SplitMix64};
use anyhow::{bail, Result};

/// Which samples a data-parallel rank reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedSampler {
    pub len: usize,
    pub seed: u64,
    /// Samples per global batch (per-rank batch × data-parallel world).
    pub global_batch: usize,
    pub rank: usize,
    pub world: usize,
}

impl DistributedSampler {
    pub fn new(
        len: usize,
        seed: u64,
        per_rank_batch: usize,
        rank: usize,
        world: usize,
    ) -> Result<Self> {
        if world == 0 || rank >= world {
            bail!("rank {rank} is outside a data-parallel world of {world}");
        }
        let global_batch = per_rank_batch * world;
        if global_batch == 0 || global_batch > len {
            bail!(
                "the global batch ({per_rank_batch} per rank × {world} ranks = {global_batch}) \
                 must be between 1 and the data set size {len}"
            );
        }
        Ok(Self {
            len,
            seed,
            global_batch,
            rank,
            world,
        })
    }

    /// Full batches per epoch (the incomplete last batch is dropped, as open_clip does).
    pub fn batches_per_epoch(&self) -> usize {
        self.len / self.global_batch
    }

    /// The epoch's permutation of `0..len`.
    pub fn permutation(&self, epoch: u64) -> Vec<u64> {
        let mut perm: Vec<u64> = (0..self.len as u64).collect();
        let mut rng = SplitMix64(mix_seed(&[self.seed, epoch]));
        for i in (1..perm.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        perm
    }

    /// This rank's sample indices for batch `batch` of the epoch whose permutation is `perm`.
    pub fn rank_slice<'a>(&self, perm: &'a [u64], batch: usize) -> &'a [u64] {
        let per_rank = self.global_batch / self.world;
        let start = batch * self.global_batch + self.rank * per_rank;
        &perm[start..start + per_rank]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_batches_do_not_depend_on_the_world_size() {
        let one = DistributedSampler::new(103, 7, 12, 0, 1).unwrap();
        let perm = one.permutation(3);
        for world in [2, 3, 4] {
            let per_rank = 12 / world;
            for batch in 0..one.batches_per_epoch() {
                let mut union = Vec::new();
                for rank in 0..world {
                    let s = DistributedSampler::new(103, 7, per_rank, rank, world).unwrap();
                    assert_eq!(s.permutation(3), perm);
                    union.extend_from_slice(s.rank_slice(&perm, batch));
                }
                assert_eq!(
                    union,
                    one.rank_slice(&perm, batch),
                    "world {world} batch {batch}"
                );
            }
        }
    }

    #[test]
    fn epochs_permute_differently_and_completely() {
        let s = DistributedSampler::new(50, 1, 5, 0, 1).unwrap();
        let (a, b) = (s.permutation(0), s.permutation(1));
        assert_ne!(a, b);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<u64>>());
    }

    #[test]
    fn impossible_layouts_are_errors() {
        assert!(DistributedSampler::new(10, 0, 4, 0, 3).is_err());
        assert!(DistributedSampler::new(10, 0, 2, 2, 2).is_err());
        assert!(DistributedSampler::new(10, 0, 0, 0, 1).is_err());
    }
}
