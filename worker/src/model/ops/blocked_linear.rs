//! A frozen float32 linear layer on the CPU, multiplied from its weight laid out once in blocks
//! of [`BLOCK`] outputs.
//!
//! `gemm` packs the weight side of every product into column panels of its register block
//! before multiplying: for an embedding batch of B-32 (400 rows) the packing was 8 % of the
//! time on an Intel Xeon, and every thread packs every panel it touches, so two threads pack
//! the whole weight twice. A frozen weight (evaluation, embedding, captioning) does not change,
//! so it is laid out here once in that order — block `b` holds outputs `64·b ..` as a
//! column-major `64 × in` matrix, contiguous — and each block is one single-threaded product
//! with the input; blocks (and, for long inputs, row ranges) are split between threads, so
//! nothing is packed twice. The arithmetic is `gemm`'s own; only the order in which it is fed
//! changes.

use super::bias::add_rows;
use super::{f32_view, single_threaded_product, Strided};
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Outputs per block: a multiple of every `gemm` register block's height (16 floats with
/// AVX-512, 8 with AVX2), so each block is whole register rows.
pub const BLOCK: usize = 64;
/// The fewest rows one task multiplies (splitting rows further costs more than it balances).
const MIN_ROWS_PER_TASK: usize = 64;

/// A `[out, in]` float32 weight in blocks of `BLOCK` (64) outputs (the last block narrower when
/// `out` is not a multiple): block `b`'s element `(o, c)` at `b·BLOCK·in + c·width + o`.
#[derive(Debug)]
pub struct BlockedWeight {
    data: Vec<f32>,
    out_dim: usize,
    in_dim: usize,
}

impl BlockedWeight {
    /// Lays out `weight` `[out, in]` (float32, on the CPU).
    pub fn new(weight: &Tensor) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let weight = weight.contiguous()?;
        let view = f32_view(&weight, "a blocked linear weight")?;
        let w = view.as_slice();
        let mut data = vec![0f32; out_dim * in_dim];
        data.par_chunks_mut((BLOCK * in_dim).max(1))
            .enumerate()
            .for_each(|(b, block)| {
                let width = block.len() / in_dim.max(1);
                for (o, row) in w[b * BLOCK * in_dim..][..width * in_dim]
                    .chunks_exact(in_dim)
                    .enumerate()
                {
                    for (c, &v) in row.iter().enumerate() {
                        block[c * width + o] = v;
                    }
                }
            });
        Ok(Self {
            data,
            out_dim,
            in_dim,
        })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// `x · Wᵀ` for `x` `[rows, in]` (contiguous float32 on the CPU), then `+ b` when a bias
    /// `[out]` is given (added after the product, as [`super::biased_product`] adds it).
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (rows, in_dim) = x.dims2()?;
        let out_dim = self.out_dim;
        if in_dim != self.in_dim {
            candle_core::bail!(
                "a blocked linear of {} inputs applied to rows of {in_dim}",
                self.in_dim
            );
        }
        if let Some(b) = bias.filter(|b| b.dims() != [out_dim]) {
            candle_core::bail!("a bias of {:?} for {out_dim} outputs", b.dims());
        }
        let x = x.contiguous()?;
        let xv = f32_view(&x, "a blocked linear's input")?;
        let mut y = if rows * out_dim * in_dim == 0 {
            vec![0f32; rows * out_dim]
        } else {
            self.product(xv.as_slice(), rows)
        };
        drop(xv);
        if let Some(b) = bias {
            let b = b.contiguous()?;
            let bv = f32_view(&b, "a blocked linear's bias")?;
            add_rows(&mut y, None, bv.as_slice());
        }
        Tensor::from_vec(y, (rows, out_dim), &Device::Cpu)
    }

    /// `x · Wᵀ` for `rows` (> 0) rows of `x`, with `in` and `out` > 0: one single-threaded
    /// `gemm` per task of a block and a range of rows.
    fn product(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (out_dim, in_dim) = (self.out_dim, self.in_dim);
        let blocks = out_dim.div_ceil(BLOCK);
        // Enough tasks for every thread several times over, rows split only as needed.
        let wanted = 4 * rayon::current_num_threads();
        let row_parts = wanted
            .div_ceil(blocks)
            .min(rows.div_ceil(MIN_ROWS_PER_TASK))
            .max(1);
        let rows_per_part = rows.div_ceil(row_parts);
        // Unfilled: the tasks write every element (their blocks cover all outputs, their row
        // parts all rows), so a zero fill would be a wasted pass over the output.
        let mut y: Vec<MaybeUninit<f32>> = Vec::with_capacity(rows * out_dim);
        // SAFETY: MaybeUninit needs no initialisation.
        unsafe { y.set_len(rows * out_dim) };
        let y_addr = y.as_mut_ptr() as usize;
        (0..blocks * row_parts).into_par_iter().for_each(|task| {
            let (b, part) = (task / row_parts, task % row_parts);
            let first_row = part * rows_per_part;
            let part_rows = rows_per_part.min(rows.saturating_sub(first_row));
            if part_rows == 0 {
                return;
            }
            let width = BLOCK.min(out_dim - b * BLOCK);
            let lhs = &self.data[b * BLOCK * in_dim..][..width * in_dim];
            let rhs = &x[first_row * in_dim..][..part_rows * in_dim];
            // SAFETY: the output block (rows first_row.., columns b·BLOCK .. + width) lies
            // inside `y` and no two tasks write the same element; `lhs` is width × in
            // column-major (column stride width), `rhs` is in × part_rows column-major (the
            // rows of x, stride in); gemm reads nothing outside them and does not read the
            // output (read_dst false), so the unfilled elements are only written.
            unsafe {
                single_threaded_product(
                    (width, part_rows, in_dim),
                    Strided {
                        ptr: (y_addr as *mut f32).add(first_row * out_dim + b * BLOCK),
                        row: 1,
                        col: out_dim as isize,
                    },
                    Strided {
                        ptr: lhs.as_ptr(),
                        row: 1,
                        col: width as isize,
                    },
                    Strided {
                        ptr: rhs.as_ptr(),
                        row: 1,
                        col: in_dim as isize,
                    },
                )
            }
        });
        let mut y = std::mem::ManuallyDrop::new(y);
        // SAFETY: every element was written above; MaybeUninit<f32> has f32's layout, and the
        // vector's allocation is handed over whole (pointer, length, capacity).
        unsafe { Vec::from_raw_parts(y.as_mut_ptr() as *mut f32, y.len(), y.capacity()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(97));
                ((h >> 8) as f32 / (1 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn blocked_products_equal_candles_and_a_float64_reference() {
        // Whole and partial blocks, one row to several row parts, a bias or none, and a sum
        // longer than gemm's k blocking.
        for (rows, in_dim, out_dim, with_bias) in [
            (1, 3, 1, true),
            (3, 17, 64, false),
            (50, 40, 130, true),
            (400, 96, 256, true),
            (7, 1500, 70, false),
        ] {
            let x =
                Tensor::from_vec(values(rows * in_dim, 1), (rows, in_dim), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(values(out_dim * in_dim, 2), (out_dim, in_dim), &Device::Cpu)
                .unwrap();
            let b = Tensor::from_vec(values(out_dim, 3), out_dim, &Device::Cpu).unwrap();
            let bias = with_bias.then_some(&b);
            let blocked = BlockedWeight::new(&w).unwrap();
            assert_eq!(blocked.dims(), (out_dim, in_dim));
            let got = blocked.forward(&x, bias).unwrap();
            assert_eq!(got.dims(), [rows, out_dim]);
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            let mut candle = x.matmul(&w.t().unwrap()).unwrap();
            if let Some(b) = bias {
                candle = candle.broadcast_add(b).unwrap();
            }
            let candle: Vec<f32> = candle.flatten_all().unwrap().to_vec1().unwrap();
            let (xv, wv, bv) = (
                values(rows * in_dim, 1),
                values(out_dim * in_dim, 2),
                values(out_dim, 3),
            );
            for r in 0..rows {
                for o in 0..out_dim {
                    let terms =
                        (0..in_dim).map(|c| xv[r * in_dim + c] as f64 * wv[o * in_dim + c] as f64);
                    let bias_term = if with_bias { bv[o] as f64 } else { 0.0 };
                    let exact = terms.clone().sum::<f64>() + bias_term;
                    let scale = terms.map(f64::abs).sum::<f64>() + bias_term.abs();
                    let (g, c) = (got[r * out_dim + o], candle[r * out_dim + o]);
                    // float32 rounding of a sum of in_dim terms
                    let tolerance = 2.0 * f32::EPSILON as f64 * scale * (in_dim as f64).sqrt();
                    assert!(
                        (g as f64 - exact).abs() <= tolerance,
                        "{rows}×{in_dim}·{out_dim}: ({r}, {o}) = {g}, exactly {exact}"
                    );
                    assert!(
                        ((g - c).abs() as f64) <= tolerance,
                        "{rows}×{in_dim}·{out_dim}: {g} vs candle's {c}"
                    );
                }
            }
        }
    }

    #[test]
    fn blocked_products_refuse_mismatched_operands() {
        let w = Tensor::zeros((8, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let blocked = BlockedWeight::new(&w).unwrap();
        let x = Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(blocked.forward(&x, None).is_err());
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(7, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(blocked.forward(&x, Some(&b)).is_err());
        let empty = Tensor::zeros((2, 0), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w0 = Tensor::zeros((3, 0), candle_core::DType::F32, &Device::Cpu).unwrap();
        let zeros = BlockedWeight::new(&w0)
            .unwrap()
            .forward(&empty, None)
            .unwrap();
        assert_eq!(
            zeros.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0; 6]
        );
        let bf16 = w.to_dtype(candle_core::DType::BF16).unwrap();
        assert!(BlockedWeight::new(&bf16).is_err());
    }
}
