//! The vendored candle-core's backward-pass changes (vendor/README.md, changes 7, 8, 13 and
//! 14), checked where this crate uses them: slices' gradients added in place, the freeing
//! backward, no gradient for constant operands, transposed operands' gradients in their
//! source's layout.

use candle_core::{DType, Device, Tensor, Var};

/// A float32 tensor of `shape` holding small integers (-5 to 5) that depend on `seed`: every
/// sum of their products is exact in any order.
fn ints(seed: usize, shape: &[usize]) -> Tensor {
    let count: usize = shape.iter().product();
    let v: Vec<f32> = (0..count)
        .map(|i| ((i * 7 + seed) % 11) as f32 - 5.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn narrowed_gradients_are_the_padded_sums_with_the_patched_candle() {
    // vendor/candle-core adds the gradients of a tensor's slices into one buffer of its shape
    // in place (attention's q, k and v are slices of one packed tensor). Integer values, so
    // every sum is exact whatever its order: the gradient must equal the padded sum exactly.
    let dims = [3usize, 2, 5, 4];
    // A [3, 2, 5, 4] tensor zero but for `w` at `start..` along `dim`.
    let padded = |w: &Tensor, dim: usize, start: usize| {
        let len = w.dim(dim).unwrap();
        let zeros = |size: usize| {
            let mut d = dims.to_vec();
            d[dim] = size;
            Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap()
        };
        let after = dims[dim] - start - len;
        Tensor::cat(&[&zeros(start), w, &zeros(after)], dim).unwrap()
    };
    let (w0, w1, w2) = (
        ints(1, &[2, 5, 4]),
        ints(2, &[2, 5, 4]),
        ints(3, &[3, 2, 3, 4]),
    );
    let (k, v, c) = (ints(4, &[2, 5, 4]), ints(5, &[2, 5, 4]), ints(6, &dims));
    let want = [
        padded(&w0.unsqueeze(0).unwrap(), 0, 0),
        padded(&w1.unsqueeze(0).unwrap(), 0, 1),
        padded(&w2, 2, 1),
        padded(&k.unsqueeze(0).unwrap(), 0, 1),
        padded(&v.unsqueeze(0).unwrap(), 0, 2),
        c.clone(),
    ]
    .iter()
    .fold(
        Tensor::zeros(&dims, DType::F32, &Device::Cpu).unwrap(),
        |a, b| (a + b).unwrap(),
    );
    for dtype in [DType::F32, DType::BF16] {
        for direct_first in [true, false] {
            let x = Var::from_tensor(&ints(0, &dims).to_dtype(dtype).unwrap()).unwrap();
            let x = x.as_tensor();
            let term = |t: Tensor, w: &Tensor| {
                (t * w.to_dtype(dtype).unwrap())
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let direct = term(x.clone(), &c);
            // Slices along the first dimension (the packed q, k, v; keys and values again
            // through a slice of two), overlapping ones along the third.
            let kv = x.narrow(0, 1, 2).unwrap();
            let mut loss = [
                term(x.get(0).unwrap(), &w0),
                term(x.get(1).unwrap(), &w1),
                term(x.narrow(2, 1, 3).unwrap(), &w2),
                term(kv.get(0).unwrap(), &k),
                term(kv.get(1).unwrap(), &v),
            ]
            .into_iter()
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
            loss = match direct_first {
                true => (direct + loss).unwrap(),
                false => (loss + direct).unwrap(),
            };
            let grads = loss.backward().unwrap();
            let got = grads.get(x).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(got.dims(), dims);
            let diff = crate::compare::max_abs_diff(&got, &want).unwrap();
            assert_eq!(diff, 0.0, "{dtype:?}, direct use first: {direct_first}");
        }
    }
}

/// An identity op for the backward-freeing test: `dropped` is set when the op (so the tensor it
/// made) is freed; `seen` records, when its backward runs, whether `dropped` was set then.
struct Marker {
    dropped: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Drop for Marker {
    fn drop(&mut self) {
        if self.seen.is_none() {
            self.dropped
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl candle_core::CustomOp1 for Marker {
    fn name(&self) -> &'static str {
        "marker"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Ok((s.clone(), l.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if let Some(seen) = &self.seen {
            let dropped = self.dropped.load(std::sync::atomic::Ordering::SeqCst);
            seen.store(dropped, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(Some(grad.clone()))
    }
}

#[test]
fn the_patched_backward_frees_each_node_once_differentiated() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::Arc;
    // x → probe (records, in its backward, whether `marked` was freed) → marked → loss. The
    // backward pass differentiates `marked` before `probe`.
    for freeing in [false, true] {
        let (dropped, seen) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let x = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let probe = x
            .as_tensor()
            .apply_op1(Marker {
                dropped: dropped.clone(),
                seen: Some(seen.clone()),
            })
            .unwrap();
        let marked = probe
            .apply_op1(Marker {
                dropped: dropped.clone(),
                seen: None,
            })
            .unwrap();
        let loss = (&marked * &marked).unwrap().sum_all().unwrap();
        drop((probe, marked));
        let grads = match freeing {
            true => loss.backward_freeing().unwrap(),
            false => loss.backward().unwrap(),
        };
        // The graph was freed during the pass only by `backward_freeing` (`backward(&self)`'s
        // caller still holds the root).
        assert_eq!(seen.load(SeqCst), freeing);
        let g = grads.get(x.as_tensor()).unwrap();
        assert_eq!(g.to_vec1::<f32>().unwrap(), [2.0, 4.0, 6.0]);
        // A kept gradient holds no graph (it was a product with the activations).
        assert!(!g.track_op());
    }
}

#[test]
fn constant_operands_get_no_gradient_from_the_patched_backward() {
    // vendor/candle-core skips the gradient of an operand that leads to no variable (the
    // patch embedding's input: a product as large as its weight's gradient). The weight's
    // gradient is the plain one: xᵀ·1 for the sum of x·w.
    let x = Tensor::from_vec((0..6).map(|i| i as f32).collect(), (3, 2), &Device::Cpu).unwrap();
    let w = Var::from_tensor(&Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let scale = Tensor::new(&[2f32], &Device::Cpu).unwrap();
    for constant_left in [true, false] {
        let y = match constant_left {
            true => x.matmul(w.as_tensor()),
            false => w.as_tensor().t().unwrap().matmul(&x.t().unwrap()),
        }
        .unwrap();
        // A constant in an elementwise op, a subtraction and a slice, too.
        let z = (y.broadcast_mul(&scale).unwrap() - x.sum_all().unwrap().broadcast_as(y.shape()))
            .unwrap();
        let loss = z.sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for constant in [&x, &scale] {
            assert!(grads.get(constant).is_none(), "left {constant_left}");
        }
        let g = grads.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // d/dw of 2·Σ x·w: each row of w gets twice the column sums of x (6 and 9).
        assert_eq!(
            g,
            vec![vec![12.0; 4], vec![18.0; 4]],
            "left {constant_left}"
        );
    }
}

#[test]
fn gradients_through_transposed_views_are_the_plain_products() {
    // vendor/candle-core computes the gradient of a product's transposed right operand (a
    // linear layer's `Wᵀ`, attention's `kᵀ`) as `(gradᵀ · lhs)ᵀ`, which the view's own
    // backward passes on contiguous. Integer values: every sum is exact in any order, so the
    // gradients must equal `lhsᵀ · grad` transposed exactly, for a matrix and a batch.
    for (x_dims, w_dims) in [(vec![5, 3], vec![4, 3]), (vec![2, 5, 3], vec![2, 4, 3])] {
        let x = Var::from_tensor(&ints(1, &x_dims)).unwrap();
        let w = Var::from_tensor(&ints(2, &w_dims)).unwrap();
        let rank = w_dims.len();
        let w_t = w.as_tensor().transpose(rank - 2, rank - 1).unwrap();
        let y = x.as_tensor().matmul(&w_t).unwrap();
        let upstream = ints(3, y.dims());
        let grads = (&y * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let plain_w = x
            .as_tensor()
            .transpose(rank - 2, rank - 1)
            .unwrap()
            .matmul(&upstream)
            .unwrap()
            .transpose(rank - 2, rank - 1)
            .unwrap();
        let plain_x = upstream.matmul(w.as_tensor()).unwrap();
        for (var, want) in [(&w, plain_w), (&x, plain_x)] {
            let got = grads.get(var.as_tensor()).unwrap();
            assert!(got.is_contiguous(), "{x_dims:?}");
            let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap();
            assert_eq!(
                diff.max(0).unwrap().to_scalar::<f32>().unwrap(),
                0.0,
                "{x_dims:?}"
            );
        }
    }
}
