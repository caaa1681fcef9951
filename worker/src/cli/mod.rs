//! Flag handling shared by every worker command: the seed's boolean spellings, its
//! underscore flag names, and its precision flags; and lines on standard output.

pub mod precision;
pub mod stdout;

/// Parses the seed's boolean spellings.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "y" | "on" => Ok(true),
        "false" | "0" | "no" | "n" | "off" => Ok(false),
        _ => Err(format!("expected True or False, got {s:?}")),
    }
}

/// Rewrites `--some_flag[=v]` as `--some-flag[=v]` so both spellings reach one definition.
pub fn normalize_flag_spelling(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .map(|a| match a.strip_prefix("--") {
            Some(rest) if !rest.is_empty() => {
                let (name, value) = match rest.split_once('=') {
                    Some((n, v)) => (n, Some(v)),
                    None => (rest, None),
                };
                let name = name.replace('_', "-");
                match value {
                    Some(v) => format!("--{name}={v}"),
                    None => format!("--{name}"),
                }
            }
            _ => a,
        })
        .collect()
}
