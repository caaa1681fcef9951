//! A contiguous transpose of a matrix, in cache-sized tiles.
//!
//! A linear layer multiplies by `Wᵀ` of a PyTorch-layout weight `[out, in]`. The `gemm` crate
//! packs such a transposed right-hand side slowly when `in` is large (the MLP's `c_proj`:
//! 117 GFLOP/s against 211 for the same product with a contiguous `[in, out]` matrix, measured
//! on an AVX-512 CPU), and candle's strided copy moves one element at a time. Copying the
//! weight once per product in tiles costs far less than the difference. Each tile is moved in
//! 8 × 8 register blocks: B-32's `c_proj` weight (768 × 3072) takes 1.0 ms instead of the
//! 3.4 ms of a column-by-column copy, whose 32 reads per column all fall into one cache set
//! (a row pitch of 12 KiB), on the 2-core AVX-512 machine of the README's figures.

use super::{f32_data, fused_on_cpu, portable};
use crate::multiversion;
use crate::simd::KernelFamily;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows and columns of one tile: 32 × 32 float32 is 4 KiB read and 4 KiB written.
const TILE: usize = 32;

/// `xᵀ` of a 2-D tensor as a new contiguous tensor, with a backward that transposes the
/// gradient back. Float32 on the CPU runs the tiled kernel; anything else runs
/// [`super::portable::transpose_contiguous`] (same dtype).
pub fn transpose_contiguous(x: &Tensor) -> Result<Tensor> {
    x.dims2()?;
    if !fused_on_cpu(&[x]) {
        return portable::transpose_contiguous(x);
    }
    x.contiguous()?.apply_op1(Transpose)
}

/// Side of the register blocks a tile is transposed in.
const BLOCK: usize = 8;

/// `dst[c][r] = src[r][c]` for a `rows × cols` row-major `src`.
fn transpose_into(dst: &mut [f32], src: &[f32], rows: usize, cols: usize) {
    let family = KernelFamily::active();
    // Each task writes TILE rows of the output (TILE source columns), all source rows.
    dst.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(block, dst)| transpose_columns(family, dst, src, rows, cols, block * TILE));
}

multiversion! {
    /// Rows `c0..` of the transpose (source columns `c0 .. c0 + dst.len() / rows`) into `dst`:
    /// 8 × 8 blocks read as eight row pieces and written as eight, so both sides move whole
    /// vectors (a column-by-column copy strides through the source, and with a power-of-two
    /// row pitch all of a tile's rows fall into one cache set); the edges element by element.
    pub(super) fn transpose_columns(dst: &mut [f32], src: &[f32], rows: usize, cols: usize, c0: usize) {
        let width = dst.len() / rows;
        let (full_r, full_c) = (rows - rows % BLOCK, width - width % BLOCK);
        for r in (0..full_r).step_by(BLOCK) {
            for c in (0..full_c).step_by(BLOCK) {
                let mut block = [[0f32; BLOCK]; BLOCK];
                for (i, row) in block.iter_mut().enumerate() {
                    let at = (r + i) * cols + c0 + c;
                    row.copy_from_slice(&src[at..at + BLOCK]);
                }
                let columns: [[f32; BLOCK]; BLOCK] =
                    std::array::from_fn(|j| std::array::from_fn(|i| block[i][j]));
                for (j, column) in columns.iter().enumerate() {
                    let at = (c + j) * rows + r;
                    dst[at..at + BLOCK].copy_from_slice(column);
                }
            }
        }
        // The edges: rows past the last full block, then columns past it.
        for c in 0..width {
            let from = if c < full_c { full_r } else { 0 };
            for r in from..rows {
                dst[c * rows + r] = src[r * cols + c0 + c];
            }
        }
    }
}

struct Transpose;

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), s, l)?;
        let (rows, cols) = l.shape().dims2()?;
        let mut y = vec![0f32; x.len()];
        transpose_into(&mut y, x, rows, cols);
        Ok((CpuStorage::F32(y), Shape::from((cols, rows))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Transpose)?))
    }
}
