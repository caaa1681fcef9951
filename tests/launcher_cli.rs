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
