//! `coca-worker bench` on the fixture config: it runs every measurement and reports each figure
//! (the figures themselves are benchmarks, not test assertions).

mod common;

/// `bench` of `config` at batch 2 for one step without captions, with `env`: its JSON line
/// and its stderr (it must exit 0).
fn bench_without_captions(config: &str, env: &[(&str, &str)]) -> (serde_json::Value, String) {
    let args = [
        "bench",
        "--model",
        config,
        "--batch",
        "2",
        "--steps",
        "1",
        "--captions",
        "False",
    ];
    let (code, stdout, stderr) = common::run_with_env("coca-worker", &args, env);
    assert_eq!(code, 0, "{stderr}");
    let line = serde_json::from_str(stdout.lines().last().expect("one JSON line")).unwrap();
    (line, stderr)
}

#[test]
fn bench_reports_every_figure() {
    let Some(config) = common::fixture("coca-tiny/config.json") else {
        return;
    };
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let context = json["text_cfg"]["context_length"].as_u64().unwrap();
    let config = config.display().to_string();
    let args = ["bench", "--model", &config, "--batch", "2", "--steps", "1"];
    let (code, stdout, stderr) = common::run("coca-worker", &args);
    assert_eq!(code, 0, "{stderr}");
    let line: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("one JSON line")).unwrap();
    for key in [
        "train_step_s",
        "embed_images_per_s",
        "greedy_caption_s",
        "greedy_caption_bf16_s",
        "beam_caption_s",
        "greedy_caption_recompute_s",
        "encode_one_image_s",
        "weight_stream_gb_s",
        "greedy_caption_decode_floor_s",
        "f32_decode_weights_build_s",
        "bf16_decode_weights_build_s",
    ] {
        let value = line[key].as_f64().unwrap_or(f64::NAN);
        assert!(value > 0.0 && value.is_finite(), "{key}: {value} in {line}");
    }
    // Every decoding step reads each matrix of both text stacks once.
    let bytes = line["decode_weight_bytes_per_step"].as_u64().unwrap_or(0);
    assert!(bytes > 0, "{line}");
    // 20 new tokens, or as many as the context holds after sot.
    assert_eq!(
        line["caption_new_tokens"].as_u64(),
        Some(21.min(context) - 1),
        "{line}"
    );
    // Device memory: null on the CPU; on a GPU the pool's peak of tensor bytes (open_clip's
    // bench reports torch's `max_memory_allocated`) and the card's memory in use.
    for key in ["device_memory_peak_bytes", "device_memory_in_use_bytes"] {
        let value = line
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {line}"));
        assert!(
            value.is_null() || value.as_u64().is_some_and(|b| b > 0),
            "{key} in {line}"
        );
    }
    // The CPU and the kernel families that ran are named, and a forced family is honoured.
    assert!(
        !line["cpu_model"].as_str().unwrap_or("").is_empty(),
        "{line}"
    );
    for key in ["cpu_kernels", "gemm_kernels"] {
        let family = line[key].as_str().unwrap_or("");
        assert!(
            ["avx512", "avx2", "portable"].contains(&family),
            "{key} in {line}"
        );
    }
    let bf16_products = line["bf16_product_kernels"].as_str().unwrap_or("");
    assert!(
        ["amx", "avx512bf16", "widened"].contains(&bf16_products),
        "{line}"
    );
    // The worker restarted itself with its heap on huge pages where the kernel offers them
    // (THP `always` or `madvise`), and bench ran to the end after the restart.
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|mode| mode.contains("[always]") || mode.contains("[madvise]"));
    let opted_out = std::env::var("COCA_HUGE_PAGE_HEAP").is_ok_and(|v| v == "0" || v == "false");
    let chosen = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.hugetlb"));
    if !opted_out && !chosen {
        assert_eq!(line["heap_huge_pages"], thp, "{line}");
    }
    let env = [
        ("COCA_CPU_KERNELS", "portable"),
        ("COCA_HUGE_PAGE_HEAP", "0"),
    ];
    let (line, _) = bench_without_captions(&config, &env);
    assert_eq!(line["cpu_kernels"], "portable", "{line}");
    // Held to portable kernels, bf16 products leave AMX and AVX-512 BF16 too.
    assert_eq!(line["bf16_product_kernels"], "widened", "{line}");
    // Opted out: the heap stays on 4 KiB pages.
    if !std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.hugetlb")) {
        assert_eq!(line["heap_huge_pages"], false, "{line}");
    }
    assert!(line.get("greedy_caption_s").is_none(), "{line}");
    let faults = line["train_page_faults_per_step"].as_array().map(Vec::len);
    assert_eq!(faults, Some(1), "{line}");
}

/// `COCA_CPU_BF16_PRODUCTS` caps the bf16 product kernel (`widened`: none); a value that names
/// no kernel is ignored with a warning.
#[test]
fn the_bf16_product_kernel_is_capped_by_its_variable() {
    let Some(config) = common::fixture("coca-tiny/config.json") else {
        return;
    };
    let config = config.display().to_string();
    let kernel = |value: &str| {
        let env = [
            ("COCA_CPU_BF16_PRODUCTS", value),
            ("COCA_HUGE_PAGE_HEAP", "0"),
        ];
        let (line, stderr) = bench_without_captions(&config, &env);
        let kernel = line["bf16_product_kernels"].as_str().unwrap_or("");
        (kernel.to_string(), stderr)
    };
    assert_eq!(kernel("widened").0, "widened");
    let (capped, _) = kernel("avx512bf16");
    assert!(
        ["avx512bf16", "widened"].contains(&capped.as_str()),
        "{capped}"
    );
    let (ignored, stderr) = kernel("tiles please");
    assert!(
        ["amx", "avx512bf16", "widened"].contains(&ignored.as_str()),
        "{ignored}"
    );
    assert!(
        stderr.contains("COCA_CPU_BF16_PRODUCTS=tiles please is not one of"),
        "{stderr}"
    );
}

#[test]
fn bench_memory_measures_a_step_beside_the_estimate_with_and_without_checkpointing() {
    let Some(config) = common::fixture("coca-tiny/config.json") else {
        return;
    };
    let config = config.display().to_string();
    let mut activations = Vec::new();
    for checkpointing in ["False", "True"] {
        let args = [
            "bench-memory",
            "--model",
            &config,
            "--batch",
            "4",
            "--sharding",
            "2",
            "--tensor_parallel",
            "2",
            "--grad_checkpointing",
            checkpointing,
        ];
        let (code, stdout, stderr) = common::run("coca-worker", &args);
        assert_eq!(code, 0, "{stderr}");
        let lines: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // unsharded, stage1 x2, stage2 x2, tp 2, tp 2 with stage2 x2.
        assert_eq!(lines.len(), 5, "{stdout}");
        for line in &lines {
            assert_eq!(
                line["grad_checkpointing"],
                checkpointing == "True",
                "{line}"
            );
            assert!(line["estimate"]["total_bytes"].as_u64() > Some(0), "{line}");
        }
        // The one-process layout and one member of the tensor-parallel pair run a step; the
        // member holds less.
        let steps = [&lines[0]["measured_step"], &lines[3]["measured_step"]];
        for step in steps {
            for key in ["peak_bytes", "persistent_bytes", "transient_bytes"] {
                assert!(step[key].as_u64() > Some(0), "{key} in {step}");
            }
            assert!(step["estimate_peak_error"].as_f64().is_some(), "{step}");
        }
        assert!(steps[1]["peak_bytes"].as_u64() < steps[0]["peak_bytes"].as_u64());
        assert_eq!(lines[3]["layout"], "tp 2, unsharded", "{stdout}");
        for i in [1, 2, 4] {
            assert!(lines[i].get("measured_step").is_none(), "{}", lines[i]);
        }
        activations.push(lines[0]["estimate"]["activation_bytes"].as_u64().unwrap());
    }
    assert!(activations[1] < activations[0], "{activations:?}");
}

/// `scripts/cpu_speed_pairs.sh` refuses what it cannot run before measuring anything: an
/// unknown argument, a missing worker binary (saying how to build it, for `--avx2` without
/// `gemm`'s AVX-512 kernels) and a Python without torch and open_clip.
#[test]
fn cpu_speed_pairs_script_refuses_bad_input_with_exit_2() {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cpu_speed_pairs.sh");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args(args)
            .output()
            .expect("bash runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--pairz", "3"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown argument --pairz"), "{err}");
    let (code, err) = run(&["--avx2", "--worker", "/nonexistent/coca-worker"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("no worker binary at /nonexistent/coca-worker"),
        "{err}"
    );
    assert!(
        err.contains("--no-default-features --target-dir target/avx2"),
        "{err}"
    );
    let (code, err) = run(&["--worker", "/bin/true", "--python", "/bin/false"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot import torch and open_clip"), "{err}");
}
