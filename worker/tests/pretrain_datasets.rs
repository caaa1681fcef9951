//! `coca-worker pretrain` on data sets read from disk, end to end through the binary: a
//! COCO Karpathy layout under `--data_root`, a custom JSON, LAION part files and webdataset
//! shards, each with a bad record that must be skipped, and data sets that yield nothing.

use base64::Engine as _;
use std::io::Write;
use std::path::Path;
use std::process::Command;

/// A small config that trains in seconds on 32×32 images.
const TINY_CONFIG: &str = r#"{
  "embed_dim": 32,
  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                 "attentional_pool": true, "attn_pooler_queries": 5, "attn_pooler_heads": 2,
                 "output_tokens": true},
  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
               "embed_cls": true, "output_tokens": true},
  "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1, "attn_pooler_heads": 2},
  "custom_text": true
}"#;

const CAPTIONS: [&str; 6] = [
    "a red square on a white wall",
    "two green circles",
    "a blue sky over a field",
    "a yellow car parked outside",
    "a black cat on a sofa",
    "an orange kite in the air",
];

fn png(i: usize) -> Vec<u8> {
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(40, 36, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 7) as u8, (i * 40) as u8])
    }))
    .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
    .unwrap();
    out
}

/// Runs `coca-worker pretrain` with the tiny model for 2 steps of batch 4 into `out`.
fn pretrain(dir: &Path, out: &Path, data_flags: &[&str]) -> (i32, String) {
    let config = dir.join("tiny.json");
    std::fs::write(&config, TINY_CONFIG).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_coca-worker"))
        .args([
            "pretrain",
            "--disable_tqdm",
            "True",
            "--model",
            config.to_str().unwrap(),
            "--max_steps",
            "2",
            "--logging_steps",
            "1",
            "--per_device_train_batch_size",
            "4",
            "--dataloader_num_workers",
            "1",
            "--output_dir",
            out.to_str().unwrap(),
        ])
        .args(data_flags)
        .env_remove("WORLD_SIZE")
        .env_remove("RUST_LOG")
        .output()
        .expect("run coca-worker");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

fn steps_logged(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count()
}

#[test]
fn coco_karpathy_under_data_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("coco");
    std::fs::create_dir_all(root.join("images/train2014")).unwrap();
    std::fs::create_dir_all(root.join("annotations")).unwrap();
    let mut records = Vec::new();
    for (i, caption) in CAPTIONS.iter().enumerate() {
        let name = format!("train2014/{i}.png");
        std::fs::write(root.join("images").join(&name), png(i)).unwrap();
        records.push(serde_json::json!({"caption": caption, "image": name, "image_id": i}));
    }
    records.push(
        serde_json::json!({"caption": "gone", "image": "train2014/missing.png", "image_id": 7}),
    );
    records.push(serde_json::json!({"caption": "", "image": "train2014/0.png", "image_id": 0}));
    std::fs::write(
        root.join("annotations/coco_karpathy_train.json"),
        serde_json::to_vec(&records).unwrap(),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let (code, text) = pretrain(
        tmp.path(),
        &out,
        &[
            "--task_name",
            "coco_karpathy",
            "--data_root",
            root.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(steps_logged(&out), 2);
    assert!(out.join("checkpoint-2/model.safetensors").is_file());
    assert!(
        text.contains("coco_karpathy_train.json[7]") && text.contains("empty caption"),
        "{text}"
    );
    assert!(text.contains("data        COCO Karpathy train"), "{text}");

    // The same records as a custom JSON beside the images: paths relative to its folder.
    let custom = root.join("images/custom.json");
    std::fs::write(&custom, serde_json::to_vec(&records).unwrap()).unwrap();
    let out = tmp.path().join("custom");
    let (code, text) = pretrain(tmp.path(), &out, &["--task_name", custom.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(steps_logged(&out), 2);
}

#[test]
fn laion_parts_and_webdataset_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    // LAION: a gzip part and a plain part with a malformed line, listed relative to the list.
    let mut lines = Vec::new();
    for (i, caption) in CAPTIONS.iter().enumerate() {
        lines.push(format!(
            "{i}\t{}\turl\t0.3\t{}\n",
            serde_json::json!({"caption_en": caption}),
            b64.encode(png(i))
        ));
    }
    lines.insert(2, "not\ta valid line\n".to_string());
    std::fs::create_dir_all(tmp.path().join("laion")).unwrap();
    std::fs::write(tmp.path().join("laion/part-0.tsv"), lines[..4].concat()).unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(tmp.path().join("laion/part-1.gz")).unwrap(),
        flate2::Compression::fast(),
    );
    gz.write_all(lines[4..].concat().as_bytes()).unwrap();
    gz.finish().unwrap();
    let list = tmp.path().join("laion/filelist");
    std::fs::write(&list, "part-0.tsv\npart-1.gz\n").unwrap();
    let out = tmp.path().join("laion-run");
    let (code, text) = pretrain(tmp.path(), &out, &["--task_name", list.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(steps_logged(&out), 2);
    assert!(text.contains("part-0.tsv:3: expected at least 5"), "{text}");

    // webdataset: two shards by brace pattern, one orphan image.
    let shards = tmp.path().join("wds");
    std::fs::create_dir_all(&shards).unwrap();
    for s in 0..2 {
        let mut tar = tar::Builder::new(
            std::fs::File::create(shards.join(format!("shard-{s:02}.tar"))).unwrap(),
        );
        let mut add = |name: String, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, data).unwrap();
        };
        for i in 0..3 {
            let k = s * 3 + i;
            add(format!("{k:04}.png"), &png(k));
            add(format!("{k:04}.txt"), CAPTIONS[k].as_bytes());
        }
        add(format!("orphan{s}.png"), &png(0));
        tar.finish().unwrap();
    }
    let pattern = format!("{}/shard-{{00..01}}.tar", shards.display());
    let out = tmp.path().join("wds-run");
    let (code, text) = pretrain(tmp.path(), &out, &["--task_name", &pattern]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(steps_logged(&out), 2);
    assert!(
        text.contains("shard-01.tar:orphan1.png: no caption"),
        "{text}"
    );
    // A directory of shards is the same data set.
    let out = tmp.path().join("wds-dir");
    let (code, text) = pretrain(tmp.path(), &out, &["--task_name", shards.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn data_sets_that_yield_nothing_fail_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    // Every image missing.
    let file = tmp.path().join("captions.json");
    let records: Vec<_> = CAPTIONS
        .iter()
        .enumerate()
        .map(|(i, c)| serde_json::json!({"caption": c, "image": format!("{i}.png"), "image_id": i}))
        .collect();
    std::fs::write(&file, serde_json::to_vec(&records).unwrap()).unwrap();
    let (code, text) = pretrain(
        tmp.path(),
        &tmp.path().join("a"),
        &["--task_name", file.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("yields no usable sample") && text.contains("0.png"),
        "{text}"
    );
    // An empty file list, and a name that is neither built in nor a file.
    let list = tmp.path().join("empty.txt");
    std::fs::write(&list, "\n").unwrap();
    let (code, text) = pretrain(
        tmp.path(),
        &tmp.path().join("b"),
        &["--task_name", list.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("names no files"), "{text}");
    let (code, text) = pretrain(
        tmp.path(),
        &tmp.path().join("c"),
        &["--task_name", "laion_nope"],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("not a built-in data set"), "{text}");
    // coco_karpathy without its files: where to put them.
    let (code, text) = pretrain(
        tmp.path(),
        &tmp.path().join("d"),
        &[
            "--task_name",
            "coco_karpathy",
            "--data_root",
            tmp.path().join("nowhere").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("coco_karpathy_train.json") && text.contains("nothing is downloaded"),
        "{text}"
    );
}
