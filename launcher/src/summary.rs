//! The failure summary: which rank failed first, where, how, and its last log lines.

use coca_common::control::{ExitKind, FailureReport};
use std::time::{Duration, UNIX_EPOCH};

/// The launcher's exit code for a failure: the worker's code, 128 + signal, or 1.
pub fn exit_code(failure: &FailureReport) -> i32 {
    match failure.exit {
        ExitKind::Code(0) => 1,
        ExitKind::Code(c) => c,
        ExitKind::Signal(s) => 128 + s,
        ExitKind::Lost => 1,
    }
}

fn exit_words(exit: &ExitKind) -> String {
    match exit {
        ExitKind::Code(c) => format!("exit code {c}"),
        ExitKind::Signal(s) => format!("signal {s} ({})", crate::process::signal_name(*s)),
        ExitKind::Lost => "lost".to_string(),
    }
}

/// The table printed when a job stops because of `failure`.
pub fn render(failure: &FailureReport) -> String {
    let time = UNIX_EPOCH + Duration::from_secs_f64(failure.unix_time_s.max(0.0));
    let rank = failure
        .rank
        .map_or_else(|| "-".to_string(), |r| r.to_string());
    let pid = failure
        .pid
        .map_or_else(|| "-".to_string(), |p| p.to_string());
    let mut out = String::new();
    out.push_str("coca-launch: the job failed; first failure:\n");
    out.push_str(&format!(
        "  {:<20}  {:>4}  {:>5}  {:>8}  {}\n",
        "time (UTC)", "node", "rank", "pid", "exit"
    ));
    out.push_str(&format!(
        "  {:<20}  {:>4}  {:>5}  {:>8}  {}\n",
        humantime::format_rfc3339_seconds(time),
        failure.node_rank,
        rank,
        pid,
        exit_words(&failure.exit)
    ));
    out.push_str(&format!("  cause: {}\n", failure.cause));
    if !failure.last_lines.is_empty() {
        out.push_str(&format!("  last lines of rank {rank}:\n"));
        for line in &failure.last_lines {
            out.push_str(&format!("    | {line}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_rank_node_and_signal() {
        let f = FailureReport {
            generation: 0,
            node_rank: 1,
            rank: Some(3),
            pid: Some(4242),
            exit: ExitKind::Signal(9),
            cause: "rank 3 was killed".into(),
            last_lines: vec!["step 2".into()],
            unix_time_s: 0.0,
        };
        let table = render(&f);
        assert!(table.contains("1970-01-01T00:00:00Z"), "{table}");
        assert!(table.contains("signal 9 (SIGKILL)"), "{table}");
        assert!(
            table.contains("4242") && table.contains("| step 2"),
            "{table}"
        );
        assert_eq!(exit_code(&f), 137);
        assert_eq!(
            exit_code(&FailureReport {
                exit: ExitKind::Code(0),
                ..f
            }),
            1
        );
    }
}
