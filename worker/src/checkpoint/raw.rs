//! The element types and tensors that the checkpoint readers return, and the layout helpers
//! (strided gathers, byte swaps) they share.

use anyhow::{bail, Context, Result};

/// Element type as stored in a checkpoint file (before any conversion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawDType {
    /// IEEE-754 binary64.
    F64,
    /// IEEE-754 binary32.
    F32,
    /// IEEE-754 binary16.
    F16,
    /// bfloat16 (the upper half of a binary32).
    BF16,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer (PaddlePaddle stores bfloat16 weights this way).
    U16,
    /// Unsigned 8-bit integer.
    U8,
    /// Boolean, one byte per element (0 or 1).
    Bool,
}

impl RawDType {
    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            RawDType::F64 | RawDType::I64 => 8,
            RawDType::F32 | RawDType::I32 => 4,
            RawDType::F16 | RawDType::BF16 | RawDType::I16 | RawDType::U16 => 2,
            RawDType::U8 | RawDType::Bool => 1,
        }
    }
}

/// A tensor as read from a file: little-endian bytes in row-major (C) order.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// Element type of `data`.
    pub dtype: RawDType,
    /// Dimensions, outermost first; empty for a scalar.
    pub shape: Vec<usize>,
    /// `numel * dtype.size_in_bytes()` little-endian bytes, C-contiguous.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Number of elements (the product of `shape`; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Gathers a strided view of `storage` (strides and offset counted in elements, as torch and
    /// numpy-in-elements do) into a new C-contiguous tensor. Fails, without panicking, when the
    /// view reaches outside `storage` or its size overflows.
    pub fn from_strided(
        dtype: RawDType,
        shape: &[usize],
        strides: &[usize],
        offset: usize,
        storage: &[u8],
    ) -> Result<RawTensor> {
        if shape.len() != strides.len() {
            bail!("shape {shape:?} and strides {strides:?} have different numbers of dimensions");
        }
        let elem = dtype.size_in_bytes();
        let numel = checked_numel(shape)?;
        let nbytes = numel
            .checked_mul(elem)
            .with_context(|| format!("tensor of shape {shape:?} is too large"))?;
        if numel == 0 {
            return Ok(RawTensor {
                dtype,
                shape: shape.to_vec(),
                data: Vec::new(),
            });
        }
        // The furthest element the view touches must lie inside the storage.
        let mut last = offset;
        for (&d, &s) in shape.iter().zip(strides) {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .context("tensor view offsets overflow")?;
        }
        let end = last
            .checked_add(1)
            .and_then(|n| n.checked_mul(elem))
            .context("tensor view offsets overflow")?;
        if end > storage.len() {
            bail!(
                "tensor view (shape {shape:?}, strides {strides:?}, offset {offset}) needs {end} \
                 bytes but its storage holds {}",
                storage.len()
            );
        }

        let (inner_len, inner_stride) = match (shape.last(), strides.last()) {
            (Some(&d), Some(&s)) => (d, s),
            _ => (1, 1), // scalar
        };
        let outer = &shape[..shape.len().saturating_sub(1)];
        let outer_strides = &strides[..strides.len().saturating_sub(1)];
        let mut data = Vec::with_capacity(nbytes);
        let mut index = vec![0usize; outer.len()];
        loop {
            let base = offset
                + index
                    .iter()
                    .zip(outer_strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            if inner_stride == 1 {
                data.extend_from_slice(&storage[base * elem..(base + inner_len) * elem]);
            } else {
                for i in 0..inner_len {
                    let at = (base + i * inner_stride) * elem;
                    data.extend_from_slice(&storage[at..at + elem]);
                }
            }
            // Advance the outer multi-index, last axis fastest.
            let mut axis = outer.len();
            loop {
                if axis == 0 {
                    return Ok(RawTensor {
                        dtype,
                        shape: shape.to_vec(),
                        data,
                    });
                }
                axis -= 1;
                index[axis] += 1;
                if index[axis] < outer[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
    }

    /// Reverses the byte order of every element (big-endian to little-endian or back).
    pub fn swap_byte_order(&mut self) {
        let elem = self.dtype.size_in_bytes();
        if elem > 1 {
            for chunk in self.data.chunks_exact_mut(elem) {
                chunk.reverse();
            }
        }
    }
}

/// Product of `shape`, failing on overflow.
pub fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .with_context(|| format!("tensor of shape {shape:?} has too many elements"))
}

/// Row-major (C order) strides, in elements, for `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(shape[i + 1]);
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn strided_gather_transposes() {
        // Storage holds a 2x3 matrix [[0,1,2],[3,4,5]]; view its transpose (3x2, strides [1,3]).
        let storage = f32_bytes(&[0., 1., 2., 3., 4., 5.]);
        let t = RawTensor::from_strided(RawDType::F32, &[3, 2], &[1, 3], 0, &storage).unwrap();
        assert_eq!(t.data, f32_bytes(&[0., 3., 1., 4., 2., 5.]));
        assert_eq!(t.numel(), 6);
    }

    #[test]
    fn strided_gather_with_offset_and_scalar() {
        let storage = f32_bytes(&[0., 1., 2., 3., 4., 5.]);
        let t = RawTensor::from_strided(RawDType::F32, &[2], &[1], 4, &storage).unwrap();
        assert_eq!(t.data, f32_bytes(&[4., 5.]));
        let s = RawTensor::from_strided(RawDType::F32, &[], &[], 3, &storage).unwrap();
        assert_eq!(s.data, f32_bytes(&[3.]));
        let e = RawTensor::from_strided(RawDType::F32, &[0, 4], &[4, 1], 9, &storage).unwrap();
        assert!(e.data.is_empty());
    }

    #[test]
    fn strided_gather_rejects_out_of_bounds_and_overflow() {
        let storage = f32_bytes(&[0., 1., 2., 3.]);
        assert!(RawTensor::from_strided(RawDType::F32, &[2, 2], &[2, 1], 1, &storage).is_err());
        assert!(RawTensor::from_strided(RawDType::F32, &[2], &[usize::MAX], 0, &storage).is_err());
        assert!(RawTensor::from_strided(RawDType::F32, &[2], &[1, 1], 0, &storage).is_err());
        assert!(
            RawTensor::from_strided(RawDType::F32, &[usize::MAX, 4], &[4, 1], 0, &storage).is_err()
        );
    }

    #[test]
    fn contiguous_strides_and_swap() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<usize>::new());
        let mut t = RawTensor {
            dtype: RawDType::U16,
            shape: vec![2],
            data: vec![1, 2, 3, 4],
        };
        t.swap_byte_order();
        assert_eq!(t.data, vec![2, 1, 4, 3]);
    }
}
