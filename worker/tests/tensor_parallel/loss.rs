//! The vocabulary-parallel cross-entropy, the collectives a step runs, the clipping norm.

use super::*;

#[test]
fn parallel_cross_entropy_equals_cross_entropy_rows() {
    let (n, v) = (9, 24);
    let logits = (pseudo_random(&[n, v], 2, 6.0) + 5.0).unwrap();
    // Targets in every member's slice, the first and last ids, and ignored rows (0).
    let targets: Vec<u32> = vec![3, 0, 23, 12, 7, 0, 18, 1, 11];
    let targets = Tensor::from_vec(targets, n, &Device::Cpu).unwrap();
    let weights = pseudo_random(&[n], 3, 2.0);
    let full = Var::from_tensor(&logits).unwrap();
    let reference = cross_entropy_rows(full.as_tensor(), &targets, Some(0)).unwrap();
    let reference_grad = reference
        .mul(&weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(full.as_tensor())
        .unwrap()
        .clone();
    for size in [1, 2, 3, 4] {
        let members = run_members(size, |tp| {
            let width = v / tp.size();
            let mine = logits.narrow(1, tp.rank() * width, width).unwrap();
            let mine = Var::from_tensor(&mine.contiguous().unwrap()).unwrap();
            let loss =
                vocab_parallel_cross_entropy(mine.as_tensor(), &targets, Some(0), &tp).unwrap();
            let grads = loss
                .mul(&weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (loss, grads.get(mine.as_tensor()).unwrap().clone())
        });
        let grad = Tensor::cat(&members.iter().map(|(_, g)| g).collect::<Vec<_>>(), 1).unwrap();
        let dl = max_abs_diff(&members[0].0, &reference);
        let dg = max_abs_diff(&grad, &reference_grad);
        eprintln!("tp={size}: loss max diff {dl:e}, gradient max diff {dg:e}");
        assert!(
            dl <= 1e-5 * max_abs(&reference),
            "tp={size}: losses differ by {dl}"
        );
        assert!(
            dg <= 1e-5 * max_abs(&reference_grad),
            "tp={size}: gradients differ by {dg}"
        );
        let losses = members[0].0.to_vec1::<f32>().unwrap();
        assert_eq!(losses[1], 0.0);
        assert_eq!(losses[5], 0.0);
        for (loss, grad) in &members {
            assert_eq!(max_abs_diff(loss, &members[0].0), 0.0, "members disagree");
            // Ignored rows get no gradient.
            for row in [1, 5] {
                assert_eq!(max_abs(&grad.get(row).unwrap()), 0.0);
            }
        }
        if size == 1 {
            assert_eq!(dl, 0.0);
            assert_eq!(dg, 0.0);
        }
    }
    // A target outside the vocabulary fails on every member (none is left waiting).
    let bad = Tensor::from_vec(vec![24u32; n], n, &Device::Cpu).unwrap();
    let results = run_members(2, |tp| {
        let mine = logits.narrow(1, tp.rank() * 12, 12).unwrap();
        vocab_parallel_cross_entropy(&mine, &bad, Some(0), &tp).is_err()
    });
    assert_eq!(results, [true, true]);
}

/// The portable composition (what other devices and dtypes run) against the fused op, losses
/// and gradients, at every degree; bfloat16 logits take it through the dispatch and stay close.
#[test]
fn parallel_cross_entropy_portable_equals_fused() {
    let (n, v) = (9, 24);
    let logits = (pseudo_random(&[n, v], 4, 6.0) + 5.0).unwrap();
    let targets = vec![3u32, 0, 23, 12, 7, 0, 18, 1, 11];
    let targets = Tensor::from_vec(targets, n, &Device::Cpu).unwrap();
    let weights = pseudo_random(&[n], 5, 2.0);
    for size in [1, 2, 3, 4] {
        let members = run_members(size, |tp| {
            let width = v / tp.size();
            let mine = logits.narrow(1, tp.rank() * width, width).unwrap();
            let run = |portable: bool, dtype: DType| {
                let var = Var::from_tensor(&mine.to_dtype(dtype).unwrap()).unwrap();
                let loss = match portable {
                    true => vocab_parallel_cross_entropy_portable,
                    false => vocab_parallel_cross_entropy,
                }(var.as_tensor(), &targets, Some(0), &tp)
                .unwrap();
                let grads = loss.mul(&weights).unwrap().sum_all().unwrap().backward();
                let grad = grads.unwrap().get(var.as_tensor()).unwrap().clone();
                (loss, grad.to_dtype(DType::F32).unwrap())
            };
            [
                run(false, DType::F32),
                run(true, DType::F32),
                run(false, DType::BF16),
            ]
        });
        let mut worst = [0f32; 2];
        for [fused, portable, half] in &members {
            assert_eq!(
                max_abs_diff(&portable.0, &members[0][1].0),
                0.0,
                "members disagree"
            );
            assert_eq!(
                half.0.dtype(),
                DType::F32,
                "the loss of bf16 logits is float32"
            );
            for (k, (ours, tol)) in [(portable, 1e-5), (half, 2e-2)].into_iter().enumerate() {
                let (dl, dg) = (rel_diff(&ours.0, &fused.0), rel_diff(&ours.1, &fused.1));
                assert!(
                    dl <= tol && dg <= tol,
                    "tp={size}: loss {dl}, gradient {dg}"
                );
                worst[k] = worst[k].max(dl).max(dg);
            }
        }
        eprintln!(
            "tp={size}: portable vs fused {:e}, bf16 {:e}",
            worst[0], worst[1]
        );
    }
}

// One all-reduce per attention and per MLP each way, plus the vocabulary-parallel pieces.

/// The collectives (`[all-reduces, all-gathers, others]`) member 0 of 2 runs in the forward
/// pass, the loss and the backward pass of the fixture model (recomputing the blocks'
/// activations when `recompute`).
pub(super) fn step_collectives(fx: &Fixture, recompute: bool) -> [[usize; 3]; 3] {
    let (group, calls) = counted_thread_group(2);
    let counts = run_group(group, |tp| {
        let (model, vars) = fixture_model(fx, &tp, recompute);
        let read = || *calls.lock().unwrap();
        let start = read();
        let out = model.forward(&fx.images, &fx.text).unwrap();
        let forward = read();
        let loss = coca_loss(&out, &CocaLossConfig::default()).unwrap();
        let with_loss = read();
        let grads = loss.total.backward().unwrap();
        let backward = read();
        assert!(grads
            .get(vars.iter().next().unwrap().1.as_tensor())
            .is_some());
        let diff = |a: [usize; 3], b: [usize; 3]| [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
        [
            diff(start, forward),
            diff(forward, with_loss),
            diff(with_loss, backward),
        ]
    });
    counts[0]
}

#[test]
fn collectives_per_step_are_megatrons() {
    let Some(fx) = coca_tiny() else { return };
    // Member 0's counts, read on member 0.
    let [forward, loss, backward] = step_collectives(&fx, false);
    let (v, t, m) = (
        fx.config.vision_cfg.layers,
        fx.config.text_cfg.layers,
        fx.config.multimodal_cfg.layers,
    );
    eprintln!("forward {forward:?}, loss {loss:?}, backward {backward:?}");
    // Forward: attention + MLP per block (decoder: self and cross blocks), the pooler, the
    // embedding lookup.
    assert_eq!(forward, [2 * (v + t) + 1 + 4 * m + 1, 0, 0]);
    // The cross-entropy: one all-gather of two floats per token.
    assert_eq!(loss, [0, 1, 0]);
    // Backward: the inputs of every column-parallel layer (a cross-attention's queries and its
    // keys/values apart), the pooler's two, and the vocabulary projection's.
    assert_eq!(backward, [2 * (v + t) + 2 + 5 * m + 1, 0, 0]);
}

// The gradient norm for clipping over split gradients.

#[test]
fn global_grad_norm_sums_the_split_parts_over_the_group() {
    use coca_worker::train::flat::Segment;
    use coca_worker::train::norm::global_grad_norm;
    let config = four_head_config();
    let (images, text) = four_head_inputs();
    let flat = |grads: &HashMap<String, Tensor>| -> (Vec<f32>, Vec<Segment>) {
        let mut names: Vec<&String> = grads.keys().collect();
        names.sort();
        let (mut data, mut segments) = (Vec::new(), Vec::new());
        for name in names {
            let g = grads[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            segments.push(Segment {
                name: name.clone(),
                shape: grads[name].dims().to_vec(),
                offset: data.len(),
                len: g.len(),
                lr: 0.0,
                weight_decay: 0.0,
            });
            data.extend(g);
        }
        (data, segments)
    };
    let (model, vars) = trainable_model(&config, None, 5, DType::F32, &Device::Cpu).unwrap();
    let (grads, _) = gradients(&model, &vars, &images, &text);
    let (data, segments) = flat(&grads);
    let want = global_grad_norm(&data, &segments, &TensorParallel::single()).unwrap();
    assert_eq!(
        want,
        coca_worker::train::adamw::global_norm(&data),
        "degree 1 is global_norm"
    );
    let norms = run_members(4, |tp| {
        let (model, vars) =
            trainable_model_parallel(&config, None, 5, DType::F32, &Device::Cpu, &tp).unwrap();
        let (grads, _) = gradients(&model, &vars, &images, &text);
        let (data, segments) = flat(&grads);
        global_grad_norm(&data, &segments, &tp).unwrap()
    });
    eprintln!("norm {want} unsplit, {:?} at tp=4", norms);
    for norm in &norms {
        assert_eq!(*norm, norms[0], "members disagree");
        assert!(((norm - want) / want).abs() < 1e-5, "{norm} vs {want}");
    }
}
