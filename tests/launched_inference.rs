//! `embed` and `caption` under `coca-launch`: each rank takes one block of the images, and rank 0
//! writes or prints them all, equal to what one process gives.

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
    // The fixture's five images over three ranks: blocks of 2, 2 and 1.
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
            "2",
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
        "2",
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
