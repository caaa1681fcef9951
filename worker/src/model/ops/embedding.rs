//! The token-embedding lookup, with a backward that is parallel and deterministic on a GPU.
//!
//! candle's `index_select` records `index_add` as its backward, whose CUDA kernel gives each
//! column of the table one thread looping over every position of the batch (for B-32 at batch
//! 256: 512 threads, each 19,456 dependent additions). Ours gives each position a warp; the
//! first position of each id adds the rows of all of that id's positions in position order, so
//! no two warps write one row and reruns are bit-identical. Float32 tables only (the model's
//! masters: autocast leaves the embedding in float32); the CPU adds the rows in position order,
//! as candle's `index_add` does. The table may be one tensor-parallel member's slice of the
//! vocabulary ([`embedding_slice`]).

use super::{f32_data, fused, portable, u32_data, VocabSlice};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows `table[ids[i]]` `[N, D]` of a `[V, D]` table for u32 ids `[N]`. An id outside the
/// table is an error on the CPU and a row of NaN on a GPU (which stops training).
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    embedding_slice(table, ids, VocabSlice::whole(table.dims2()?.0))
}

/// Rows of ids `[N]` from `table` `[V, D]`, the rows of ids `slice.start .. slice.start + V`
/// of a vocabulary of `slice.vocab` (tensor parallelism splits the token embedding so): the
/// rows of ids another member holds are zero, so the sum over the group is the whole lookup.
/// An id outside the vocabulary is an error on the CPU and a row of NaN on a GPU. The ids stay
/// where they are (nothing is read back to the host) except on the portable path.
pub fn embedding_slice(table: &Tensor, ids: &Tensor, slice: VocabSlice) -> Result<Tensor> {
    let (v, _) = table.dims2()?;
    if ids.rank() != 1 {
        bail!(
            "embedding: ids {:?} must be one row of token ids",
            ids.dims()
        );
    }
    slice.check("embedding", v)?;
    let ids = ids.to_dtype(DType::U32)?;
    if table.dtype() != DType::F32 || !fused(&[table]) {
        return portable::embedding_slice(table, &ids, slice);
    }
    table
        .contiguous()?
        .apply_op2(&ids.contiguous()?, Embedding { slice })
}

struct Embedding {
    slice: VocabSlice,
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let table = f32_data(self.name(), s1, l1)?;
        let ids = u32_data(self.name(), s2, l2)?;
        let d = l1.dims()[1];
        let v = l1.dims()[0];
        let VocabSlice { start, vocab } = self.slice;
        if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {id} is outside the vocabulary of {vocab}");
        }
        let mut out = vec![0f32; ids.len() * d];
        if d > 0 {
            out.par_chunks_mut(d)
                .zip(ids.par_iter())
                .for_each(|(row, &id)| {
                    let id = id as usize;
                    if (start..start + v).contains(&id) {
                        let local = id - start;
                        row.copy_from_slice(&table[local * d..(local + 1) * d]);
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::embedding(self.name(), (s1, l1), (s2, l2), self.slice)
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let backward = EmbeddingBackward {
            rows: table.dim(0)?,
            start: self.slice.start,
        };
        let dtable = ids.apply_op2_no_bwd(&grad.contiguous()?, &backward)?;
        Ok((Some(dtable), None))
    }
}

/// The table's gradient `[rows, D]` (the table holds ids `start .. start + rows`) from the ids
/// and the rows' gradient `[N, D]`.
struct EmbeddingBackward {
    rows: usize,
    start: usize,
}

impl CustomOp2 for EmbeddingBackward {
    fn name(&self) -> &'static str {
        "embedding-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ids = u32_data(self.name(), s1, l1)?;
        let g = f32_data(self.name(), s2, l2)?;
        let d = l2.dims()[1];
        let mut dtable = vec![0f32; self.rows * d];
        for (row, &id) in g.chunks_exact(d.max(1)).zip(ids) {
            if let Some(local) = (id as usize)
                .checked_sub(self.start)
                .filter(|&l| l < self.rows)
            {
                let dst = &mut dtable[local * d..(local + 1) * d];
                dst.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
        Ok((CpuStorage::F32(dtable), Shape::from((self.rows, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::embedding_backward(self.name(), (s1, l1), (s2, l2), self.rows, self.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn rows_and_table_gradient_equal_index_select() {
        let (v, d) = (11, 6);
        let table = Tensor::arange(0f32, (v * d) as f32, &Device::Cpu)
            .unwrap()
            .reshape((v, d))
            .unwrap();
        let ids = Tensor::new(&[3u32, 0, 0, 10, 3, 0, 7], &Device::Cpu).unwrap();
        let g = Tensor::arange(0f32, 42.0, &Device::Cpu)
            .unwrap()
            .reshape((7, d))
            .unwrap()
            .sin()
            .unwrap();
        let run = |op: &dyn Fn(&Tensor) -> Tensor| {
            let var = Var::from_tensor(&table).unwrap();
            let rows = op(var.as_tensor());
            let grads = (&rows * &g).unwrap().sum_all().unwrap().backward().unwrap();
            (rows, grads.get(var.as_tensor()).unwrap().clone())
        };
        let (ours, our_grad) = run(&|t| embedding(t, &ids).unwrap());
        let (want, want_grad) = run(&|t| t.index_select(&ids, 0).unwrap());
        assert_eq!(
            ours.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        assert_eq!(
            our_grad.to_vec2::<f32>().unwrap(),
            want_grad.to_vec2::<f32>().unwrap()
        );
        let outside = Tensor::new(&[3u32, 11], &Device::Cpu).unwrap();
        let err = embedding(&table, &outside).unwrap_err().to_string();
        assert!(
            err.contains("token id 11 is outside the vocabulary of 11"),
            "{err}"
        );
    }

    #[test]
    fn a_vocabulary_slice_equals_the_masked_lookup_of_its_rows() {
        // Rows 4..8 of a vocabulary of 12 (member 1 of 3); ids before, in and after the slice.
        let (v, d) = (4, 5);
        let slice = VocabSlice {
            start: 4,
            vocab: 12,
        };
        let table = Tensor::arange(0f32, (v * d) as f32, &Device::Cpu)
            .unwrap()
            .reshape((v, d))
            .unwrap();
        let ids = Tensor::new(&[3u32, 4, 7, 8, 11, 5, 5, 0], &Device::Cpu).unwrap();
        let g = Tensor::arange(0f32, 40.0, &Device::Cpu)
            .unwrap()
            .reshape((8, d))
            .unwrap()
            .cos()
            .unwrap();
        let run = |op: &dyn Fn(&Tensor) -> Tensor| {
            let var = Var::from_tensor(&table).unwrap();
            let rows = op(var.as_tensor());
            let grads = (&rows * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = grads
                .get(var.as_tensor())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            (rows.to_vec2::<f32>().unwrap(), grad)
        };
        let (ours, our_grad) = run(&|t| embedding_slice(t, &ids, slice).unwrap());
        let (want, want_grad) = run(&|t| portable::embedding_slice(t, &ids, slice).unwrap());
        assert_eq!(ours, want);
        assert_eq!(our_grad, want_grad);
        assert_eq!(ours[0], vec![0.0; d], "an id before the slice");
        assert_eq!(ours[1], (0..d).map(|j| j as f32).collect::<Vec<_>>());
        let outside = Tensor::new(&[4u32, 12], &Device::Cpu).unwrap();
        for err in [
            embedding_slice(&table, &outside, slice).unwrap_err(),
            portable::embedding_slice(&table, &outside, slice).unwrap_err(),
        ] {
            let err = err.to_string();
            assert!(
                err.contains("token id 12 is outside the vocabulary of 12"),
                "{err}"
            );
        }
        let past = VocabSlice {
            start: 10,
            vocab: 12,
        };
        let err = embedding_slice(&table, &ids, past).unwrap_err().to_string();
        assert!(
            err.contains("ids 10..14 are outside the vocabulary of 12"),
            "{err}"
        );
    }
}
