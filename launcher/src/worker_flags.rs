//! The few worker flags the launcher must read to derive the topology before anything starts.

use anyhow::{Context, Result};

/// The value of a worker flag such as `--tensor_parallel_degree N` (either spelling, `=` or
/// separate; the last one wins, as in the worker), 1 when absent.
pub fn degree_flag(worker_args: &[String], name: &str) -> Result<usize> {
    let spellings = [format!("--{name}"), format!("--{}", name.replace('_', "-"))];
    let mut value = None;
    for (i, arg) in worker_args.iter().enumerate() {
        for flag in &spellings {
            if arg == flag {
                value = worker_args.get(i + 1).cloned();
            } else if let Some(v) = arg.strip_prefix(&format!("{flag}=")) {
                value = Some(v.to_string());
            }
        }
    }
    match value {
        None => Ok(1),
        Some(v) => v
            .parse()
            .with_context(|| format!("--{name} must be a positive integer, got {v:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_either_spelling() {
        let args: Vec<String> = [
            "pretrain",
            "--tensor-parallel-degree=2",
            "--sharding_parallel_degree",
            "4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(degree_flag(&args, "tensor_parallel_degree").unwrap(), 2);
        assert_eq!(degree_flag(&args, "sharding_parallel_degree").unwrap(), 4);
        assert_eq!(
            degree_flag(&args[..1], "sharding_parallel_degree").unwrap(),
            1
        );
        assert!(degree_flag(
            &["--tensor_parallel_degree".into(), "x".into()],
            "tensor_parallel_degree"
        )
        .is_err());
    }
}
