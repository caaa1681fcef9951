//! `pretrain --grad_checkpointing True` (activation checkpointing) trains exactly as without:
//! on the coca-tiny fixture, one process, two data-parallel processes (ZeRO stage 2) and two
//! tensor-parallel processes with checkpointing end with the plain one-process run's parameters
//! and losses; under `--bf16 True` a checkpointed run ends with the plain bf16 run's.

mod common;

use common::training::{
    assert_same_weights, launch_local, losses, pretrain_flags, run_alone, with,
};
use std::path::Path;

#[test]
fn checkpointed_training_ends_with_the_parameters_of_plain_training() {
    let Some(model) = common::fixture("coca-tiny") else {
        return;
    };
    let model = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (steps, global_batch) = (3, 8);
    let final_of = |dir: &Path| dir.join(format!("checkpoint-{steps}/model.safetensors"));
    let checkpointing = ["--grad_checkpointing", "True"];
    let plain = tmp.path().join("plain");
    run_alone(&pretrain_flags(model, &plain, global_batch, steps));
    let reference_losses = losses(&plain);
    assert_eq!(reference_losses.len(), steps);

    let single = tmp.path().join("single");
    let printed = run_alone(&with(
        pretrain_flags(model, &single, global_batch, steps),
        &checkpointing,
    ));
    assert!(
        printed.contains("activations recomputed in the backward pass"),
        "{printed}"
    );
    assert_same_weights(
        &final_of(&plain),
        &final_of(&single),
        1e-6,
        "checkpointed, one process",
    );
    assert_eq!(losses(&single), reference_losses);

    // Mixed precision: the recomputed blocks cast and multiply as the first forward did.
    let bf16 = ["--bf16", "True"];
    let (plain16, checkpointed16) = (tmp.path().join("bf16"), tmp.path().join("bf16-ckpt"));
    run_alone(&with(
        pretrain_flags(model, &plain16, global_batch, steps),
        &bf16,
    ));
    run_alone(&with(
        with(
            pretrain_flags(model, &checkpointed16, global_batch, steps),
            &bf16,
        ),
        &checkpointing,
    ));
    assert_same_weights(
        &final_of(&plain16),
        &final_of(&checkpointed16),
        1e-6,
        "checkpointed under --bf16, one process",
    );
    assert_eq!(losses(&checkpointed16), losses(&plain16));
    assert_ne!(
        losses(&plain16),
        reference_losses,
        "bf16 changes the losses"
    );

    let logs = tmp.path().join("logs");
    for (what, per_device, extra) in [
        (
            "checkpointed, dp 2 sharded (ZeRO stage 2)",
            global_batch / 2,
            &["--sharding", "stage2", "--sharding_parallel_degree", "2"][..],
        ),
        (
            "checkpointed, tp 2",
            global_batch,
            &["--tensor_parallel_degree", "2"][..],
        ),
    ] {
        let out = tmp.path().join(what.replace([',', ' ', '(', ')'], "-"));
        let worker = with(
            with(
                pretrain_flags(model, &out, per_device, steps),
                &checkpointing,
            ),
            extra,
        );
        launch_local(2, &worker, &logs);
        assert_same_weights(&final_of(&plain), &final_of(&out), 1e-5, what);
        for (a, b) in reference_losses.iter().zip(&losses(&out)) {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "{what}: loss {b} vs {a}");
        }
    }
}
