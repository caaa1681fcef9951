//! `coca-launch`: starts one `coca-worker` per device on this node, joins the other nodes through
//! the control plane (hosted by node 0), and supervises the whole job: a failure anywhere stops
//! (or restarts) every worker on every node.
//!
//! Exit codes: 0 when every worker succeeded; the first failed worker's exit code (128 + signal
//! when it was killed); 2 for a usage or configuration error; 3 when the control plane failed
//! (rendezvous timeout, lost node 0); 76 when the job saved a checkpoint and stopped because it
//! was asked to (`--checkpoint-signal`, SIGTERM; see `preempt`).

mod address;
mod args;
mod elastic;
mod gpus;
mod interfaces;
mod memory;
mod preempt;
mod preflight;
mod process;
mod summary;
mod supervise;
mod worker_flags;

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COCA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,coca_common=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(coca_common::log_style::stderr_colour())
        .with_target(false)
        .init();
    let code = match args::parse(std::env::args().skip(1).collect()) {
        Ok(command_line) => match supervise::run(command_line) {
            Ok(code) => code,
            // The worker has printed why it refused its command: only its exit code remains.
            Err(e) if e.downcast_ref::<preflight::Refused>().is_some() => {
                e.downcast_ref::<preflight::Refused>().map_or(2, |r| r.0)
            }
            Err(e) => {
                eprintln!("coca-launch: error: {e:#}");
                e.downcast_ref::<supervise::ControlPlaneError>()
                    .map_or(2, |_| 3)
            }
        },
        Err(e) => {
            eprintln!("coca-launch: error: {e:#}");
            2
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
