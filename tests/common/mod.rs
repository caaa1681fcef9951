//! Helpers shared by the end-to-end tests: locating the reference fixtures and comparing tensors.

#![allow(dead_code)]

pub mod eval_inputs;
pub mod host_jobs;
pub mod hosts;
pub mod images;
pub mod jobs;
pub mod model_checks;
pub mod slurm;
pub mod training;

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `../shared/fixtures/<rel>` beside the repository, or `None` (with a message) when absent, so
/// that a checkout without the shared folder skips rather than fails.
pub fn fixture(rel: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(rel);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipping: reference fixture {} is absent", path.display());
        None
    }
}

/// The environment variable that moves the fixture checks to another device: `cpu` (the
/// default), `cuda`, `cuda:N` or `auto`, as `--device` spells them.
pub const TEST_DEVICE_ENV: &str = "COCA_TEST_DEVICE";

/// The device the fixture checks (model, gradients, captions, `verify`'s training trajectory
/// and zero-shot) run on: [`TEST_DEVICE_ENV`], or `None` (with a message, so the test skips)
/// when this build or machine cannot open it: a CPU build or no GPU under `cuda`.
pub fn test_device() -> Option<(coca_worker::device::DeviceChoice, Device)> {
    let spelled = std::env::var(TEST_DEVICE_ENV).unwrap_or_else(|_| "cpu".into());
    let choice: coca_worker::device::DeviceChoice = spelled
        .parse()
        .unwrap_or_else(|e| panic!("{TEST_DEVICE_ENV}={spelled}: {e}"));
    match choice.open() {
        Ok(device) => Some((choice, device)),
        Err(e) => {
            eprintln!("skipping: {TEST_DEVICE_ENV}={spelled} cannot be opened here: {e:#}");
            None
        }
    }
}

/// Every tensor of a safetensors file.
pub fn load(path: &Path) -> HashMap<String, Tensor> {
    load_on(path, &Device::Cpu)
}

/// Every tensor of a safetensors file, on `device`.
pub fn load_on(path: &Path, device: &Device) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, device)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The CoCa of `config` (a model-config JSON) with the float32 weights of a safetensors file.
pub fn model_from(config: &Path, weights: &Path) -> coca_worker::model::CoCa {
    model_on(config, weights, &Device::Cpu)
}

/// [`model_from`] on `device`.
pub fn model_on(config: &Path, weights: &Path, device: &Device) -> coca_worker::model::CoCa {
    let config = coca_worker::model::CocaConfig::from_file(config).unwrap();
    let weights = load_on(weights, device);
    let vb = candle_nn::VarBuilder::from_tensors(weights, candle_core::DType::F32, device);
    coca_worker::model::CoCa::new(&config, vb).unwrap()
}

/// The reference model of a fixture folder (`config.json`, `weights.safetensors`).
pub fn fixture_model(dir: &Path) -> coca_worker::model::CoCa {
    fixture_model_on(dir, &Device::Cpu)
}

/// [`fixture_model`] on `device`.
pub fn fixture_model_on(dir: &Path, device: &Device) -> coca_worker::model::CoCa {
    model_on(
        &dir.join("config.json"),
        &dir.join("weights.safetensors"),
        device,
    )
}

/// Largest absolute difference between two tensors of the same shape, wherever each lives.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let on_cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    coca_worker::compare::max_abs_diff(&on_cpu(a), &on_cpu(b)).unwrap()
}

/// Largest absolute element of a tensor.
pub fn max_abs(a: &Tensor) -> f32 {
    coca_worker::compare::max_abs(a).unwrap()
}

/// The path of a workspace binary (`coca-worker`, `coca-launch`) built with the same profile as
/// this test, building it first when it is absent, or, in the default target folder, older
/// than a source file of the workspace (the root package cannot depend on another package's
/// binaries, so `cargo test --test NAME` alone would run a binary built before the change under
/// test). Other target folders (the CUDA build's) are taken as they are: a plain build there
/// would replace their binaries with ones of other features.
pub fn binary(name: &str) -> PathBuf {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stale = profile_dir.parent() == Some(root.join("target").as_path())
        && modified(&path) < newest_source(root);
    if !path.exists() || stale {
        let release = profile_dir.file_name().is_some_and(|p| p == "release");
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo.args(["build", "--workspace", "--bins"]);
        if release {
            cargo.arg("--release");
        }
        let status = cargo
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of the workspace binaries failed"
        );
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// When `path` was last written (`None` if it does not exist).
fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The latest change to the sources the binaries are built from.
fn newest_source(root: &Path) -> Option<std::time::SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<std::time::SystemTime>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, newest);
            } else {
                *newest = (*newest).max(modified(&path));
            }
        }
    }
    let mut newest = modified(&root.join("Cargo.lock"));
    for dir in ["common", "worker", "launcher", "vendor"] {
        walk(&root.join(dir), &mut newest);
    }
    newest
}

/// Runs a binary with arguments, bounded in time, and returns (exit code, stdout, stderr).
pub fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    run_in(None, bin, args, &[])
}

/// [`run`] with extra environment variables.
pub fn run_with_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    run_in(None, bin, args, env)
}

/// [`run`] in the folder `cwd` (the test's own when `None`), with extra environment variables.
/// Every binary started here applies cuBLAS's layout rule to its CPU matrix products
/// (`COCA_CHECK_CUBLAS_LAYOUTS`, vendor/README.md): a product a GPU would refuse fails the test
/// on the CPU. `env` may turn it off.
pub fn run_in(
    cwd: Option<&Path>,
    bin: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let mut command = std::process::Command::new(binary(bin));
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let child = command
        .args(args)
        .env("COCA_CHECK_CUBLAS_LAYOUTS", "1")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn binary");
    let out = wait_bounded(child, &format!("{bin} {args:?}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a binary whose standard output is closed before it starts (a reader that went away, as
/// `| head` leaves it), bounded in time; returns (exit code, stderr).
pub fn run_with_stdout_closed(bin: &str, args: &[&str]) -> (i32, String) {
    let mut child = std::process::Command::new(binary(bin))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn binary");
    drop(child.stdout.take());
    let out = wait_bounded(child, &format!("{bin} {args:?}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `child`'s output once it exits; after 300 s it is killed (a launcher's workers die with it)
/// and the test fails, naming `what`.
fn wait_bounded(child: std::process::Child, what: &str) -> std::process::Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(300)) {
        Ok(out) => out.expect("collect output"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("{what} did not finish within 300 s");
        }
    }
}

/// A small config the synthetic set (32×32) trains quickly.
pub const TINY_CONFIG: &str = include_str!("../../worker/tests/data/tiny_config.json");

/// Writes [`TINY_CONFIG`] into `dir` and returns its path.
pub fn tiny_config(dir: &std::path::Path) -> String {
    let path = dir.join("tiny.json");
    std::fs::write(&path, TINY_CONFIG).unwrap();
    path.to_str().unwrap().to_string()
}
