//! Stall detection for a ring link: a collective that moves no byte for a while is logged, and
//! after the collective timeout it fails naming the group, the operation and the peer it waits
//! on — instead of hanging the job forever (a frozen peer, a host that dropped off the network,
//! a link losing most of its packets).
//!
//! "Progress" is any byte moving on this member's links, in either direction: the calling
//! thread stamps the [`Progress`] clock after every read that returned data, the sender thread
//! after every write, so a slow but live link never times out. Receives poll with a short
//! socket read timeout ([`StallLimits::tick`]) and check the clock between polls; waits on the
//! sender thread do the same on its condition variable.

use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The collective timeout when none is configured: PyTorch's default for process groups.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(600);

/// The longest a stall goes unreported: the warning comes after this, or after half the
/// timeout when that is shorter.
pub const MAX_STALL_WARNING: Duration = Duration::from_secs(60);

/// Environment variable (seconds) through which the launcher's `--collective-timeout` reaches
/// the workers.
pub const COLLECTIVE_TIMEOUT_ENV: &str = "COCA_COLLECTIVE_TIMEOUT";

/// How long a collective may go without progress: a warning after `warn_after`, an error after
/// `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallLimits {
    /// Without progress this long, a warning is logged (once per stall).
    pub warn_after: Duration,
    /// Without progress this long, the operation fails and the group becomes unusable.
    pub timeout: Duration,
}

impl Default for StallLimits {
    fn default() -> Self {
        StallLimits::with_timeout(DEFAULT_COLLECTIVE_TIMEOUT)
    }
}

impl StallLimits {
    /// `timeout`, with the warning after [`MAX_STALL_WARNING`] or half the timeout, whichever
    /// is shorter.
    pub fn with_timeout(timeout: Duration) -> Self {
        StallLimits {
            warn_after: MAX_STALL_WARNING.min(timeout / 2),
            timeout,
        }
    }

    /// Parses a timeout in seconds (`600`, `2.5`) as given to `--collective-timeout` or
    /// [`COLLECTIVE_TIMEOUT_ENV`]; `what` names the source in the error.
    pub fn parse(value: &str, what: &str) -> Result<Self> {
        let secs: f64 = value
            .trim()
            .parse()
            .with_context(|| format!("{what}={value:?} is not a number of seconds"))?;
        if !(secs.is_finite() && secs > 0.0 && secs <= 365.0 * 86400.0) {
            bail!("{what}={value:?} must be a positive number of seconds (at most a year)");
        }
        Ok(StallLimits::with_timeout(Duration::from_secs_f64(secs)))
    }

    /// The limits from [`COLLECTIVE_TIMEOUT_ENV`], or the default when it is not set.
    pub fn from_env() -> Result<Self> {
        match std::env::var(COLLECTIVE_TIMEOUT_ENV) {
            Ok(v) => StallLimits::parse(&v, COLLECTIVE_TIMEOUT_ENV),
            Err(_) => Ok(StallLimits::default()),
        }
    }

    /// How often a blocked receive or wait wakes up to look at the clock.
    pub(super) fn tick(&self) -> Duration {
        (self.warn_after.min(self.timeout) / 4)
            .clamp(Duration::from_millis(5), Duration::from_secs(1))
    }
}

/// When a byte last moved on a member's links, shared by the calling and the sender thread.
#[derive(Debug)]
pub(super) struct Progress {
    base: Instant,
    /// Microseconds after `base`.
    last_us: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            base: Instant::now(),
            last_us: AtomicU64::new(0),
        }
    }
}

impl Progress {
    /// Bytes moved just now.
    pub(super) fn touch(&self) {
        let us = u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_us.fetch_max(us, Ordering::Relaxed);
    }

    /// How long since bytes last moved.
    pub(super) fn idle(&self) -> Duration {
        let last = Duration::from_micros(self.last_us.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

/// The error of a collective that made no progress for the collective timeout (the message
/// names the group, the operation and the peer), so that a worker can exit with a code of its
/// own for it.
#[derive(Debug)]
pub struct CollectiveTimeout(pub String);

impl std::fmt::Display for CollectiveTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CollectiveTimeout {}

/// What a stalled member is waiting for, for the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Waiting {
    /// Data from the previous member.
    Receive,
    /// The next member to take what this member sends.
    Send,
}

/// One wait's view of the clock: decides between carrying on, warning (once per stall) and
/// giving up.
pub(super) struct Watch {
    warned: bool,
}

/// What a [`Watch`] says after a quiet poll.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Wait,
    /// Log a warning: no progress for this long.
    Warn(Duration),
    /// Fail: no progress for this long.
    Fail(Duration),
}

impl Watch {
    pub(super) fn new() -> Self {
        Watch { warned: false }
    }

    pub(super) fn check(&mut self, progress: &Progress, limits: &StallLimits) -> Verdict {
        let idle = progress.idle();
        if idle >= limits.timeout {
            Verdict::Fail(idle)
        } else if idle >= limits.warn_after && !self.warned {
            self.warned = true;
            Verdict::Warn(idle)
        } else {
            if idle < limits.warn_after {
                self.warned = false; // progress resumed: a later stall warns again
            }
            Verdict::Wait
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_and_default() {
        let d = StallLimits::default();
        assert_eq!(d.timeout, Duration::from_secs(600));
        assert_eq!(d.warn_after, Duration::from_secs(60));
        let short = StallLimits::parse("2", "--collective-timeout").unwrap();
        assert_eq!(short.timeout, Duration::from_secs(2));
        assert_eq!(short.warn_after, Duration::from_secs(1));
        assert!(short.tick() <= Duration::from_millis(250));
        for bad in ["0", "-1", "abc", "inf", "NaN", ""] {
            let e = StallLimits::parse(bad, "--collective-timeout").unwrap_err();
            assert!(
                format!("{e:#}").contains("--collective-timeout"),
                "{bad}: {e:#}"
            );
        }
    }

    #[test]
    fn watch_warns_once_then_fails() {
        let limits = StallLimits {
            warn_after: Duration::from_millis(30),
            timeout: Duration::from_millis(80),
        };
        let progress = Progress::default();
        let mut watch = Watch::new();
        assert_eq!(watch.check(&progress, &limits), Verdict::Wait);
        std::thread::sleep(Duration::from_millis(40));
        assert!(matches!(watch.check(&progress, &limits), Verdict::Warn(_)));
        assert_eq!(watch.check(&progress, &limits), Verdict::Wait);
        progress.touch();
        assert_eq!(watch.check(&progress, &limits), Verdict::Wait);
        std::thread::sleep(Duration::from_millis(90));
        assert!(matches!(watch.check(&progress, &limits), Verdict::Fail(_)));
    }
}
