//! Data-parallel training under `coca-launch`: 1, 2 and 4 processes and two simulated nodes end
//! with the same parameters; a killed worker stops every node promptly; restarts resume from
//! the latest checkpoint and end where an uninterrupted run does.

mod common;

use common::jobs::{
    alive, descendants, free_udp_port, kill, loopback_node_flags, wait_for_path, worker_pid, Job,
};
use common::training::{
    assert_same_losses, assert_same_weights, launch_local, launcher_flags, losses, pretrain_flags,
    run_alone, run_launcher, with, JOB_LIMIT, TOKEN,
};
use std::path::Path;
use std::time::{Duration, Instant};

/// Launcher flags of `node` of a simulated two-node job on loopback, plus `extra`.
fn node_flags(node: usize, port: &str, token: &str, log_dir: &Path, extra: &[&str]) -> Vec<String> {
    loopback_node_flags("2", node, port, token, log_dir, extra)
}

#[test]
fn one_two_four_processes_and_two_nodes_train_the_same_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let steps = 4;
    let global_batch = 8;
    let single = tmp.path().join("single");
    run_alone(&pretrain_flags(&config, &single, global_batch, steps));
    let reference = single.join(format!("checkpoint-{steps}/model.safetensors"));
    let reference_losses = losses(&single);
    assert_eq!(reference_losses.len(), steps);

    // (processes per node, nodes, extra pretrain flags): every contrastive layout open_clip has.
    let layouts: [(usize, usize, &[&str]); 3] = [
        (2, 1, &[]),
        (
            4,
            1,
            &["--gather_with_grad", "True", "--local_loss", "True"],
        ),
        (2, 2, &["--gather_with_grad", "True"]),
    ];
    for (nproc, nnodes, extra) in layouts {
        let world = nproc * nnodes;
        let what = format!("{nnodes} node(s) × {nproc} processes {extra:?}");
        let out_dir = tmp.path().join(format!("n{nnodes}p{nproc}"));
        let mut worker = pretrain_flags(&config, &out_dir, global_batch / world, steps);
        worker.extend(extra.iter().map(|s| s.to_string()));
        let log_dir = out_dir.join("logs");
        let log_dir = log_dir.to_str().unwrap();
        let nproc_s = nproc.to_string();
        if nnodes == 1 {
            let stdout = run_launcher(launcher_flags(
                &["--nproc-per-node", &nproc_s, "--log-dir", log_dir],
                &worker,
            ));
            assert!(
                stdout.contains("[rank 0]"),
                "local rank 0 is echoed: {stdout}"
            );
            for rank in 0..world {
                assert!(Path::new(log_dir)
                    .join(format!("workerlog.{rank}"))
                    .is_file());
            }
        } else {
            let port = free_udp_port().to_string();
            let mut jobs: Vec<Job> = (0..nnodes)
                .map(|node| {
                    let flags = node_flags(
                        node,
                        &port,
                        TOKEN,
                        Path::new(log_dir),
                        &["--nproc_per_node", &nproc_s],
                    );
                    Job::start("coca-launch", &launcher_flags(&flags, &worker))
                })
                .collect();
            for job in jobs.iter_mut() {
                let (code, out, err) = job.finish(JOB_LIMIT);
                assert_eq!(code, 0, "{what}\n{out}\n{err}");
            }
        }
        let got = out_dir.join(format!("checkpoint-{steps}/model.safetensors"));
        assert_same_weights(&reference, &got, 1e-5, &what);
        let got_losses = losses(&out_dir);
        assert_eq!(got_losses.len(), steps, "{what}");
        for (a, b) in reference_losses.iter().zip(&got_losses) {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "{what}: loss {b} vs {a}");
        }
    }
}

/// Starts two simulated nodes of two workers each on a long run.
fn two_nodes(tmp: &Path, extra_launcher: &[&str]) -> (Vec<Job>, std::path::PathBuf) {
    let config = common::tiny_config(tmp);
    let out_dir = tmp.join("run");
    let worker = pretrain_flags(&config, &out_dir, 4, 100_000);
    let port = free_udp_port().to_string();
    let log_dir = tmp.join("logs");
    let jobs = (0..2)
        .map(|node| {
            let mut extra = vec!["--nproc-per-node", "2", "--heartbeat-timeout", "4"];
            extra.extend_from_slice(extra_launcher);
            let flags = node_flags(node, &port, TOKEN, &log_dir, &extra);
            Job::start("coca-launch", &launcher_flags(&flags, &worker))
        })
        .collect();
    (jobs, out_dir)
}

#[test]
fn a_killed_worker_stops_every_node_within_ten_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut jobs, out_dir) = two_nodes(tmp.path(), &[]);
    wait_for_path(&out_dir.join("metrics.jsonl"), JOB_LIMIT);
    let workers: Vec<u32> = jobs.iter().flat_map(|j| descendants(j.pid())).collect();
    assert_eq!(workers.len(), 4, "two workers per node");
    let victim = worker_pid(jobs[1].pid(), 3, Duration::from_secs(5));
    let killed_at = Instant::now();
    kill(victim, "-9");
    let mut stderr = String::new();
    for job in jobs.iter_mut() {
        let left = Duration::from_secs(10).saturating_sub(killed_at.elapsed());
        let code = job.wait(left);
        let (_, err) = job.output();
        assert_eq!(
            code,
            Some(137),
            "the first failure's code (SIGKILL) comes back\n{err}"
        );
        stderr.push_str(&err);
    }
    let took = killed_at.elapsed();
    assert!(took <= Duration::from_secs(10), "took {took:?}");
    assert!(
        stderr.contains("rank 3"),
        "the failed rank is named: {stderr}"
    );
    assert!(stderr.contains("SIGKILL"), "{stderr}");
    std::thread::sleep(Duration::from_millis(200));
    let left: Vec<u32> = workers.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "workers still running: {left:?}");
}

#[test]
fn a_launcher_killed_with_sigkill_takes_its_workers_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let out_dir = tmp.path().join("run");
    let worker = pretrain_flags(&config, &out_dir, 4, 100_000);
    let log_dir = tmp.path().join("logs");
    let mut job = Job::start(
        "coca-launch",
        &launcher_flags(
            &[
                "--nproc-per-node",
                "2",
                "--log-dir",
                log_dir.to_str().unwrap(),
            ],
            &worker,
        ),
    );
    wait_for_path(&out_dir.join("metrics.jsonl"), JOB_LIMIT);
    let workers = descendants(job.pid());
    assert_eq!(workers.len(), 2);
    job.signal("-9");
    assert!(job.wait(Duration::from_secs(5)).is_some());
    let deadline = Instant::now() + Duration::from_secs(5);
    while workers.iter().any(|&p| alive(p)) {
        assert!(Instant::now() < deadline, "orphaned workers: {workers:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM is SLURM's notice: every rank on both nodes checkpoints at one step, and both
/// launchers say so and exit with 76 ("preempted").
#[test]
fn sigterm_to_a_launcher_stops_the_job_on_every_node() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut jobs, out_dir) = two_nodes(tmp.path(), &[]);
    wait_for_path(&out_dir.join("metrics.jsonl"), JOB_LIMIT);
    let workers: Vec<u32> = jobs.iter().flat_map(|j| descendants(j.pid())).collect();
    jobs[0].signal("-TERM");
    let mut summaries = Vec::new();
    for job in jobs.iter_mut() {
        let code = job.wait(Duration::from_secs(10));
        let (_, err) = job.output();
        assert_eq!(code, Some(76), "{err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("coca-launch: preempted at step "))
            .unwrap_or_else(|| panic!("no summary: {err}"));
        summaries.push(line.split(" (").next().unwrap_or(line).to_string());
    }
    assert_eq!(summaries[0], summaries[1], "both nodes name one checkpoint");
    std::thread::sleep(Duration::from_millis(200));
    assert!(workers.iter().all(|&p| !alive(p)));
}

#[test]
fn with_max_restarts_a_killed_worker_restarts_the_job_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let steps = 30;
    let single = tmp.path().join("single");
    let mut flags = pretrain_flags(&config, &single, 16, steps);
    flags.extend(["--save_steps".to_string(), "4".to_string()]);
    run_alone(&flags);

    let out_dir = tmp.path().join("restarted");
    let mut worker = pretrain_flags(&config, &out_dir, 8, steps);
    worker.extend(["--save_steps".to_string(), "4".to_string()]);
    let log_dir = tmp.path().join("logs");
    let mut job = Job::start(
        "coca-launch",
        &launcher_flags(
            &[
                "--nproc-per-node",
                "2",
                "--max-restarts",
                "1",
                "--log-dir",
                log_dir.to_str().unwrap(),
            ],
            &worker,
        ),
    );
    wait_for_path(&out_dir.join("checkpoint-4"), JOB_LIMIT);
    kill(worker_pid(job.pid(), 1, Duration::from_secs(5)), "-9");
    let (code, out, err) = job.finish(JOB_LIMIT);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("restarting"), "{err}");
    assert!(out.contains("resuming from"), "{out}");
    assert_same_weights(
        &single.join(format!("checkpoint-{steps}/model.safetensors")),
        &out_dir.join(format!("checkpoint-{steps}/model.safetensors")),
        1e-5,
        "restarted run",
    );
}

#[test]
fn a_node_without_the_token_cannot_join() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_udp_port().to_string();
    let log_dir = tmp.path().join("logs");
    let start = |node: usize, token: &str| {
        let flags = node_flags(node, &port, token, &log_dir, &["--rdzv-timeout", "6"]);
        Job::start(
            "coca-launch",
            &launcher_flags(&flags, &["--version".to_string()]),
        )
    };
    let mut node0 = start(0, "the-right-secret-0123456789");
    let mut intruder = start(1, "a-wrong-secret-0123456789ab");
    let (code, _, err) = intruder.finish(Duration::from_secs(30));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("bad token"), "{err}");
    let (code, _, err) = node0.finish(Duration::from_secs(30));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("node 1"), "the missing node is named: {err}");
}

#[test]
fn zero_stage1_and_stage2_train_the_same_parameters_and_their_checkpoints_load_anywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let (steps, global_batch) = (4, 8);
    let logs = tmp.path().join("logs");
    // One process, saving halfway.
    let single = tmp.path().join("single");
    let flags = with(
        pretrain_flags(&config, &single, global_batch, steps),
        &["--save_steps", "2"],
    );
    run_alone(&flags);
    let reference = single.join(format!("checkpoint-{steps}/model.safetensors"));
    let final_of = |dir: &Path| dir.join(format!("checkpoint-{steps}/model.safetensors"));

    // (sharding degree, stage) on 4 processes; dp fills the rest.
    for (sharding, stage) in [(2, "stage1"), (2, "stage2"), (4, "stage2")] {
        let out_dir = tmp.path().join(format!("{stage}x{sharding}"));
        let worker = with(
            pretrain_flags(&config, &out_dir, global_batch / 4, steps),
            &[
                "--sharding_parallel_degree",
                &sharding.to_string(),
                "--sharding",
                stage,
                "--save_steps",
                "2",
            ],
        );
        launch_local(4, &worker, &logs);
        assert_same_weights(
            &reference,
            &final_of(&out_dir),
            1e-5,
            &format!("{stage} × {sharding}"),
        );
        assert!(
            out_dir
                .join("checkpoint-2/optimizer-shard-00001-of-00002.safetensors")
                .is_file()
                || sharding == 4
        );
        assert_eq!(losses(&out_dir).len(), steps);
    }

    // A stage2 × 4 checkpoint resumes as stage1 × 2 and as one process; a one-process
    // checkpoint resumes as stage2 × 4.
    let sharded_ckpt = tmp.path().join("stage2x4/checkpoint-2");
    assert!(sharded_ckpt.join("optimizer.index.json").is_file());
    let resumed = tmp.path().join("resumed-stage1x2");
    launch_local(
        2,
        &with(
            pretrain_flags(&config, &resumed, global_batch / 2, steps),
            &[
                "--sharding_parallel_degree",
                "2",
                "--sharding",
                "stage1",
                "--resume_from_checkpoint",
                sharded_ckpt.to_str().unwrap(),
            ],
        ),
        &logs,
    );
    assert_same_weights(&reference, &final_of(&resumed), 1e-5, "stage2×4 → stage1×2");
    let resumed = tmp.path().join("resumed-single");
    let flags = with(
        pretrain_flags(&config, &resumed, global_batch, steps),
        &["--resume_from_checkpoint", sharded_ckpt.to_str().unwrap()],
    );
    run_alone(&flags);
    assert_same_weights(
        &reference,
        &final_of(&resumed),
        1e-5,
        "stage2×4 → one process",
    );
    let resumed = tmp.path().join("resumed-stage2x4");
    launch_local(
        4,
        &with(
            pretrain_flags(&config, &resumed, global_batch / 4, steps),
            &[
                "--sharding_parallel_degree",
                "4",
                "--sharding",
                "stage2",
                "--resume_from_checkpoint",
                single.join("checkpoint-2").to_str().unwrap(),
            ],
        ),
        &logs,
    );
    assert_same_weights(
        &reference,
        &final_of(&resumed),
        1e-5,
        "one process → stage2×4",
    );
}

#[test]
fn a_launcher_waiting_for_its_peers_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_udp_port().to_string();
    let flags = node_flags(0, &port, TOKEN, &tmp.path().join("logs"), &[]);
    let mut node0 = Job::start(
        "coca-launch",
        &launcher_flags(&flags, &["--version".to_string()]),
    );
    std::thread::sleep(Duration::from_millis(500));
    node0.signal("-TERM");
    let code = node0.wait(Duration::from_secs(5));
    assert_eq!(code, Some(128 + 15), "{:?}", node0.output());
}

#[test]
fn tensor_parallel_layouts_train_the_same_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let (steps, global_batch) = (4, 8);
    let logs = tmp.path().join("logs");
    let single = tmp.path().join("single");
    let flags = with(
        pretrain_flags(&config, &single, global_batch, steps),
        &["--save_steps", "2"],
    );
    run_alone(&flags);
    let final_of = |dir: &Path| dir.join(format!("checkpoint-{steps}/model.safetensors"));
    let reference_losses = losses(&single);

    // (processes, sharding degree, stage): tp 2 everywhere, dp fills the rest.
    for (world, sharding, stage) in [
        (4, 1, ""),
        (4, 2, "stage1"),
        (4, 2, "stage2"),
        (8, 2, "stage2"),
    ] {
        let what = format!("tp 2 × sharding {sharding} {stage} on {world}");
        let out_dir = tmp.path().join(format!("tp2-{world}-{sharding}{stage}"));
        let data_world = world / 2;
        let mut worker = with(
            pretrain_flags(&config, &out_dir, global_batch / data_world, steps),
            &["--tensor_parallel_degree", "2", "--save_steps", "2"],
        );
        if sharding > 1 {
            worker = with(
                worker,
                &[
                    "--sharding_parallel_degree",
                    &sharding.to_string(),
                    "--sharding",
                    stage,
                ],
            );
        }
        launch_local(world, &worker, &logs);
        assert_same_weights(&final_of(&single), &final_of(&out_dir), 1e-5, &what);
        for (a, b) in reference_losses.iter().zip(&losses(&out_dir)) {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "{what}: loss {b} vs {a}");
        }
    }

    // The GPU's code path on the CPU: flat buffers, AdamW's in-place update and the model's
    // collectives (tensor parallelism, the contrastive gathers with their gradient) on tensors
    // instead of host vectors (`COCA_FLAT_BUFFERS=tensors`, passed on by the launcher).
    let out_dir = tmp.path().join("tp2-device-buffers");
    let worker = with(
        pretrain_flags(&config, &out_dir, global_batch / 2, steps),
        &[
            "--tensor_parallel_degree",
            "2",
            "--gather_with_grad",
            "True",
            "--save_steps",
            "2",
        ],
    );
    let mut job = Job::start_with_env(
        "coca-launch",
        &launcher_flags(
            &["--nproc-per-node", "4", "--log-dir", logs.to_str().unwrap()],
            &worker,
        ),
        &[("COCA_FLAT_BUFFERS", "tensors")],
    );
    let (code, out, err) = job.finish(JOB_LIMIT);
    assert_eq!(code, 0, "{out}\n{err}");
    let what = "tp 2 × dp 2, device-code buffers";
    assert_same_weights(&final_of(&single), &final_of(&out_dir), 1e-5, what);
    assert_same_losses(&single, &out_dir, what);

    // A tensor-parallel (and sharded) checkpoint resumes as one process, and a one-process
    // checkpoint resumes as tp 2 × dp 2.
    let resumed = tmp.path().join("resumed-single");
    let tp_ckpt = tmp.path().join("tp2-4-2stage2/checkpoint-2");
    let flags = with(
        pretrain_flags(&config, &resumed, global_batch, steps),
        &["--resume_from_checkpoint", tp_ckpt.to_str().unwrap()],
    );
    run_alone(&flags);
    assert_same_weights(
        &final_of(&single),
        &final_of(&resumed),
        1e-5,
        "tp2×stage2 → one process",
    );
    let resumed = tmp.path().join("resumed-tp2");
    launch_local(
        4,
        &with(
            pretrain_flags(&config, &resumed, global_batch / 2, steps),
            &[
                "--tensor_parallel_degree",
                "2",
                "--resume_from_checkpoint",
                single.join("checkpoint-2").to_str().unwrap(),
            ],
        ),
        &logs,
    );
    assert_same_weights(
        &final_of(&single),
        &final_of(&resumed),
        1e-5,
        "one process → tp2×dp2",
    );
}

#[test]
fn a_tensor_parallel_degree_that_does_not_split_the_heads_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let worker = with(
        pretrain_flags(&config, &tmp.path().join("run"), 8, 2),
        &["--tensor_parallel_degree", "4"],
    );
    let mut job = Job::start(
        "coca-launch",
        &launcher_flags(
            &[
                "--nproc-per-node",
                "4",
                "--log-dir",
                tmp.path().join("logs").to_str().unwrap(),
            ],
            &worker,
        ),
    );
    let (code, out, err) = job.finish(JOB_LIMIT);
    assert_eq!(code, 2, "{out}\n{err}");
    let all = format!("{out}{err}");
    assert!(all.contains("heads") && all.contains("= 2"), "{all}");
}

#[test]
fn a_hung_worker_is_found_by_its_silence_and_the_job_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut jobs, out_dir) = two_nodes(tmp.path(), &[]);
    wait_for_path(&out_dir.join("metrics.jsonl"), JOB_LIMIT);
    let workers: Vec<u32> = jobs.iter().flat_map(|j| descendants(j.pid())).collect();
    let victim = worker_pid(jobs[1].pid(), 2, Duration::from_secs(5));
    let stopped_at = Instant::now();
    kill(victim, "-STOP");
    let mut stderr = String::new();
    for job in jobs.iter_mut() {
        let code = job.wait(Duration::from_secs(20));
        let (_, err) = job.output();
        assert!(matches!(code, Some(c) if c != 0), "{code:?}\n{err}");
        stderr.push_str(&err);
    }
    // Heartbeat timeout (4 s) + grace period (3 s) + slack.
    let took = stopped_at.elapsed();
    assert!(took <= Duration::from_secs(15), "took {took:?}");
    assert!(
        stderr.contains("rank 2"),
        "the silent rank is named: {stderr}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let left: Vec<u32> = workers.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "workers still running: {left:?}");
}

#[test]
fn gpu_workers_in_a_cpu_build_stop_with_an_error_that_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let worker = pretrain_flags(&config, &tmp.path().join("run"), 8, 2);
    let flags = launcher_flags(
        &[
            "--nproc-per-node",
            "gpu",
            "--log-dir",
            tmp.path().join("logs").to_str().unwrap(),
        ],
        &worker,
    );
    let mut job = Job::start_with_env("coca-launch", &flags, &[("CUDA_VISIBLE_DEVICES", "0,1")]);
    let (code, out, err) = job.finish(JOB_LIMIT);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        format!("{out}{err}").contains("built without CUDA"),
        "{out}\n{err}"
    );
}

/// The zero-shot lines rank 0 logged: (step, top-1).
fn zero_shot_lines(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v["zeroshot_top1"].as_f64()?))
        })
        .collect()
}

#[test]
fn zero_shot_during_training_under_tensor_and_data_parallelism_matches_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::tiny_config(tmp.path());
    let folder = tmp.path().join("colours");
    common::images::write_folder(&folder);
    let eval = [
        "--classification_eval",
        folder.to_str().unwrap(),
        "--eval_steps",
        "2",
    ];
    let single = tmp.path().join("single");
    run_alone(&with(pretrain_flags(&config, &single, 8, 3), &eval));
    let parallel = tmp.path().join("tp2dp2");
    launch_local(
        4,
        &with(
            pretrain_flags(&config, &parallel, 4, 3),
            &[&["--tensor_parallel_degree", "2"][..], &eval[..]].concat(),
        ),
        &tmp.path().join("logs"),
    );
    let expected = zero_shot_lines(&single);
    assert_eq!(expected.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(zero_shot_lines(&parallel), expected);
}
