//! Whether log output may carry terminal colour codes: only on a terminal, and never when
//! `NO_COLOR` is set (<https://no-color.org>). Each process decides from its own stream: a
//! worker under `coca-launch` writes into a pipe, so its lines reach the worker logs plain.

use std::io::IsTerminal;

/// Colour for a stream that is (`is_terminal`) or is not a terminal, given `NO_COLOR`'s value.
pub fn colour_allowed(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    // NO_COLOR: "when present and not an empty string", colour is off.
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Colour for this process's stderr (where the logs go).
pub fn stderr_colour() -> bool {
    colour_allowed(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_allowed(true, None));
        assert!(colour_allowed(true, Some(OsStr::new(""))));
        assert!(!colour_allowed(true, Some(OsStr::new("1"))));
        assert!(!colour_allowed(false, None));
    }
}
