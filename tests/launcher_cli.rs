//! `coca-launch` basics: the layout is checked before anything starts, and a worker's exit code
//! comes back through the launcher.

mod common;

#[test]
fn a_layout_that_does_not_divide_fails_with_the_arithmetic() {
    let (code, _, err) = common::run(
        "coca-launch",
        &[
            "--nproc-per-node",
            "3",
            "--",
            "pretrain",
            "--tensor_parallel_degree",
            "2",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("3 / 2 = 1.500"), "{err}");
}

#[test]
fn runs_the_worker_beside_it_and_passes_its_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let log_dir = tmp.path().display().to_string();
    let (code, out, err) = common::run("coca-launch", &["--log-dir", &log_dir, "--", "--version"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[rank 0] coca-worker "), "{out}");
    let (code, _, err) = common::run(
        "coca-launch",
        &[
            "--log-dir",
            &log_dir,
            "--",
            "convert",
            "/nonexistent/x.bin",
            "y.safetensors",
        ],
    );
    assert_eq!(code, 2, "the worker's exit code comes back: {err}");
    assert!(err.contains("/nonexistent/x.bin"), "{err}");
}

/// The launcher's error lines in `err`; exactly one is expected.
fn error_lines(err: &str) -> Vec<&str> {
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("coca-launch: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    errors
}

/// Worker logs a launcher left in `dir` (none when no worker started).
fn worker_logs(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("workerlog."))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_wrong_eval_folder_fails_once_in_under_two_seconds_before_any_worker_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let log_dir = tmp.path().join("log");
    let out_dir = tmp.path().join("out");
    let started = std::time::Instant::now();
    let (code, out, err) = common::run(
        "coca-launch",
        &[
            "--nproc-per-node",
            "4",
            "--log-dir",
            log_dir.to_str().unwrap(),
            "--",
            "pretrain",
            "--model",
            "coca_ViT-L-14",
            "--classification_eval",
            "./in1k",
            "--output_dir",
            out_dir.to_str().unwrap(),
        ],
    );
    let elapsed = started.elapsed();
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        elapsed < std::time::Duration::from_secs(2),
        "took {elapsed:?}"
    );
    assert_eq!(
        err.matches("--classification_eval ./in1k").count(),
        1,
        "one message: {err}"
    );
    assert!(err.contains("./in1k/images is not a folder"), "{err}");
    assert!(worker_logs(&log_dir).is_empty(), "no worker started");
    eprintln!("fail-fast under the launcher: {elapsed:?}");
}

#[test]
fn a_layout_that_cannot_fit_in_memory_is_refused_with_the_numbers() {
    // 8 × coca_ViT-L-14 on a 24 GiB node: the estimate is computed from the config's shapes,
    // nothing is allocated.
    let tmp = tempfile::tempdir().unwrap();
    let log_dir = tmp.path().join("log");
    let out_dir = tmp.path().join("out");
    let base = [
        "--nproc-per-node",
        "8",
        "--node-memory",
        "24GiB",
        "--log-dir",
        log_dir.to_str().unwrap(),
        "--",
        "pretrain",
        "--model",
        "coca_ViT-L-14",
        "--max_steps",
        "1",
        "--output_dir",
        out_dir.to_str().unwrap(),
    ];
    let (code, out, err) = common::run("coca-launch", &base);
    assert_eq!(code, 2, "{out}\n{err}");
    for needle in [
        "does not fit in this node's memory",
        "8 worker(s) x",
        "24.0 GiB available (--node-memory)",
        "638450177 parameters",
        "AdamW moments 4.8 GiB",
        "activations at batch 8",
    ] {
        assert!(err.contains(needle), "{needle:?} missing: {err}");
    }
    assert!(worker_logs(&log_dir).is_empty(), "no worker started");
    // The estimate follows the layout: ZeRO stage 2 over 8 ranks leaves 1/8 of the moments
    // (4.8 → 0.6 GiB) and of the kept gradients (2.4 → 0.3 GiB) on each worker.
    let per_worker = |err: &str| -> f64 {
        let at = err.find("8 worker(s) x ").unwrap() + "8 worker(s) x ".len();
        err[at..].split(' ').next().unwrap().parse().unwrap()
    };
    let unsharded = per_worker(&err);
    let mut sharded = base.to_vec();
    sharded.extend(["--sharding", "stage2", "--sharding_parallel_degree", "8"]);
    sharded[3] = "8GiB";
    let (code, _, err) = common::run("coca-launch", &sharded);
    assert_eq!(code, 2, "{err}");
    let saved = unsharded - per_worker(&err);
    assert!((6.0..6.6).contains(&saved), "{unsharded} vs\n{err}");
}

/// Launcher flags, environment, and the error they must cause.
type BadAddress<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn a_master_that_never_resolves_or_a_local_addr_on_no_interface_is_a_one_line_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let log_dir = tmp.path().join("log");
    let base = [
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-token",
        "a-test-secret-of-enough-length",
        "--rdzv-timeout",
        "2",
        "--log-dir",
        log_dir.to_str().unwrap(),
    ];
    let cases: [BadAddress; 4] = [
        (
            &["--master-addr", "no-such-host.invalid"],
            &[],
            "--master-addr \"no-such-host.invalid\" does not resolve",
        ),
        (
            &["--master-addr", "127.0.0.1", "--local-addr", "192.0.2.77"],
            &[],
            "--local-addr 192.0.2.77 is not an address of any interface of this host",
        ),
        (
            &["--master-addr", "127.0.0.1", "--local-addr", "eth0"],
            &[],
            "--local-addr \"eth0\" is not an IP address",
        ),
        (
            &["--master-addr", "127.0.0.1"],
            &[("COCA_SOCKET_IFNAME", "nosuchif9")],
            "COCA_SOCKET_IFNAME=\"nosuchif9\" matches no up interface",
        ),
    ];
    for (flags, env, needle) in cases {
        let args: Vec<&str> = [&base[..], flags, &["--", "--version"]].concat();
        let started = std::time::Instant::now();
        let (code, out, err) = common::run_with_env("coca-launch", &args, env);
        let elapsed = started.elapsed();
        assert_eq!(code, 2, "{flags:?}\n{out}\n{err}");
        let errors = error_lines(&err);
        assert!(errors[0].contains(needle), "{needle:?} missing: {err}");
        assert!(
            elapsed < std::time::Duration::from_secs(15),
            "{flags:?} took {elapsed:?}"
        );
        assert!(worker_logs(&log_dir).is_empty(), "no worker started");
    }
}

#[test]
fn gpu_workers_without_enough_gpus_are_a_one_line_error_naming_the_node() {
    let tmp = tempfile::tempdir().unwrap();
    let log_dir = tmp.path().join("log");
    let log = log_dir.to_str().unwrap();
    let cases: [(&[&str], &str, &str); 2] = [
        (
            &[
                "--nproc-per-node",
                "gpu",
                "--log-dir",
                log,
                "--",
                "--version",
            ],
            "",
            "--nproc-per-node gpu: no GPU is visible on this node",
        ),
        (
            &[
                "--nproc-per-node",
                "3",
                "--log-dir",
                log,
                "--",
                "pretrain",
                "--device",
                "cuda",
            ],
            "0,1",
            "CUDA_VISIBLE_DEVICES=\"0,1\" names 2 GPU(s)",
        ),
    ];
    for (args, visible, needle) in cases {
        let (code, out, err) =
            common::run_with_env("coca-launch", args, &[("CUDA_VISIBLE_DEVICES", visible)]);
        assert_eq!(code, 2, "{args:?}\n{out}\n{err}");
        let errors = error_lines(&err);
        assert!(
            errors[0].contains("node 0") && errors[0].contains(needle),
            "{err}"
        );
        assert!(worker_logs(&log_dir).is_empty(), "no worker started");
    }
}

#[test]
fn bad_nnodes_ranges_are_one_line_usage_errors_before_any_worker_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let log_dir = tmp.path().join("log");
    let log = log_dir.to_str().unwrap();
    let node = [
        "--node-rank",
        "0",
        "--master-addr",
        "127.0.0.1",
        "--log-dir",
        log,
    ];
    let cases: [(&[&str], &str); 4] = [
        (
            &["--nnodes", "3:2", "--", "--version"],
            "--nnodes 3:2: MIN 3 is above MAX 2",
        ),
        // MIN below what tp × sharding needs.
        (
            &[
                "--nnodes",
                "1:2",
                "--nproc-per-node",
                "2",
                "--",
                "pretrain",
                "--tensor_parallel_degree",
                "4",
            ],
            "1 node(s) × 2 worker(s): the world of 2 processes cannot be split",
        ),
        // 2 nodes cannot share the micro-batch of 1 × dp 3.
        (
            &[
                "--nnodes",
                "2:3",
                "--",
                "pretrain",
                "--per_device_train_batch_size",
                "1",
                "--max_steps",
                "1",
            ],
            "2 node(s) give dp 2, and a micro-batch of 1 × dp 3 = 3 samples does not split",
        ),
        // Batch 4 fits (~286 MiB per worker), but on 1 node the worker takes batch 8 (~316 MiB).
        (
            &[
                "--nnodes",
                "1:2",
                "--node-memory",
                "300MiB",
                "--",
                "pretrain",
                "--per_device_train_batch_size",
                "4",
                "--max_steps",
                "1",
            ],
            "--nnodes 1:2: on 1 node(s) each worker takes per-device batch 8 (the global batch \
             stays the same): this layout does not fit in this node's memory",
        ),
    ];
    for (flags, needle) in cases {
        let args: Vec<&str> = [&node[..], flags].concat();
        let (code, out, err) = common::run("coca-launch", &args);
        assert_eq!(code, 2, "{flags:?}\n{out}\n{err}");
        let errors = error_lines(&err);
        assert!(errors[0].contains(needle), "{needle:?} missing: {err}");
        assert!(worker_logs(&log_dir).is_empty(), "no worker started");
    }
}

/// The worker's pre-start check says whether its workers compute on GPUs (then its estimate is
/// of device memory, and the launcher holds them only to the weights they read on the host),
/// and a CPU build refuses to be started one worker per GPU before any worker starts.
#[test]
fn check_args_says_where_the_workers_compute() {
    let args = ["check-args", "pretrain", "--model", "coca_ViT-L-14"];
    let (code, out, err) = common::run("coca-worker", &args);
    assert_eq!(code, 0, "{out}\n{err}");
    let answer: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let on_gpu = coca_worker::device::DeviceChoice::Auto.is_gpu();
    assert_eq!(answer["memory"]["on_gpu"], on_gpu, "{out}");
    if coca_worker::device::cuda_built() {
        return;
    }
    let (code, out, err) =
        common::run_with_env("coca-worker", &args, &[("COCA_DEVICE_KIND", "gpu")]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("the launcher started one worker per GPU")
            && err.contains("scripts/cuda/build.sh"),
        "{err}"
    );
}
