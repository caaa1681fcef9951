//! Launch geometry of the CUDA kernels (`worker/kernels/fused_ops.cu`): one definition, read by
//! the launches on a GPU (`ops/cuda.rs`, in the `cuda` build) and by the test that runs the
//! same kernels emulated on the CPU (`worker/tests/cuda_kernels_emulated.rs`), so that what is
//! tested here is what runs there. Compiled in every build: it is arithmetic only.

/// Warps per block of the row kernels; each warp takes one row.
pub const ROW_WARPS: u32 = 4;
/// Threads per block of the elementwise and per-column kernels.
pub const BLOCK: u32 = 256;
/// Rows per partial sum of the layer norm's weight and bias gradients.
pub const COLUMN_CHUNK: usize = 256;
/// The most blocks an elementwise kernel starts (its threads stride over the rest).
const MAX_ELEMENTWISE_BLOCKS: usize = 1 << 16;

/// A kernel's grid (x, y) and threads per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32),
    pub block: u32,
}

/// `ceil(n / d)` as a grid dimension.
fn blocks(n: usize, d: usize) -> u32 {
    n.div_ceil(d).max(1).min(u32::MAX as usize) as u32
}

/// A row kernel over `rows` rows: one warp per row.
pub fn rows(rows: usize) -> Geometry {
    Geometry {
        grid: (blocks(rows, ROW_WARPS as usize), 1),
        block: 32 * ROW_WARPS,
    }
}

/// An elementwise kernel over `n` values (grid-stride loop).
pub fn elementwise(n: usize) -> Geometry {
    Geometry {
        grid: (
            blocks(n, BLOCK as usize).min(MAX_ELEMENTWISE_BLOCKS as u32),
            1,
        ),
        block: BLOCK,
    }
}

/// How many row chunks the layer norm's weight and bias gradients are summed in.
pub fn column_chunks(rows: usize) -> usize {
    rows.div_ceil(COLUMN_CHUNK).max(1)
}

/// The per-chunk column sums of `rows` rows of width `width`: one thread per column, one grid
/// row per chunk.
pub fn column_partials(rows: usize, width: usize) -> Geometry {
    Geometry {
        grid: (blocks(width, BLOCK as usize), column_chunks(rows) as u32),
        block: BLOCK,
    }
}

/// The sum of the partials of `width` columns: one thread per column.
pub fn columns(width: usize) -> Geometry {
    Geometry {
        grid: (blocks(width, BLOCK as usize), 1),
        block: BLOCK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_and_value_gets_a_thread() {
        for n in [1, 3, 4, 5, 127, 128, 129, 100_000] {
            let g = rows(n);
            assert!(g.grid.0 as usize * (g.block as usize / 32) >= n, "{n}");
            assert_eq!(g.block % 32, 0);
            let g = elementwise(n);
            assert!(g.grid.0 >= 1 && g.grid.0 as usize * g.block as usize >= n.min(1 << 24));
            let g = column_partials(n, 768);
            assert_eq!(g.grid.1 as usize, n.div_ceil(COLUMN_CHUNK));
            assert!(g.grid.0 as usize * g.block as usize >= 768);
        }
        assert_eq!(rows(0).grid, (1, 1));
        assert_eq!(elementwise(1 << 40).grid.0, 1 << 16);
    }
}
