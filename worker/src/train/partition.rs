//! ZeRO's partition of the flat buffers: sharding rank `k` of `S` owns one contiguous block of
//! every flat buffer (parameters, gradients, AdamW moments), the blocks padded to one length so
//! that reduce-scatter and all-gather move equal pieces.

use super::flat::Segment;

/// The block of the flat buffers one sharding rank owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// First owned element.
    pub start: usize,
    /// One past the last owned element (`start + len`, at most the total).
    pub end: usize,
    /// Padded block length: `ceil(total / count)`; every rank's block has this many slots.
    pub block: usize,
    pub index: usize,
    pub count: usize,
}

impl Partition {
    /// Block `index` of `count` over `total` elements.
    pub fn new(total: usize, index: usize, count: usize) -> Self {
        let block = total.div_ceil(count.max(1));
        let start = (index * block).min(total);
        let end = ((index + 1) * block).min(total);
        Self {
            start,
            end,
            block,
            index,
            count,
        }
    }

    /// The whole buffer (no sharding).
    pub fn whole(total: usize) -> Self {
        Self::new(total, 0, 1)
    }

    /// Owned elements.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether this block owns nothing (more ranks than elements).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Padded length of the whole buffer (`block × count`).
    pub fn padded_total(&self) -> usize {
        self.block * self.count
    }

    /// The segments overlapping this block, clipped to it, offsets relative to `start`.
    pub fn segments(&self, all: &[Segment]) -> Vec<Segment> {
        all.iter()
            .filter_map(|s| {
                let from = s.offset.max(self.start);
                let to = (s.offset + s.len).min(self.end);
                (from < to).then(|| Segment {
                    offset: from - self.start,
                    len: to - from,
                    ..s.clone()
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(name: &str, offset: usize, len: usize) -> Segment {
        Segment {
            name: name.into(),
            shape: vec![len],
            offset,
            len,
            lr: 1.0,
            weight_decay: 0.0,
        }
    }

    #[test]
    fn blocks_cover_the_buffer_once() {
        for total in [0, 1, 7, 10, 1001] {
            for count in 1..6 {
                let mut covered = 0;
                for index in 0..count {
                    let p = Partition::new(total, index, count);
                    assert_eq!(p.start, covered.min(total));
                    covered = p.end;
                    assert!(p.len() <= p.block);
                }
                assert_eq!(covered, total, "total {total} count {count}");
            }
        }
    }

    #[test]
    fn segments_are_clipped_to_the_block() {
        let all = [seg("a", 0, 4), seg("b", 4, 3), seg("c", 7, 3)];
        let p = Partition::new(10, 1, 2); // block 5: elements 5..10
        let s = p.segments(&all);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].name.as_str(), s[0].offset, s[0].len), ("b", 0, 2));
        assert_eq!((s[1].name.as_str(), s[1].offset, s[1].len), ("c", 2, 3));
    }
}
