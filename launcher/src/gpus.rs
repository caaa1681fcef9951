//! The GPUs a node's launcher hands out, one per worker, and the checks that refuse a GPU job
//! the node cannot run (a one-line error naming the node, exit 2, before any worker starts).

use anyhow::{bail, Result};

/// GPU ids this launcher may hand out: `CUDA_VISIBLE_DEVICES`, else the NVIDIA driver's list.
pub fn visible_gpus() -> Vec<String> {
    if let Ok(list) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return parse_visible(&list);
    }
    match std::fs::read_dir("/proc/driver/nvidia/gpus") {
        Ok(entries) => (0..entries.count()).map(|i| i.to_string()).collect(),
        Err(_) => Vec::new(),
    }
}

/// The ids of a `CUDA_VISIBLE_DEVICES` list (`-1` and empty entries hide everything after).
fn parse_visible(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .take_while(|s| !s.is_empty() && *s != "-1")
        .map(str::to_string)
        .collect()
}

/// This node in messages: `node RANK (HOSTNAME)`.
pub fn node_name(node_rank: usize) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() {
        format!("node {node_rank}")
    } else {
        format!("node {node_rank} ({host})")
    }
}

/// Whether the worker's command line asks for a CUDA device (`--device cuda`, `--device=cuda:0`).
pub fn worker_wants_cuda(worker_args: &[String]) -> bool {
    worker_args.iter().enumerate().any(|(i, a)| {
        let value = match a.strip_prefix("--device") {
            Some("") => worker_args.get(i + 1).map(String::as_str),
            Some(rest) => rest.strip_prefix('='),
            None => None,
        };
        value.is_some_and(|v| v.starts_with("cuda"))
    })
}

/// Refuses `nproc` workers that each want a GPU of their own when fewer GPUs are visible:
/// `--nproc-per-node N -- … --device cuda` with `CUDA_VISIBLE_DEVICES` (or the driver) naming
/// fewer than N. `gpu`/`auto` count the GPUs themselves, so only a number is checked here.
pub fn check_gpu_count(
    spec: &str,
    nproc: usize,
    visible: &[String],
    wants_cuda: bool,
    node: &str,
) -> Result<()> {
    if !wants_cuda || spec.parse::<usize>().is_err() || nproc <= visible.len() {
        return Ok(());
    }
    let source = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) => format!("CUDA_VISIBLE_DEVICES={v:?} names"),
        Err(_) => "the driver lists".to_string(),
    };
    bail!(
        "{node}: --nproc-per-node {nproc} starts {nproc} GPU workers (--device cuda) but \
         {source} {} GPU(s); start at most {} or use --nproc-per-node gpu",
        visible.len(),
        visible.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn visible_lists_stop_at_minus_one() {
        assert_eq!(parse_visible("0, 1,2"), strings(&["0", "1", "2"]));
        assert_eq!(parse_visible("GPU-abc,1"), strings(&["GPU-abc", "1"]));
        assert!(parse_visible("").is_empty());
        assert!(parse_visible("-1").is_empty());
        assert_eq!(parse_visible("0,-1,1"), strings(&["0"]));
    }

    #[test]
    fn cuda_device_flags_are_recognised() {
        assert!(worker_wants_cuda(&strings(&[
            "pretrain", "--device", "cuda"
        ])));
        assert!(worker_wants_cuda(&strings(&[
            "pretrain",
            "--device=cuda:0"
        ])));
        assert!(!worker_wants_cuda(&strings(&[
            "pretrain", "--device", "cpu"
        ])));
        assert!(!worker_wants_cuda(&strings(&["pretrain", "--device"])));
        assert!(!worker_wants_cuda(&strings(&[
            "pretrain",
            "--devices",
            "cuda"
        ])));
    }

    #[test]
    fn fewer_visible_gpus_than_workers_is_an_error_naming_the_node() {
        let two = strings(&["0", "1"]);
        check_gpu_count("2", 2, &two, true, "node 0 (h)").unwrap();
        check_gpu_count("4", 4, &two, false, "node 0 (h)").unwrap();
        check_gpu_count("gpu", 2, &two, true, "node 0 (h)").unwrap();
        let e = check_gpu_count("4", 4, &two, true, "node 1 (gpu7)").unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.starts_with("node 1 (gpu7): "), "{msg}");
        assert!(msg.contains("2 GPU(s)") && !msg.contains('\n'), "{msg}");
    }

    #[test]
    fn node_names_carry_the_rank() {
        assert!(node_name(3).starts_with("node 3"));
    }
}
