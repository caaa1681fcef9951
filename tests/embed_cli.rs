//! `coca-worker embed`: embeddings written as .safetensors and .npy read back equal to the
//! library's.

mod common;

use coca_worker::eval::embed::{embed_images, embed_texts, read_npy};
use coca_worker::eval::image_batches::ImageBatches;
use std::path::{Path, PathBuf};

/// Three of the fixture's images (one of 10 × 7 pixels), as paths and as arguments.
fn fixture_images(dir: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let images: Vec<PathBuf> = ["astronaut.png", "chelsea.jpg", "tiny_10x7.png"]
        .iter()
        .map(|n| dir.join("images").join(n))
        .collect();
    let args = images.iter().map(|p| p.display().to_string()).collect();
    (images, args)
}

#[test]
fn embeddings_round_trip_through_both_formats() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let model = common::fixture_model(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let model_arg = dir.display().to_string();
    let (images, image_args) = fixture_images(&dir);
    let texts = ["a photo of a cat", "two dogs in the snow", "a red circle"];
    let expected_images = embed_images(&model, &images, &ImageBatches::serial(3)).unwrap();
    let expected_texts = embed_texts(
        &model,
        &texts.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        3,
    )
    .unwrap();
    for ext in ["safetensors", "npy"] {
        for (kind, inputs, expected) in [
            ("--images", &image_args, &expected_images),
            (
                "--texts",
                &texts.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                &expected_texts,
            ),
        ] {
            let out = tmp.path().join(format!("e{kind}.{ext}"));
            let out_arg = out.display().to_string();
            let mut args = vec![
                "embed",
                "--model",
                &model_arg,
                "--out",
                &out_arg,
                "--batch_size",
                "2",
                kind,
            ];
            args.extend(inputs.iter().map(String::as_str));
            let (code, _, stderr) = common::run("coca-worker", &args);
            assert_eq!(code, 0, "{stderr}");
            let got = if ext == "npy" {
                read_npy(&out).unwrap()
            } else {
                common::load(&out)["embeddings"].clone()
            };
            assert_eq!(got.dims(), &[3, model.config.embed_dim]);
            assert!(common::max_abs_diff(&got, expected) < 1e-5, "{kind} {ext}");
            let norms = got.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
            assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-4), "{norms:?}");
        }
    }
    let (code, _, stderr) = common::run(
        "coca-worker",
        &[
            "embed", "--model", &model_arg, "--out", "x.txt", "--texts", "a",
        ],
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("--out"), "{stderr}");
}

/// `--bf16 True` (the seed's flag, as `eval` takes it): the products in bf16, so the
/// embeddings move by bf16's rounding from the float32 ones and no further, still unit length
/// and written in float32; `--fp16 True` as well; both at once are refused.
#[test]
fn half_precision_embeddings_stay_within_their_rounding_of_float32() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let model = common::fixture_model(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let model_arg = dir.display().to_string();
    let (images, image_args) = fixture_images(&dir);
    let float32 = embed_images(&model, &images, &ImageBatches::serial(3)).unwrap();
    for flag in ["--bf16", "--fp16"] {
        let out = tmp.path().join(format!("e{flag}.safetensors"));
        let out_arg = out.display().to_string();
        let mut args = vec![
            "embed", "--model", &model_arg, "--out", &out_arg, flag, "True", "--images",
        ];
        args.extend(image_args.iter().map(String::as_str));
        let (code, _, stderr) = common::run("coca-worker", &args);
        assert_eq!(code, 0, "{stderr}");
        let got = common::load(&out)["embeddings"].clone();
        assert_eq!(got.dtype(), candle_core::DType::F32, "{flag}");
        assert_eq!(got.dims(), float32.dims(), "{flag}");
        let diff = common::max_abs_diff(&got, &float32);
        // Not the float32 numbers (the flag reached the products), within half precision's
        // rounding of them (bf16 keeps 8 significant bits, float16 11).
        let bound = if flag == "--bf16" { 3e-2 } else { 4e-3 };
        assert!(diff > 1e-6 && diff < bound, "{flag}: {diff}");
        let norms = got.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-4), "{norms:?}");
    }
    let out_arg = tmp.path().join("both.npy").display().to_string();
    let (code, _, stderr) = common::run(
        "coca-worker",
        &[
            "embed", "--model", &model_arg, "--out", &out_arg, "--bf16", "True", "--fp16", "True",
            "--texts", "a",
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("choose one"), "{stderr}");
}

/// A file that is not an image, among others decoded ahead of the model on two threads: an
/// error naming that file, and no `--out` written.
#[test]
fn a_corrupt_image_stops_embedding_with_its_name() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let corrupt = tmp.path().join("corrupt.jpg");
    std::fs::write(&corrupt, b"\xff\xd8\xff\xe0 not really a JPEG").unwrap();
    let good = dir.join("images").join("chelsea.jpg").display().to_string();
    let corrupt_arg = corrupt.display().to_string();
    let out = tmp.path().join("e.npy");
    let (model_arg, out_arg) = (dir.display().to_string(), out.display().to_string());
    let (code, _, stderr) = common::run(
        "coca-worker",
        &[
            "embed",
            "--model",
            &model_arg,
            "--out",
            &out_arg,
            "--batch_size",
            "1",
            "--dataloader_num_workers",
            "2",
            "--images",
            &good,
            &good,
            &corrupt_arg,
            &good,
        ],
    );
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("corrupt.jpg"), "{stderr}");
    assert!(!out.exists());
}

/// Images named by a folder (walked in torchvision's order, non-images ignored) and by a list
/// file (relative to its folder), after a single file: one row per image in that order, each
/// equal to the library's embedding of that file, and `OUT.paths.txt` naming each row's image.
/// A folder without images and a missing path are errors before the model loads, with nothing
/// written.
#[test]
fn folders_and_lists_of_images_embed_in_order_with_their_paths() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let model = common::fixture_model(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let fixture = |n: &str| dir.join("images").join(n);
    let folder = tmp.path().join("photos");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    std::fs::copy(fixture("chelsea.jpg"), folder.join("sub/b.jpg")).unwrap();
    std::fs::copy(fixture("tiny_10x7.png"), folder.join("a.PNG")).unwrap();
    std::fs::write(folder.join("notes.txt"), "not an image").unwrap();
    let list = tmp.path().join("lists/more.txt");
    std::fs::create_dir_all(list.parent().unwrap()).unwrap();
    std::fs::copy(fixture("coffee_rgba.png"), tmp.path().join("coffee.png")).unwrap();
    std::fs::write(&list, "../coffee.png\n\n").unwrap();
    let expected_paths = [
        fixture("astronaut.png"),
        folder.join("a.PNG"),
        folder.join("sub/b.jpg"),
        tmp.path().join("lists/../coffee.png"),
    ];
    let expected = embed_images(&model, &expected_paths, &ImageBatches::serial(2)).unwrap();
    let out = tmp.path().join("out/e.npy");
    let [model_arg, out_arg, single, folder_arg, list_arg] =
        [&dir, &out, &fixture("astronaut.png"), &folder, &list].map(|p| p.display().to_string());
    let (code, stdout, stderr) = common::run(
        "coca-worker",
        &[
            "embed",
            "--model",
            &model_arg,
            "--out",
            &out_arg,
            "--batch_size",
            "3",
            "--images",
            &single,
            &folder_arg,
            "--image_list",
            &list_arg,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote 4 embeddings"), "{stdout}");
    let got = read_npy(&out).unwrap();
    assert_eq!(got.dims(), &[4, model.config.embed_dim]);
    assert!(common::max_abs_diff(&got, &expected) < 1e-5);
    let rows = std::fs::read_to_string(tmp.path().join("out/e.paths.txt")).unwrap();
    let names: Vec<String> = expected_paths
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(rows.lines().collect::<Vec<_>>(), names);

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for (bad, message) in [
        (empty.display().to_string(), "holds no image files"),
        (
            tmp.path().join("missing").display().to_string(),
            "no such file or folder",
        ),
    ] {
        let out = tmp.path().join("bad.npy");
        let out_arg = out.display().to_string();
        let (code, _, stderr) = common::run(
            "coca-worker",
            &[
                "embed", "--model", &model_arg, "--out", &out_arg, "--images", &single, &bad,
            ],
        );
        assert_ne!(code, 0, "{stderr}");
        assert!(
            stderr.contains(&bad) && stderr.contains(message),
            "{stderr}"
        );
        assert!(!out.exists() && !tmp.path().join("bad.paths.txt").exists());
    }
}

/// `--text_list`: one row per line (after `--texts`), CRLF line ends included, each equal to the
/// library's embedding of that text; an empty list is an error.
#[test]
fn texts_from_a_list_embed_one_row_per_line() {
    let Some(dir) = common::fixture("coca-tiny") else {
        return;
    };
    let model = common::fixture_model(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let list = tmp.path().join("captions.txt");
    std::fs::write(&list, "a photo of a cat\r\ntwo dogs in the snow\n").unwrap();
    let texts = ["a red circle", "a photo of a cat", "two dogs in the snow"];
    let expected = embed_texts(&model, &texts.map(String::from), 2).unwrap();
    let out = tmp.path().join("t.safetensors");
    let [model_arg, out_arg, list_arg] = [&dir, &out, &list].map(|p| p.display().to_string());
    let args = [
        "embed",
        "--model",
        &model_arg,
        "--out",
        &out_arg,
        "--texts",
        texts[0],
        "--text_list",
        &list_arg,
    ];
    let (code, _, stderr) = common::run("coca-worker", &args);
    assert_eq!(code, 0, "{stderr}");
    let got = common::load(&out)["embeddings"].clone();
    assert_eq!(got.dims(), &[3, model.config.embed_dim]);
    assert!(common::max_abs_diff(&got, &expected) < 1e-5);
    std::fs::write(&list, "").unwrap();
    let (code, _, stderr) = common::run("coca-worker", &[&args[..5], &args[7..]].concat());
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("holds no lines"), "{stderr}");
}
