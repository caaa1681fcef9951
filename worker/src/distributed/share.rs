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

/// Largest byte string one rank may contribute (lengths travel as exact `f32` integers).
const MAX_BYTES: usize = 1 << 24;

/// Every rank's `bytes`, in rank order.
pub fn all_gather_bytes(comm: &dyn Collective, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    if bytes.len() > MAX_BYTES {
        bail!(
            "cannot gather {} bytes from one rank (at most {MAX_BYTES})",
            bytes.len()
        );
    }
    let mut lengths = vec![0f32; comm.size()];
    comm.all_gather(&[bytes.len() as f32], &mut lengths)
        .context("gathering result sizes")?;
    let longest = lengths.iter().fold(0f32, |a, &b| a.max(b)) as usize;
    let mut padded = vec![0f32; longest];
    for (slot, &b) in padded.iter_mut().zip(bytes) {
        *slot = b as f32;
    }
    let mut all = vec![0f32; longest * comm.size()];
    comm.all_gather(&padded, &mut all)
        .context("gathering results")?;
    Ok(lengths
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            all[r * longest..r * longest + n as usize]
                .iter()
                .map(|&v| v as u8)
                .collect()
        })
        .collect())
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
    fn strings_round_trip_alone() {
        let s = vec!["a cat".to_string(), "ünïcödé".to_string()];
        assert_eq!(all_gather_strings(&SingleProcess, &s).unwrap(), s);
        let bytes = all_gather_bytes(&SingleProcess, b"xyz").unwrap();
        assert_eq!(bytes, vec![b"xyz".to_vec()]);
    }
}
