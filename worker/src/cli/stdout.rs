//! Lines on standard output that a closed reader stops quietly: `coca-worker caption DIR | head`
//! ends the command as `head` ends, with the shell's exit code for a closed pipe, not a panic
//! (which `println!` raises on a closed pipe, since Rust ignores SIGPIPE).

use anyhow::{Context, Result};
use std::fmt::Display;
use std::io::Write;

/// Standard output was closed by its reader: the command stops, printing nothing more.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct OutputClosed;

/// The exit code for [`OutputClosed`]: 128 + SIGPIPE, what a shell reports for a program a
/// closed pipe ended.
pub const EXIT_OUTPUT_CLOSED: u8 = 141;

/// Writes `line` and a line end to `out`; a closed pipe is [`OutputClosed`].
pub fn write_line(out: &mut impl Write, line: impl Display) -> Result<()> {
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OutputClosed.into()),
        other => other.context("writing to standard output"),
    }
}

/// [`write_line`] to standard output.
pub fn print_line(line: impl Display) -> Result<()> {
    write_line(&mut std::io::stdout().lock(), line)
}

/// Whether `e` is, or was caused by, [`OutputClosed`].
pub fn is_output_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| cause.is::<OutputClosed>())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose reader has gone, or that fails otherwise.
    struct Failing(std::io::ErrorKind);

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(self.0.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_is_output_closed_and_other_errors_are_not() {
        let mut out = Vec::new();
        write_line(&mut out, "a\tb").unwrap();
        assert_eq!(out, b"a\tb\n");
        let closed = write_line(&mut Failing(std::io::ErrorKind::BrokenPipe), "x").unwrap_err();
        assert!(is_output_closed(&closed.context("captioning")));
        let full = write_line(&mut Failing(std::io::ErrorKind::StorageFull), "x").unwrap_err();
        assert!(!is_output_closed(&full));
        assert!(format!("{full:#}").contains("writing to standard output"));
    }
}
