//! Splitting evaluation work across ranks and putting the results back together: each rank
//! takes one contiguous block of the items, so gathering blocks in rank order restores the
//! original order and the numbers do not depend on the world size.

use anyhow::{bail, Context, Result};
use coca_common::collective::Collective;
use std::ops::Range;

/// The block of `len` items that `rank` of `world` handles (blocks differ by at most one).
pub fn block(len: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// `len` items in batches of `batch`, dealt to the `world` ranks in turn (batch `b` to rank
/// `b % world`): in round `k` every rank handles one batch, and gathering a round's results in
/// rank order gives items [`Self::round`] in order. So results can be written as each round
/// ends, and every batch holds the same items as one process's batch would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DealtBatches {
    /// How many items.
    pub len: usize,
    /// Items per batch (at least 1).
    pub batch: usize,
    /// This rank.
    pub rank: usize,
    /// How many ranks.
    pub world: usize,
}

impl DealtBatches {
    /// The items of this rank's batches, in order.
    pub fn mine(&self) -> Vec<usize> {
        let batches = self.len.div_ceil(self.batch);
        (self.rank..batches)
            .step_by(self.world.max(1))
            .flat_map(|b| b * self.batch..((b + 1) * self.batch).min(self.len))
            .collect()
    }

    /// How many rounds every rank takes part in (the last may give some ranks no batch).
    pub fn rounds(&self) -> usize {
        self.len.div_ceil(self.batch * self.world.max(1))
    }

    /// The items round `k` covers over all ranks, in order.
    pub fn round(&self, k: usize) -> Range<usize> {
        let per_round = self.batch * self.world.max(1);
        (k * per_round).min(self.len)..((k + 1) * per_round).min(self.len)
    }
}

/// Bytes each rank sends per round of [`all_gather_bytes`] (each byte travels as one `f32`, so
/// a round's buffers are 4 × this per rank).
const ROUND_BYTES: usize = 1 << 22;

/// Every rank's `bytes`, in rank order, of any length (the lengths travel first, then the
/// bytes in rounds of [`ROUND_BYTES`]).
pub fn all_gather_bytes(comm: &dyn Collective, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    all_gather_bytes_in_rounds(comm, bytes, ROUND_BYTES)
}

/// [`all_gather_bytes`] with rounds of `round` bytes per rank.
fn all_gather_bytes_in_rounds(
    comm: &dyn Collective,
    bytes: &[u8],
    round: usize,
) -> Result<Vec<Vec<u8>>> {
    // Each length as two 24-bit halves, which an f32 holds exactly.
    let len = bytes.len() as u64;
    if len >= 1 << 48 {
        bail!("cannot gather {len} bytes from one rank");
    }
    let halves = [(len >> 24) as f32, (len & 0xff_ffff) as f32];
    let mut all_halves = vec![0f32; 2 * comm.size()];
    comm.all_gather(&halves, &mut all_halves)
        .context("gathering result sizes")?;
    let lengths: Vec<usize> = all_halves
        .chunks_exact(2)
        .map(|h| ((h[0] as u64) << 24 | h[1] as u64) as usize)
        .collect();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let mut out: Vec<Vec<u8>> = lengths.iter().map(|&n| Vec::with_capacity(n)).collect();
    let mut start = 0;
    while start < longest {
        let width = round.min(longest - start);
        let mut padded = vec![0f32; width];
        let mine = bytes
            .get(start..(start + width).min(bytes.len()))
            .unwrap_or(&[]);
        for (slot, &b) in padded.iter_mut().zip(mine) {
            *slot = b as f32;
        }
        let mut all = vec![0f32; width * comm.size()];
        comm.all_gather(&padded, &mut all)
            .context("gathering results")?;
        for (r, (part, &n)) in out.iter_mut().zip(&lengths).enumerate() {
            let take = n.saturating_sub(start).min(width);
            part.extend(all[r * width..r * width + take].iter().map(|&v| v as u8));
        }
        start += width;
    }
    Ok(out)
}

/// Every rank's strings, concatenated in rank order.
pub fn all_gather_strings(comm: &dyn Collective, mine: &[String]) -> Result<Vec<String>> {
    if comm.size() == 1 {
        return Ok(mine.to_vec());
    }
    let bytes = serde_json::to_vec(mine)?;
    let mut out = Vec::new();
    for (rank, part) in all_gather_bytes(comm, &bytes)?.into_iter().enumerate() {
        let strings: Vec<String> = serde_json::from_slice(&part)
            .with_context(|| format!("rank {rank} sent malformed results"))?;
        out.extend(strings);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coca_common::collective::SingleProcess;

    #[test]
    fn blocks_tile_the_items_in_order() {
        for len in [0, 1, 5, 10, 11] {
            for world in 1..5 {
                let mut next = 0;
                for rank in 0..world {
                    let b = block(len, rank, world);
                    assert_eq!(b.start, next);
                    next = b.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn dealt_batches_cover_every_item_once_round_by_round() {
        for len in [0, 1, 5, 7, 12] {
            for batch in 1..4 {
                for world in 1..5 {
                    let deal = |rank| DealtBatches {
                        len,
                        batch,
                        rank,
                        world,
                    };
                    let mine: Vec<Vec<usize>> = (0..world).map(|r| deal(r).mine()).collect();
                    // Round k is each rank's k-th batch, concatenated in rank order.
                    let mut joined: Vec<usize> = Vec::new();
                    for k in 0..deal(0).rounds() {
                        let mut round: Vec<usize> = Vec::new();
                        for m in &mine {
                            round.extend(m.iter().skip(k * batch).take(batch).copied());
                        }
                        assert_eq!(round, deal(0).round(k).collect::<Vec<_>>());
                        joined.extend(round);
                    }
                    assert_eq!(
                        joined,
                        (0..len).collect::<Vec<_>>(),
                        "{len} {batch} {world}"
                    );
                }
            }
        }
    }

    #[test]
    fn strings_round_trip_alone() {
        let s = vec!["a cat".to_string(), "ünïcödé".to_string()];
        assert_eq!(all_gather_strings(&SingleProcess, &s).unwrap(), s);
        let bytes = all_gather_bytes(&SingleProcess, b"xyz").unwrap();
        assert_eq!(bytes, vec![b"xyz".to_vec()]);
    }

    /// Three ranks over a loopback ring with rounds of 4 bytes: lengths 0, 9 and 4 (none, over
    /// two rounds, exactly one) come back whole and in rank order on every rank.
    #[test]
    fn bytes_of_any_length_gather_in_rounds() {
        let parts: [&[u8]; 3] = [b"", b"123456789", b"abcd"];
        let got =
            crate::distributed::loopback_ring::on_loopback_ring("share-bytes", 3, |rank, ring| {
                all_gather_bytes_in_rounds(ring.as_ref(), parts[rank], 4).unwrap()
            });
        let expected: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
        for (rank, g) in got.iter().enumerate() {
            assert_eq!(g, &expected, "rank {rank}");
        }
    }
}
