//! Locating the `coca-worker` binary that sits beside the launcher.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// File name of the worker binary on this platform.
pub const WORKER_BINARY_NAME: &str = if cfg!(windows) {
    "coca-worker.exe"
} else {
    "coca-worker"
};

/// The worker binary in the same directory as the running executable.
///
/// The launcher never searches `PATH`: a job must run exactly the worker it was built with.
pub fn worker_beside_current_exe() -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find the path of the running executable")?;
    let dir = me
        .parent()
        .with_context(|| format!("executable {} has no parent directory", me.display()))?;
    let worker = dir.join(WORKER_BINARY_NAME);
    if !worker.is_file() {
        bail!(
            "the worker binary {} was not found beside {}; build the whole workspace \
             (cargo build --release) so that both binaries are in the same directory",
            worker.display(),
            me.display()
        );
    }
    Ok(worker)
}
