//! `embed` and `caption` under `coca-launch`: the batches are dealt to the ranks in turn, and
//! rank 0 writes or prints every round's results, equal to what one process gives.

mod common;

use coca_worker::eval::embed::read_npy;

/// `coca-worker ARGS` alone; its standard output.
fn alone(args: &[&str]) -> String {
    let (code, out, err) = common::run("coca-worker", args);
    assert_eq!(code, 0, "{err}");
    out
}

/// `coca-worker ARGS` under `coca-launch` with `ranks` workers, logs in `logs`; its standard
/// output without the launcher's `[rank 0] ` prefixes.
fn launched(args: &[&str], ranks: &str, logs: &str) -> String {
    let mut full = vec!["--nproc-per-node", ranks, "--log-dir", logs, "--"];
    full.extend(args);
    let (code, out, err) = common::run("coca-launch", &full);
    assert_eq!(code, 0, "{out}\n{err}");
    out.lines()
        .map(|l| l.trim_start_matches("[rank 0] "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn three_ranks_embed_and_caption_as_one_process() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs").display().to_string();
    let [model, images] = [dir.clone(), dir.join("images")].map(|p| p.display().to_string());
    // The fixture's five images, one per batch, dealt to three ranks: two rounds, and ranks 0
    // and 1 alone have a batch in the second.
    let embed = |out: &str| {
        let out = tmp.path().join(out).display().to_string();
        [
            "embed",
            "--model",
            &model,
            "--images",
            &images,
            "--out",
            &out,
            "--batch_size",
            "1",
        ]
        .map(String::from)
    };
    let args = embed("alone.npy");
    let out = alone(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("wrote 5 embeddings"), "{out}");
    let args = embed("launched.npy");
    let out = launched(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "3",
        &logs,
    );
    assert_eq!(
        out.matches("wrote 5 embeddings").count(),
        1,
        "rank 0 alone writes: {out}"
    );
    let read = |name: &str| read_npy(&tmp.path().join(name)).unwrap();
    let (one, three) = (read("alone.npy"), read("launched.npy"));
    assert_eq!(one.dim(0).unwrap(), 5);
    assert!(common::max_abs_diff(&one, &three) < 1e-6);
    let paths = |name: &str| std::fs::read_to_string(tmp.path().join(name)).unwrap();
    assert_eq!(paths("alone.paths.txt").lines().count(), 5);
    assert_eq!(paths("alone.paths.txt"), paths("launched.paths.txt"));

    let texts = |out: &str| {
        let out = tmp.path().join(out).display().to_string();
        [
            "embed",
            "--model",
            &model,
            "--batch_size",
            "1",
            "--out",
            &out,
            "--texts",
        ]
        .into_iter()
        .map(String::from)
        .chain(["a cat", "two dogs", "a red circle", "snow"].map(String::from))
        .collect::<Vec<_>>()
    };
    alone(
        &texts("t1.npy")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    launched(
        &texts("t3.npy")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "3",
        &logs,
    );
    let (one, three) = (read("t1.npy"), read("t3.npy"));
    assert_eq!(one.dim(0).unwrap(), 4);
    assert!(common::max_abs_diff(&one, &three) < 1e-6);

    let caption = [
        "caption",
        &images,
        "--model",
        &model,
        "--generation_type",
        "greedy",
        "--seq_len",
        "8",
        "--batch_size",
        "1",
    ];
    let lines = |text: String| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains('\t'))
            .map(str::to_string)
            .collect()
    };
    let one = lines(alone(&caption));
    assert_eq!(one.len(), 5, "{one:?}");
    assert_eq!(one, lines(launched(&caption, "3", &logs)));
}

/// A corrupt image in rank 1's batch: the launcher's summary names rank 1 and the file, and
/// rank 0 writes nothing.
#[test]
fn a_corrupt_image_on_one_rank_stops_the_launched_embedding_with_nothing_written() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("photos");
    std::fs::create_dir_all(&folder).unwrap();
    for name in ["a.jpg", "c.jpg"] {
        std::fs::copy(dir.join("images/chelsea.jpg"), folder.join(name)).unwrap();
    }
    // Sorted second: batch 1, rank 1's.
    std::fs::write(folder.join("b.jpg"), b"\xff\xd8\xff\xe0 not really a JPEG").unwrap();
    let out = tmp.path().join("e.npy");
    let [model, folder, out_arg, logs] =
        [&dir, &folder, &out, &tmp.path().join("logs")].map(|p| p.display().to_string());
    let (code, stdout, stderr) = common::run(
        "coca-launch",
        &[
            "--nproc-per-node",
            "2",
            "--log-dir",
            &logs,
            "--",
            "embed",
            "--model",
            &model,
            "--images",
            &folder,
            "--batch_size",
            "1",
            "--out",
            &out_arg,
        ],
    );
    assert_ne!(code, 0, "{stdout}\n{stderr}");
    let summary = &stderr[stderr.find("first failure").expect("a summary")..];
    assert!(
        summary.contains("cause: rank 1 on node 0") && summary.contains("b.jpg"),
        "{summary}"
    );
    assert!(!out.exists() && !tmp.path().join("e.paths.txt").exists());
}

/// `coca-launch ... caption | head`, its reader gone before the first line: the launcher stops
/// echoing (no panic), the job finishes, and rank 0's captions are all in its log.
#[test]
fn a_closed_output_stops_the_launchers_echo_not_the_job() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    let [model, images, logs_arg] =
        [&dir, &dir.join("images"), &logs].map(|p| p.display().to_string());
    let (code, stderr) = common::run_with_stdout_closed(
        "coca-launch",
        &[
            "--nproc-per-node",
            "2",
            "--log-dir",
            &logs_arg,
            "--",
            "caption",
            &images,
            "--model",
            &model,
            "--seq_len",
            "8",
            "--batch_size",
            "1",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("standard output is closed"), "{stderr}");
    let log = std::fs::read_to_string(logs.join("workerlog.0")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains('\t')).count(), 5, "{log}");
}
