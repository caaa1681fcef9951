//! `coca-launch` in this build: the layout is checked before anything starts, and one local
//! worker runs with the launcher's exit code passed through.

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
    let (code, out, err) = common::run("coca-launch", &["--", "--version"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("coca-worker "), "{out}");
    let (code, _, err) = common::run(
        "coca-launch",
        &["--", "convert", "/nonexistent/x.bin", "y.safetensors"],
    );
    assert_eq!(code, 2, "the worker's exit code comes back: {err}");
    assert!(err.contains("/nonexistent/x.bin"), "{err}");
}

#[test]
fn more_than_one_process_is_refused_until_the_control_plane_exists() {
    let (code, _, err) = common::run("coca-launch", &["--nproc_per_node", "2", "--", "pretrain"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("one local worker"), "{err}");
}
