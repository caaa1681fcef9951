//! Preemption, as the launcher and the workers both see it: the checkpoint signal
//! (`--checkpoint-signal`, SLURM's `--signal=USR1@120`), the "preempted" exit code, and the
//! control plane's keys through which every rank of a job agrees on the step it checkpoints at.
//!
//! The agreement (the worker's side is `coca_worker::distributed::preemption`):
//! 1. whoever receives the signal first, a launcher or a worker, sets [`request_key`];
//! 2. every worker waits for that key on a thread of its own (one blocking `get`, no polling),
//!    then announces under [`announce_key`] how many steps it has completed;
//! 3. rank 0 reads every announcement and sets [`decision_key`]: the job checkpoints after step
//!    `max(announced) + 1`, which no rank has passed yet;
//! 4. each rank saves its part of that one checkpoint and exits with [`EXIT_PREEMPTED`].

use anyhow::{bail, Context, Result};

/// Exit code of a worker, and of the launchers, when the job saved its checkpoint and stopped
/// because it was asked to (not 0: SLURM and scripts must see that the work is not done).
pub const EXIT_PREEMPTED: i32 = 76;

/// The variable through which the launcher gives its workers the checkpoint signal's number
/// (`0`: none). A worker started by hand takes [`DEFAULT_CHECKPOINT_SIGNAL`].
pub const CHECKPOINT_SIGNAL_ENV: &str = "COCA_CHECKPOINT_SIGNAL";

/// `--checkpoint-signal`'s default, as SLURM's `--signal=USR1@120` sends it.
pub const DEFAULT_CHECKPOINT_SIGNAL: &str = "USR1";

/// The signals that may ask for a checkpoint: none of them stops the launcher or is a fault.
const CHECKPOINT_SIGNALS: [(&str, libc::c_int); 7] = [
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("ALRM", libc::SIGALRM),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("PWR", libc::SIGPWR),
    ("WINCH", libc::SIGWINCH),
];

/// Reads a `--checkpoint-signal` value: a name with or without `SIG` in any case (`USR1`,
/// `sigusr2`), its number as SLURM's `--signal` accepts it (`10`), or `none` (no signal asks for
/// a checkpoint). The error is one line naming the flag and the signals allowed.
pub fn parse_checkpoint_signal(value: &str) -> Result<Option<libc::c_int>> {
    let v = value.trim();
    if v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let upper = v.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let found = match name.parse::<libc::c_int>() {
        Ok(number) => CHECKPOINT_SIGNALS.iter().find(|(_, n)| *n == number),
        Err(_) => CHECKPOINT_SIGNALS.iter().find(|(n, _)| *n == name),
    };
    match found {
        Some((_, number)) => Ok(Some(*number)),
        None => bail!(
            "--checkpoint-signal {value:?} is not a signal that can ask for a checkpoint: use one \
             of {} (or its number), or none",
            CHECKPOINT_SIGNALS.map(|(n, _)| n).join(", ")
        ),
    }
}

/// `SIGUSR1` for the checkpoint signals and SIGTERM, `signal N` otherwise.
pub fn signal_name(signal: libc::c_int) -> String {
    if signal == libc::SIGTERM {
        return "SIGTERM".into();
    }
    CHECKPOINT_SIGNALS
        .iter()
        .find(|(_, n)| *n == signal)
        .map_or_else(|| format!("signal {signal}"), |(n, _)| format!("SIG{n}"))
}

/// The checkpoint signal a worker listens for: the launcher's [`CHECKPOINT_SIGNAL_ENV`] (its
/// number, 0 for none), else [`DEFAULT_CHECKPOINT_SIGNAL`].
pub fn checkpoint_signal_from_env() -> Result<Option<libc::c_int>> {
    match std::env::var(CHECKPOINT_SIGNAL_ENV) {
        Ok(v) if v.trim() == "0" => Ok(None),
        Ok(v) => parse_checkpoint_signal(&v).context(CHECKPOINT_SIGNAL_ENV),
        Err(_) => parse_checkpoint_signal(DEFAULT_CHECKPOINT_SIGNAL),
    }
}

/// Set once per generation by whoever receives the signal first; its value says who and why.
pub fn request_key(generation: u64) -> String {
    format!("preempt/gen{generation}/request")
}

/// Where a rank announces the number of steps it had completed when it learnt of the request.
pub fn announce_key(generation: u64, rank: usize) -> String {
    format!("preempt/gen{generation}/rank{rank}")
}

/// Where rank 0 puts the [`Decision`].
pub fn decision_key(generation: u64) -> String {
    format!("preempt/gen{generation}/decision")
}

/// The step every rank checkpoints after, and the checkpoint's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Steps completed when the checkpoint is taken (its `checkpoint-<step>` name).
    pub step: u64,
    /// The directory rank 0 writes, as the workers see it.
    pub checkpoint: String,
}

impl Decision {
    /// The bytes stored under [`decision_key`].
    pub fn encode(&self) -> Vec<u8> {
        format!("{}\n{}", self.step, self.checkpoint).into_bytes()
    }

    /// Reads what [`Decision::encode`] stored.
    pub fn decode(bytes: &[u8]) -> Result<Decision> {
        let text = std::str::from_utf8(bytes).context("the preemption decision is not text")?;
        let (step, checkpoint) = text
            .split_once('\n')
            .with_context(|| format!("malformed preemption decision {text:?}"))?;
        Ok(Decision {
            step: step
                .parse()
                .with_context(|| format!("malformed preemption decision {text:?}"))?,
            checkpoint: checkpoint.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_numbers_and_none() {
        for v in ["USR1", "usr1", "SIGUSR1", "sigusr1", "10"] {
            assert_eq!(
                parse_checkpoint_signal(v).unwrap(),
                Some(libc::SIGUSR1),
                "{v}"
            );
        }
        assert_eq!(
            parse_checkpoint_signal("USR2").unwrap(),
            Some(libc::SIGUSR2)
        );
        assert_eq!(parse_checkpoint_signal("none").unwrap(), None);
        for bad in ["FOO", "TERM", "KILL", "9", "", "SIG"] {
            let e = format!("{:#}", parse_checkpoint_signal(bad).unwrap_err());
            assert!(
                e.contains("--checkpoint-signal") && e.contains("USR1"),
                "{e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
        assert_eq!(signal_name(libc::SIGUSR1), "SIGUSR1");
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
    }

    #[test]
    fn decisions_roundtrip() {
        let d = Decision {
            step: 17,
            checkpoint: "/out/checkpoint-17".into(),
        };
        assert_eq!(Decision::decode(&d.encode()).unwrap(), d);
        assert!(Decision::decode(b"x").is_err());
        assert!(Decision::decode(b"x\n/out").is_err());
    }
}
