//! Forward outputs, losses, gradients and trainer steps of TP-split models against the unsplit one.

use super::*;

// ---------------------------------------------------------------------------------------------
// (a) forward outputs and losses.

#[test]
fn degree_one_is_the_plain_model_bit_for_bit() {
    let Some(fx) = coca_tiny() else { return };
    let vb = VarBuilder::from_tensors(fx.weights.clone(), DType::F32, &Device::Cpu);
    let plain = CoCa::new(&fx.config, vb).unwrap();
    let single = TensorParallel::single();
    let vb = VarBuilder::from_tensors(fx.weights.clone(), DType::F32, &Device::Cpu);
    let split = CoCa::new_parallel(&fx.config, vb, &single).unwrap();
    let a = forward_all(&plain.forward(&fx.images, &fx.text).unwrap(), &single);
    let b = forward_all(&split.forward(&fx.images, &fx.text).unwrap(), &single);
    compare_forward("tp=1", &b, &a, 0.0);
}

#[test]
fn forward_on_fixture_matches_unsplit() {
    let Some(fx) = coca_tiny() else { return };
    let vb = VarBuilder::from_tensors(fx.weights.clone(), DType::F32, &Device::Cpu);
    let plain = CoCa::new(&fx.config, vb).unwrap();
    let reference = forward_all(
        &plain.forward(&fx.images, &fx.text).unwrap(),
        &TensorParallel::single(),
    );
    let size = 2;
    let members = run_members(size, |tp| {
        let shards = shard_state_dict(&fx.weights, &fx.config, tp.rank(), tp.size()).unwrap();
        let vb = VarBuilder::from_tensors(shards, DType::F32, &Device::Cpu);
        let model = CoCa::new_parallel(&fx.config, vb, &tp).unwrap();
        let out = model.forward(&fx.images, &fx.text).unwrap();
        assert_eq!(out.logits.dim(2).unwrap(), 49408 / size);
        forward_all(&out, &tp)
    });
    for (rank, ours) in members.iter().enumerate() {
        compare_forward(&format!("tp=2 member {rank}"), ours, &reference, 1e-5);
    }
    // Every member reports the same losses, bit for bit.
    assert_eq!(members[0].losses, members[1].losses);
}

// (b) gradients of the whole loss.

#[test]
fn gradients_on_fixture_match_unsplit() {
    let Some(fx) = coca_tiny() else { return };
    fixture_gradients_match_unsplit(&fx, false);
}

/// The fixture model's gradients split over 1 and 2 members (recomputing the blocks'
/// activations when `recompute`) are the plain unsplit model's: bit for bit in one member.
pub(super) fn fixture_gradients_match_unsplit(fx: &Fixture, recompute: bool) {
    let (model, vars) = trainable_model(
        &fx.config,
        Some(fx.weights.clone()),
        0,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (reference, loss) = gradients(&model, &vars, &fx.images, &fx.text);
    for size in [1, 2] {
        let members = run_members(size, |tp| {
            let (model, vars) = fixture_model(fx, &tp, recompute);
            let (local, member_loss) = gradients(&model, &vars, &fx.images, &fx.text);
            assert!(((member_loss - loss) / loss).abs() < 1e-5);
            let gathered = gather_state_dict(&local, &fx.config, tp.group().as_ref()).unwrap();
            (gathered, local)
        });
        let tol = if size == 1 { 0.0 } else { 1e-5 };
        let what = format!("tp={size} recompute={recompute}");
        compare_gradients(&what, &members, &reference, tol);
    }
}

/// Degree 4 on a seeded model: the shards of the seeded initialisation are slices of the
/// unsplit one, and forward, loss and gradients match; also the data-parallel loss over a TP
/// model, and generation refusing to run split.
#[test]
fn degree_four_matches_unsplit_on_seeded_weights() {
    let config = four_head_config();
    let (images, text) = four_head_inputs();
    let (model, vars) = trainable_model(&config, None, 7, DType::F32, &Device::Cpu).unwrap();
    let full: HashMap<String, Tensor> = vars.tensors().into_iter().collect();
    let reference = forward_all(
        &model.forward(&images, &text).unwrap(),
        &TensorParallel::single(),
    );
    let (reference_grads, _) = gradients(&model, &vars, &images, &text);
    for size in [2, 4] {
        let members = run_members(size, |tp| {
            let (model, vars) =
                trainable_model_parallel(&config, None, 7, DType::F32, &Device::Cpu, &tp).unwrap();
            // The seeded shards are exactly the slices of the unsplit initialisation.
            let local: HashMap<String, Tensor> = vars.tensors().into_iter().collect();
            let want = shard_state_dict(&full, &config, tp.rank(), tp.size()).unwrap();
            assert_eq!(local.len(), want.len());
            for (name, t) in &local {
                assert_eq!(max_abs_diff(t, &want[name]), 0.0, "seeded shard of {name}");
            }
            let out = model.forward(&images, &text).unwrap();
            let fwd = forward_all(&out, &tp);
            // The data-parallel loss (a group of one here) over a TP model's split logits.
            let dp = coca_group_loss(
                &out,
                &CocaLossConfig::default(),
                ContrastiveSpan::default(),
                &coca_worker::comm::HostTransport::single(),
            )
            .unwrap();
            assert!(
                ((dp.values().unwrap().total as f32 - fwd.losses[2]) / fwd.losses[2]).abs() < 1e-6
            );
            let (_, image_embs) = model.encode_image(&images).unwrap();
            let refused = model.next_token_logits(&image_embs, &text.narrow(1, 0, 3).unwrap());
            assert!(
                format!("{}", refused.unwrap_err()).contains("without tensor parallelism"),
                "generation must refuse a split model"
            );
            let (local_grads, _) = gradients(&model, &vars, &images, &text);
            let gathered = gather_state_dict(&local_grads, &config, tp.group().as_ref()).unwrap();
            (fwd, (gathered, local_grads))
        });
        let (forwards, grads): (Vec<_>, Vec<_>) = members.into_iter().unzip();
        for (rank, ours) in forwards.iter().enumerate() {
            compare_forward(&format!("tp={size} member {rank}"), ours, &reference, 1e-5);
        }
        compare_gradients(&format!("tp={size}"), &grads, &reference_grads, 1e-5);
    }
}

// (c) shard → gather round trip.

// The same over the TCP ring backend (loopback), members as threads.

#[test]
fn over_the_ring_forward_and_gradients_match_unsplit() {
    let config = four_head_config();
    let (images, text) = four_head_inputs();
    let (model, vars) = trainable_model(&config, None, 11, DType::F32, &Device::Cpu).unwrap();
    let reference = forward_all(
        &model.forward(&images, &text).unwrap(),
        &TensorParallel::single(),
    );
    let (reference_grads, _) = gradients(&model, &vars, &images, &text);
    let size = 4;
    let members = run_group(thread_group(size), |tp| {
        let (model, vars) =
            trainable_model_parallel(&config, None, 11, DType::F32, &Device::Cpu, &tp).unwrap();
        let fwd = forward_all(&model.forward(&images, &text).unwrap(), &tp);
        let (local, _) = gradients(&model, &vars, &images, &text);
        let gathered = gather_state_dict(&local, &config, tp.group().as_ref()).unwrap();
        (fwd, (gathered, local))
    });
    let (forwards, grads): (Vec<_>, Vec<_>) = members.into_iter().unzip();
    for (rank, ours) in forwards.iter().enumerate() {
        compare_forward(
            &format!("ring tp={size} member {rank}"),
            ours,
            &reference,
            1e-5,
        );
    }
    compare_gradients(&format!("ring tp={size}"), &grads, &reference_grads, 1e-5);
}

/// A few trainer steps (AdamW, clipping active, logit-scale clamp) of a TP-split model equal
/// the unsplit trainer's: same losses and pre-clip norms on every member, and the gathered
/// parameters equal the unsplit ones; replicated parameters stay bit-identical across members.
#[test]
fn trainer_steps_under_tensor_parallelism_match_unsplit() {
    use coca_worker::comm::PlacementRule;
    use coca_worker::train::adamw::AdamWConfig;
    use coca_worker::train::groups::TowerGroups;
    use coca_worker::train::schedule::CosineSchedule;
    use coca_worker::train::trainable::TrainableWeights;
    use coca_worker::train::trainer::{Trainer, TrainerConfig};
    let config = four_head_config();
    let (images, text) = four_head_inputs();
    let settings = TrainerConfig {
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
        },
        // Far below the gradient norm (≈ 100): every step is clipped.
        max_grad_norm: Some(1.0),
        schedule: CosineSchedule {
            warmup_steps: 1,
            total_steps: 4,
        },
        loss: CocaLossConfig::default(),
        span: ContrastiveSpan::default(),
        buffers: PlacementRule::Auto,
    };
    let steps = 3;
    let train = |model: CoCa, vars: &TrainableWeights, buffers| -> (Vec<(f64, f64)>, Grads) {
        let groups = TowerGroups::uniform(1e-3, 0.1);
        let settings = TrainerConfig {
            buffers,
            ..settings
        };
        let mut trainer = Trainer::new(model, vars, &groups, settings).unwrap();
        let trajectory = (0..steps)
            .map(|_| {
                let loss = trainer.backward(&images, &text, 1.0).unwrap();
                let report = trainer.update().unwrap();
                assert!(report.applied);
                (loss.total, report.grad_norm)
            })
            .collect();
        (trajectory, vars.tensors().into_iter().collect())
    };
    let (model, vars) = trainable_model(&config, None, 17, DType::F32, &Device::Cpu).unwrap();
    let (want_trajectory, want) = train(model, &vars, PlacementRule::Auto);
    // Host buffers, and the device code path (tensors) run on the CPU.
    for buffers in [PlacementRule::Auto, PlacementRule::Tensors] {
        let members = run_members(2, |tp| {
            let (model, vars) =
                trainable_model_parallel(&config, None, 17, DType::F32, &Device::Cpu, &tp).unwrap();
            let (trajectory, local) = train(model, &vars, buffers);
            let gathered = gather_state_dict(&local, &config, tp.group().as_ref()).unwrap();
            (trajectory, (gathered, local))
        });
        check_members(&members, &want_trajectory, &want, steps);
    }
}

type Trajectory = Vec<(f64, f64)>;

/// Every TP member's losses and norms equal each other's and the unsplit trainer's, its gathered
/// parameters the unsplit ones, and replicated parameters stay bit-identical across members.
fn check_members(
    members: &[(Trajectory, (Grads, Grads))],
    want_trajectory: &Trajectory,
    want: &Grads,
    steps: usize,
) {
    for (trajectory, _) in members {
        assert_eq!(
            trajectory, &members[0].0,
            "members disagree on losses or norms"
        );
        for (step, ((loss, norm), (want_loss, want_norm))) in
            trajectory.iter().zip(want_trajectory).enumerate()
        {
            eprintln!("step {step}: loss {loss} vs {want_loss}, norm {norm} vs {want_norm}");
            assert!(((loss - want_loss) / want_loss).abs() < 1e-5);
            assert!(((norm - want_norm) / want_norm).abs() < 1e-5);
        }
    }
    let mut worst = 0f32;
    for (name, want) in want {
        let got = &members[0].1 .0[name];
        // AdamW's first steps are close to sign(g)·lr, so compare as verify's train section
        // does: 1e-4 absolute or relative.
        let d = max_abs_diff(got, want);
        worst = worst.max(d);
        assert!(d <= 1e-4 * max_abs(want).max(1.0), "{name} differs by {d}");
    }
    eprintln!("worst parameter difference after {steps} steps: {worst:e}");
    let (_, local_1) = &members[1].1;
    for (name, t) in &members[0].1 .1 {
        if split_of(name).is_replicated() {
            assert_eq!(max_abs_diff(t, &local_1[name]), 0.0, "{name} drifted apart");
        }
    }
}
