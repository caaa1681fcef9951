//! The parallel layout of a job: world size, the tensor-, sharding- and data-parallel degrees,
//! each rank's coordinates and every group's members.
//!
//! One small type validates every degree, derives the free one (data parallelism) and names the
//! groups, so the launcher and the workers cannot disagree about who talks to whom. Rank order
//! is tp innermost, then sharding, then dp: the ranks of a tensor-parallel group are adjacent
//! and therefore stay on one node whenever tp divides the processes per node.

use anyhow::{bail, Result};

/// The per-device batch of an elastic job's generation, set by `coca-launch` for every worker
/// when the job may run on fewer nodes than it started with (`--nnodes MIN:MAX`): the command's
/// batch scaled so that every micro-batch keeps its samples on fewer data-parallel ranks.
pub const PER_DEVICE_BATCH_ENV: &str = "COCA_PER_DEVICE_TRAIN_BATCH_SIZE";

/// `gpu` for the workers `coca-launch` starts one per GPU (`--nproc-per-node gpu`/`auto` on a
/// node with GPUs), and for their command's check before they start.
pub const DEVICE_KIND_ENV: &str = "COCA_DEVICE_KIND";

/// Degrees of a job and the mapping between ranks and coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub world: usize,
    pub tp: usize,
    pub sharding: usize,
    pub dp: usize,
}

/// A rank's position along each parallel dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coordinates {
    pub dp: usize,
    pub sharding: usize,
    pub tp: usize,
}

/// The parallel dimensions a group can span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    /// Ranks holding different slices of the same layers (same samples).
    Tensor,
    /// Ranks partitioning optimizer state (and gradients at stage 2); they read different
    /// samples.
    Sharding,
    /// Replicas reading different samples.
    Data,
    /// Every rank that reads different samples and reduces gradients together: sharding × dp.
    DataAndSharding,
}

impl Topology {
    /// Derives the data-parallel degree: `world / (tp × sharding)`, which must divide exactly.
    pub fn new(world: usize, tp: usize, sharding: usize) -> Result<Self> {
        if world == 0 {
            bail!("the world size must be at least 1");
        }
        if tp == 0 || sharding == 0 {
            bail!(
                "parallel degrees must be at least 1 (tensor_parallel_degree {tp}, \
                 sharding_parallel_degree {sharding})"
            );
        }
        let model = tp * sharding;
        if !world.is_multiple_of(model) || world < model {
            bail!(
                "the world of {world} processes cannot be split into tensor_parallel_degree {tp} \
                 × sharding_parallel_degree {sharding} = {model}: {world} / {model} = {:.3} is not \
                 a whole number ≥ 1",
                world as f64 / model as f64
            );
        }
        Ok(Self {
            world,
            tp,
            sharding,
            dp: world / model,
        })
    }

    /// Where `rank` sits.
    pub fn coordinates(&self, rank: usize) -> Result<Coordinates> {
        if rank >= self.world {
            bail!("rank {rank} is outside the world of {}", self.world);
        }
        Ok(Coordinates {
            tp: rank % self.tp,
            sharding: (rank / self.tp) % self.sharding,
            dp: rank / (self.tp * self.sharding),
        })
    }

    /// The rank at `c`.
    pub fn rank(&self, c: Coordinates) -> usize {
        (c.dp * self.sharding + c.sharding) * self.tp + c.tp
    }

    /// The members (ascending ranks) of `rank`'s group of `kind`.
    pub fn group(&self, rank: usize, kind: GroupKind) -> Result<Vec<usize>> {
        let c = self.coordinates(rank)?;
        let members = match kind {
            GroupKind::Tensor => (0..self.tp)
                .map(|tp| self.rank(Coordinates { tp, ..c }))
                .collect(),
            GroupKind::Sharding => (0..self.sharding)
                .map(|sharding| self.rank(Coordinates { sharding, ..c }))
                .collect(),
            GroupKind::Data => (0..self.dp)
                .map(|dp| self.rank(Coordinates { dp, ..c }))
                .collect(),
            GroupKind::DataAndSharding => {
                let mut m: Vec<usize> = (0..self.dp)
                    .flat_map(|dp| {
                        (0..self.sharding).map(move |sharding| Coordinates {
                            dp,
                            sharding,
                            tp: c.tp,
                        })
                    })
                    .map(|x| self.rank(x))
                    .collect();
                m.sort_unstable();
                m
            }
        };
        Ok(members)
    }

    /// How many ranks read different samples (the data-parallel world of the loader).
    pub fn data_world(&self) -> usize {
        self.dp * self.sharding
    }

    /// This rank's index among the ranks that read different samples.
    pub fn data_rank(&self, rank: usize) -> Result<usize> {
        let c = self.coordinates(rank)?;
        Ok(c.dp * self.sharding + c.sharding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_dp_and_orders_tp_innermost() {
        let t = Topology::new(16, 2, 4).unwrap();
        assert_eq!(t.dp, 2);
        assert_eq!(
            t.coordinates(11).unwrap(),
            Coordinates {
                dp: 1,
                sharding: 1,
                tp: 1
            }
        );
        for rank in 0..16 {
            assert_eq!(t.rank(t.coordinates(rank).unwrap()), rank);
        }
        assert_eq!(t.group(5, GroupKind::Tensor).unwrap(), vec![4, 5]);
        assert_eq!(t.group(5, GroupKind::Sharding).unwrap(), vec![1, 3, 5, 7]);
        assert_eq!(t.group(5, GroupKind::Data).unwrap(), vec![5, 13]);
        assert_eq!(
            t.group(5, GroupKind::DataAndSharding).unwrap(),
            vec![1, 3, 5, 7, 9, 11, 13, 15]
        );
        assert_eq!(t.data_world(), 8);
        assert_eq!(t.data_rank(5).unwrap(), 2);
        assert_eq!(t.data_rank(4).unwrap(), 2, "tp peers read the same samples");
    }

    #[test]
    fn every_rank_is_in_exactly_one_group_of_each_kind() {
        let t = Topology::new(24, 2, 3).unwrap();
        for kind in [GroupKind::Tensor, GroupKind::Sharding, GroupKind::Data] {
            let mut seen = vec![0; 24];
            for rank in 0..24 {
                let g = t.group(rank, kind).unwrap();
                assert!(g.contains(&rank));
                if g[0] == rank {
                    g.iter().for_each(|&r| seen[r] += 1);
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{kind:?}: {seen:?}");
        }
    }

    #[test]
    fn bad_layouts_show_the_arithmetic() {
        let err = Topology::new(12, 8, 1).unwrap_err().to_string();
        assert!(err.contains("12 / 8 = 1.500"), "{err}");
        let err = Topology::new(4, 2, 4).unwrap_err().to_string();
        assert!(err.contains("2 × sharding_parallel_degree 4 = 8"), "{err}");
        assert!(Topology::new(4, 0, 1).is_err());
        assert!(Topology::new(0, 1, 1).is_err());
        assert!(Topology::new(4, 1, 1).unwrap().coordinates(4).is_err());
    }
}
