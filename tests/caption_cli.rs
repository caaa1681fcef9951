//! `coca-worker caption` on the fixture images with the coca-tiny reference weights.

mod common;

use coca_worker::eval::caption::caption_files;
use coca_worker::eval::generate::{DecodePrecision, GenerateOptions, GenerationType};
use coca_worker::eval::image_batches::ImageBatches;
use std::path::PathBuf;

#[test]
fn caption_prints_what_the_library_generates() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let Some(_) = common::fixture("coca-tiny/extras.json") else {
        return;
    };
    let names = [
        "astronaut.png",
        "camera_gray.png",
        "chelsea.jpg",
        "coffee_rgba.png",
        "tiny_10x7.png",
    ];
    let paths: Vec<String> = names
        .iter()
        .map(|n| dir.join("images").join(n).display().to_string())
        .collect();
    // The library's captions match open_clip token for token on the reference's preprocessed
    // pixels (tests/generate.rs); here the pixels come from our own eval transform, which may
    // differ by rounding, so the binary is compared with the library on the same files.
    let lib_model = common::fixture_model(&dir);
    let files: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
    let model = dir.display().to_string();
    // The same five images named three ways: as files, as their folder (whose sorted order is
    // theirs), and as a list file of absolute paths.
    let tmp = tempfile::tempdir().unwrap();
    let list = tmp.path().join("images.txt");
    std::fs::write(&list, paths.join("\n")).unwrap();
    let folder = dir.join("images").display().to_string();
    let list = list.display().to_string();
    let as_files: Vec<&str> = paths.iter().map(String::as_str).collect();
    for (inputs, generation_type, kind, precision, decode_precision) in [
        (
            as_files,
            "beam_search",
            GenerationType::BeamSearch,
            "fp32",
            DecodePrecision::F32,
        ),
        (
            vec![folder.as_str()],
            "greedy",
            GenerationType::Greedy,
            "fp32",
            DecodePrecision::F32,
        ),
        (
            vec!["--image_list", list.as_str()],
            "beam_search",
            GenerationType::BeamSearch,
            "bf16",
            DecodePrecision::Bf16,
        ),
    ] {
        let mut args = inputs;
        args.extend([
            "--model",
            &model,
            "--generation_type",
            generation_type,
            "--seq_len",
            "15",
            "--min-seq-len",
            "5",
            "--batch_size",
            "2",
            "--decode_precision",
            precision,
        ]);
        let mut full = vec!["caption"];
        full.extend(args);
        let (code, stdout, stderr) = common::run("coca-worker", &full);
        assert_eq!(code, 0, "{stderr}");
        let opts = GenerateOptions {
            generation_type: kind,
            seq_len: 15,
            min_seq_len: 5,
            decode_precision,
            ..GenerateOptions::default()
        };
        let expected = caption_files(&lib_model, &files, &opts, &ImageBatches::serial(5)).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), names.len(), "{stdout}");
        for ((line, path), caption) in lines.iter().zip(&paths).zip(&expected) {
            assert!(!caption.is_empty());
            assert_eq!(
                *line,
                format!("{path}\t{caption}"),
                "{generation_type} {precision}"
            );
        }
    }
}

#[test]
fn long_runs_on_huge_pages_caption_as_short_ones() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let model = common::fixture_model(&dir);
    let images: Vec<PathBuf> = ["astronaut.png", "chelsea.jpg", "camera_gray.png"]
        .iter()
        .map(|n| dir.join("images").join(n))
        .collect();
    let opts = GenerateOptions {
        generation_type: GenerationType::Greedy,
        seq_len: 12,
        ..GenerateOptions::default()
    };
    // Three batches keep the weights where they are; 16 move them onto huge pages first.
    let short = caption_files(&model, &images, &opts, &ImageBatches::serial(1)).unwrap();
    let many: Vec<PathBuf> = images.iter().cycle().take(16).cloned().collect();
    let long = caption_files(&model, &many, &opts, &ImageBatches::serial(1)).unwrap();
    assert_eq!(long.len(), 16);
    for (i, caption) in long.iter().enumerate() {
        assert_eq!(caption, &short[i % 3], "image {i}");
    }
}

/// `coca-worker caption ARGS...` exits 2 with `expected` in its error.
fn assert_usage_error(args: &[&str], expected: &str) {
    let mut full = vec!["caption"];
    full.extend(args);
    let (code, _, stderr) = common::run("coca-worker", &full);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
}

#[test]
fn caption_errors_name_the_file_and_flag() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let model = dir.display().to_string();
    assert_usage_error(
        &["/nonexistent/x.png", "--model", &model],
        "/nonexistent/x.png",
    );
    let image = dir.join("images/chelsea.jpg").display().to_string();
    assert_usage_error(
        &[
            &image,
            "--model",
            &model,
            "--seq_len",
            "4",
            "--min_seq_len",
            "5",
        ],
        "--seq_len",
    );
    assert_usage_error(
        &[&image, "--model", &model, "--decode_precision", "fp16"],
        "expected fp32 or bf16",
    );
}

/// A reader that closes the output (`caption DIR | head`, here before the first line): the
/// command stops with 141, as a shell reports a program a closed pipe ended, and no panic.
#[test]
fn a_closed_output_stops_caption_quietly() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let [model, images] = [dir.clone(), dir.join("images")].map(|p| p.display().to_string());
    let (code, stderr) = common::run_with_stdout_closed(
        "coca-worker",
        &[
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
    assert_eq!(code, 141, "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("error"),
        "{stderr}"
    );
}
