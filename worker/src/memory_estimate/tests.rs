//! The memory estimate against the trainer's accounting and the measured B-32 step.

use super::*;

/// The float32 estimate on the CPU's fused path, without checkpointing.
fn f32_fused(
    config: &CocaConfig,
    tp: usize,
    sharding: usize,
    stage: Option<ZeroStage>,
    batch: usize,
) -> MemoryEstimate {
    estimate(
        config,
        tp,
        sharding,
        stage,
        batch,
        false,
        DType::F32,
        OpsPath::CpuFused,
    )
    .unwrap()
}

#[test]
fn matches_the_trainer_accounting_of_l14() {
    // The README's bench-memory figures for coca_ViT-L-14 (638,450,177 parameters).
    let config = CocaConfig::resolve("coca_ViT-L-14").unwrap();
    let p = 638_450_177u64;
    let e = f32_fused(&config, 1, 1, None, 0);
    assert_eq!(e.parameters, p);
    assert_eq!(e.parameter_bytes, 4 * p);
    assert_eq!(e.optimizer_bytes, 8 * p);
    assert_eq!(e.gradient_bytes, 8 * p);
    assert_eq!(e.activation_bytes, 0);
    let s2 = f32_fused(&config, 1, 8, Some(ZeroStage::Two), 0);
    assert_eq!(s2.optimizer_bytes, 8 * p.div_ceil(8));
    assert_eq!(s2.gradient_bytes, 4 * (p.div_ceil(8) + p));
    let s1 = f32_fused(&config, 1, 8, Some(ZeroStage::One), 0);
    assert_eq!(s1.gradient_bytes, 8 * p);
    // tp 2 holds 1.282 GB of parameters per rank (bench-memory).
    let tp2 = f32_fused(&config, 2, 1, None, 0);
    assert!((1_280_000_000..1_285_000_000).contains(&tp2.parameter_bytes));
    // Activations grow with the batch, and tensor parallelism splits them.
    let b8 = f32_fused(&config, 1, 1, None, 8);
    let b16 = f32_fused(&config, 1, 1, None, 16);
    assert!(b16.activation_bytes > 19 * b8.activation_bytes / 10);
    assert!(b8.activation_bytes > 1 << 30, "{}", b8.activation_bytes);
    let tp2 = f32_fused(&config, 2, 1, None, 8);
    assert!(tp2.activation_bytes < b8.activation_bytes);
    // The backward pass trades the activations for the full gradient (`backward_freeing`):
    // the total counts the larger of the two beside the kept buffers.
    let full_gradient = 4 * p;
    assert!(b8.activation_bytes > full_gradient);
    assert_eq!(
        b8.total_bytes,
        b8.parameter_bytes + b8.gradient_bytes - full_gradient
            + b8.optimizer_bytes
            + b8.activation_bytes
    );
    let b0 = f32_fused(&config, 1, 1, None, 0);
    assert_eq!(
        b0.total_bytes,
        b0.parameter_bytes + b0.gradient_bytes + b0.optimizer_bytes
    );
}

#[test]
fn is_within_six_percent_of_the_measured_b32_step() {
    // Peak resident bytes of a coca_ViT-B-32 step at batch 8 on the CPU above the program's
    // own (`coca-worker bench-memory --model coca_ViT-B-32 --batch 8 --sharding 1
    // --tensor_parallel 1 --grad_checkpointing False|True`; the README's figures). The
    // issue's bound is 15 %; the estimate is held to 6 % so that drift is noticed.
    let config = CocaConfig::resolve("coca_ViT-B-32").unwrap();
    for (checkpointing, measured) in [(false, 5_982_113_792u64), (true, 5_389_189_120)] {
        let e = estimate(
            &config,
            1,
            1,
            None,
            8,
            checkpointing,
            DType::F32,
            OpsPath::CpuFused,
        )
        .unwrap();
        let error = e.total_bytes as f64 / measured as f64 - 1.0;
        assert!(
            error.abs() < 0.06,
            "checkpointing {checkpointing}: {error:+.3}"
        );
    }
    // Under autocast (`--bf16 True`, `--fp16 True`; the measured peak is above float32's on
    // the CPU), with and without checkpointing.
    // bf16 products run on a native kernel where the CPU has one (the estimate counts what
    // that path holds; AMX and AVX-512 BF16 hold the same buffers): both measured on the same
    // Xeon, the widened one with the products held off AMX.
    let amx = candle_core::cpu_backend::amx::is_active();
    let bf16_measured: u64 = if amx { 6_539_157_504 } else { 6_665_433_088 };
    for (dtype, checkpointing, measured) in [
        (DType::BF16, false, bf16_measured),
        (DType::BF16, true, 5_433_872_384),
        (DType::F16, false, 6_522_896_384),
        (DType::F16, true, 5_405_605_888),
    ] {
        let e = estimate(
            &config,
            1,
            1,
            None,
            8,
            checkpointing,
            dtype,
            OpsPath::CpuFused,
        )
        .unwrap();
        let error = e.total_bytes as f64 / measured as f64 - 1.0;
        // With checkpointing the half-precision copies' gradients (counted in full) come
        // and go while the backward pass frees the graph: over, within the bound.
        let bound = if checkpointing { 0.15 } else { 0.06 };
        assert!(
            error.abs() < bound,
            "{dtype:?} {checkpointing}: {error:+.3}"
        );
        assert!(e.compute_copy_bytes > 0 && e.activation_bytes < 3 << 30);
    }
    // Every op composed (`COCA_PORTABLE_OPS=1`: the GPU's ops, on the CPU; attention's
    // probabilities recomputed as on a GPU).
    let e = estimate(
        &config,
        1,
        1,
        None,
        8,
        false,
        DType::F32,
        OpsPath::Portable { cpu: true },
    )
    .unwrap();
    let error = e.total_bytes as f64 / 7_443_771_392f64 - 1.0;
    assert!(error.abs() < 0.06, "portable ops: {error:+.3}");
    // One member of a tensor-parallel pair (`--tensor_parallel 2`: its peer stood in for by
    // `bench_memory`'s echo group), in float32 and under autocast, and with checkpointing
    // (under by 8.7 %: within the bound, not yet the 6 % held elsewhere).
    for (dtype, checkpointing, measured, bound) in [
        (DType::F32, false, 3_400_159_232u64, 0.06),
        (
            DType::BF16,
            false,
            if amx { 3_836_194_816 } else { 3_859_869_696 },
            0.06,
        ),
        (DType::F32, true, 2_849_067_008, 0.15),
    ] {
        let e = estimate(
            &config,
            2,
            1,
            None,
            8,
            checkpointing,
            dtype,
            OpsPath::CpuFused,
        );
        let error = e.unwrap().total_bytes as f64 / measured as f64 - 1.0;
        assert!(
            error.abs() < bound,
            "tp 2 {dtype:?} {checkpointing}: {error:+.3}"
        );
    }
    // Checkpointing keeps a fraction of the activations; nothing else changes.
    let plain = f32_fused(&config, 1, 1, None, 8);
    let checkpointed =
        estimate(&config, 1, 1, None, 8, true, DType::F32, OpsPath::CpuFused).unwrap();
    assert!(checkpointed.activation_bytes * 4 < plain.activation_bytes);
    let held = |e: &MemoryEstimate| e.parameter_bytes + e.gradient_bytes + e.optimizer_bytes;
    assert_eq!(held(&plain), held(&checkpointed));
    assert!(checkpointed.total_bytes < plain.total_bytes);
}

#[test]
fn the_cuda_kernels_keep_less_than_the_compositions_and_fit_one_h100() {
    let h200 = 141_000_000_000u64;
    // An H100's 80 GB holds B-32 at batch 256 and L-14 at batch 64, in float32 and in bf16,
    // since a linear layer keeps only its biased output (`ops::biased_product`) and an
    // attention only its probabilities (`ops::attention_probs`), not the products.
    let h100 = 80_000_000_000u64;
    for (model, batch, dtype) in [
        ("coca_ViT-B-32", 256, DType::F32),
        ("coca_ViT-B-32", 256, DType::BF16),
        ("coca_ViT-L-14", 64, DType::F32),
        ("coca_ViT-L-14", 64, DType::BF16),
    ] {
        let config = CocaConfig::resolve(model).unwrap();
        let e = estimate(&config, 1, 1, None, batch, false, dtype, OpsPath::CudaFused);
        let total = e.unwrap().total_bytes;
        assert!(total < h100, "{model} {dtype:?}: {total}");
    }
    for (model, batch) in [("coca_ViT-B-32", 256), ("coca_ViT-L-14", 64)] {
        let config = CocaConfig::resolve(model).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let [fused, composed] = [OpsPath::CudaFused, OpsPath::Portable { cpu: false }]
                .map(|ops| estimate(&config, 1, 1, None, batch, false, dtype, ops).unwrap());
            // The same buffers; only what the graph keeps differs, by a third or more.
            let held = |e: &MemoryEstimate| {
                e.parameter_bytes + e.gradient_bytes + e.optimizer_bytes + e.compute_copy_bytes
            };
            assert_eq!(held(&fused), held(&composed));
            assert!(
                fused.activation_bytes * 3 < composed.activation_bytes * 2,
                "{model}"
            );
            assert!(
                fused.total_bytes < h200,
                "{model} {dtype:?}: {}",
                fused.total_bytes
            );
        }
    }
}
