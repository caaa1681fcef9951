//! Tests of `preprocess`.

use super::*;
use std::path::PathBuf;

fn fixtures() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/coca-tiny");
    if dir.join("extras.safetensors").exists() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: CoCa fixtures not found at {} (shared/ is absent)",
            dir.display()
        );
        None
    }
}

fn load_f32(bytes: &[u8], name: &str) -> (Vec<usize>, Vec<f32>) {
    let tensors = safetensors::SafeTensors::deserialize(bytes).expect("parse extras");
    let t = tensors.tensor(name).expect("tensor present");
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name} dtype");
    let data = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    (t.shape().to_vec(), data)
}

const IMAGES: [&str; 5] = [
    "astronaut.png",
    "camera_gray.png",
    "chelsea.jpg",
    "coffee_rgba.png",
    "tiny_10x7.png",
];

#[test]
fn eval_matches_open_clip_fixture() {
    let Some(dir) = fixtures() else { return };
    let bytes = std::fs::read(dir.join("extras.safetensors")).expect("read extras");
    let mut report = Vec::new();
    let mut worst: f32 = 0.0;
    for size in [224usize, 32] {
        let (shape, want) = load_f32(&bytes, &format!("preprocess.{size}"));
        assert_eq!(shape, vec![5, 3, size, size]);
        let n = 3 * size * size;
        for (i, name) in IMAGES.iter().enumerate() {
            let img = open_image(&dir.join("images").join(name)).expect("load fixture image");
            let got = img.eval_transform(size);
            assert_eq!(got.len(), n);
            let want = &want[i * n..(i + 1) * n];
            let mean_abs = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                / n as f32;
            let max_abs = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            report.push(format!(
                "{size} {name}: mean abs {mean_abs:.2e}, max abs {max_abs:.2e}"
            ));
            worst = worst.max(mean_abs);
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        worst < 0.01,
        "preprocessing differs:\n{}",
        report.join("\n")
    );
}

fn rgb_gradient(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x + y) * 3 % 256) as u8,
        ])
    }))
}

#[test]
fn train_transform_is_keyed_by_seed_epoch_and_index() {
    let img = rgb_gradient(90, 80);
    let a = train_transform(&img, 32, 7, 2, 1234);
    assert_eq!(a.len(), 3 * 32 * 32);
    // Same key, same pixels, whichever thread computes it.
    let b = std::thread::spawn({
        let img = img.clone();
        move || train_transform(&img, 32, 7, 2, 1234)
    })
    .join()
    .expect("thread");
    assert_eq!(a, b);
    // Any change of the key changes the crop.
    assert_ne!(a, train_transform(&img, 32, 7, 2, 1235));
    assert_ne!(a, train_transform(&img, 32, 7, 3, 1234));
    assert_ne!(a, train_transform(&img, 32, 8, 2, 1234));
}

#[test]
fn random_resized_crop_stays_in_bounds_and_in_range() {
    let mut distinct = std::collections::HashSet::new();
    for (w, h) in [
        (100usize, 90usize),
        (97, 61),
        (10, 7),
        (1, 1),
        (500, 20),
        (20, 500),
    ] {
        for i in 0..200 {
            let mut rng = SampleRng::new(1, 0, i);
            let r = random_resized_crop_params(w, h, TRAIN_SCALE, TRAIN_RATIO, &mut rng);
            assert!(r.width >= 1 && r.height >= 1, "{r:?}");
            assert!(
                r.x0 + r.width <= w && r.y0 + r.height <= h,
                "{w}x{h}: {r:?}"
            );
            if (w, h) == (100, 90) {
                // Near-square: a draw fits, so the area is 90-100 % up to rounding.
                let frac = (r.width * r.height) as f64 / (w * h) as f64;
                assert!((0.88..=1.0).contains(&frac), "area fraction {frac}");
                distinct.insert((r.x0, r.y0, r.width, r.height));
            }
            if (w, h) == (97, 61) {
                // Wider than 4:3 with at least 90 % of the area never fits: centre fallback
                // clamped to 4:3, i.e. round(61 * 4 / 3) = 81 wide.
                assert_eq!(
                    r,
                    Region {
                        x0: 8,
                        y0: 0,
                        width: 81,
                        height: 61
                    }
                );
            }
        }
    }
    assert!(distinct.len() > 50, "crops barely vary: {}", distinct.len());
    // Extreme aspect: the fallback clamps to the ratio range and centres.
    let mut rng = SampleRng::new(0, 0, 0);
    let r = random_resized_crop_params(500, 20, TRAIN_SCALE, TRAIN_RATIO, &mut rng);
    assert_eq!((r.width, r.height), (27, 20));
    assert_eq!((r.x0, r.y0), ((500 - 27) / 2, 0));
}

#[test]
fn eval_sizes_and_crop_follow_torchvision() {
    // A 3x1 image whose middle column is white: at size 1 the shorter side (1) is kept, the
    // longer stays 3 (int(1 * 3 / 1)), and the centre crop starts at round(1.0) = 1.
    let img =
        DynamicImage::ImageLuma8(image::GrayImage::from_raw(3, 1, vec![0, 255, 0]).expect("raw"));
    let v = eval_transform(&img, 1);
    let want = (1.0 - OPENAI_MEAN[0]) / OPENAI_STD[0];
    assert!((v[0] - want).abs() < 1e-6, "{v:?}");
    // Python rounds the crop offset half to even: (5 - 4) / 2 = 0.5 -> 0.
    let img = DynamicImage::ImageLuma8(image::GrayImage::from_fn(5, 4, |x, _| {
        image::Luma([if x == 0 { 255 } else { 0 }])
    }));
    let v = eval_transform(&img, 4);
    assert!(v[0] > 1.0, "column 0 must be kept: {}", v[0]);
}

#[test]
fn rgba_is_resized_premultiplied_then_alpha_dropped() {
    // Left half opaque red, right half fully transparent "green": PIL never lets the hidden
    // green bleed into the edge, and fully transparent pixels come out black.
    let img = DynamicImage::ImageRgba8(image::RgbaImage::from_fn(8, 8, |x, _| {
        if x < 4 {
            image::Rgba([255, 0, 0, 255])
        } else {
            image::Rgba([0, 255, 0, 0])
        }
    }));
    let v = eval_transform(&img, 4);
    let green = &v[16..32];
    let zero_g = (0.0 - OPENAI_MEAN[1]) / OPENAI_STD[1];
    assert!(
        green.iter().all(|&g| (g - zero_g).abs() < 1e-6),
        "{green:?}"
    );
}

#[test]
fn nearest_for_palette_images() {
    let img = rgb_gradient(10, 10);
    let a = eval_transform_with(&img, 5, Resample::Nearest);
    // Nearest picks source pixels 1, 3, 5, 7, 9 in each direction.
    let r = |x: u32| (x * 7 % 256) as f32 / 255.0;
    for (i, sx) in [1u32, 3, 5, 7, 9].iter().enumerate() {
        let want = (r(*sx) - OPENAI_MEAN[0]) / OPENAI_STD[0];
        assert!((a[i] - want).abs() < 1e-6);
    }
    assert_ne!(a, eval_transform(&img, 5));
}

#[test]
fn sixteen_bit_gray_is_clipped_like_pil() {
    let img = DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(4, 4, |x, _| {
        image::Luma([if x < 2 { 100u16 } else { 40_000 }])
    }));
    let v = eval_transform(&img, 4);
    let expect = |p: f32| (p / 255.0 - OPENAI_MEAN[0]) / OPENAI_STD[0];
    assert!((v[0] - expect(100.0)).abs() < 1e-6);
    assert!((v[3] - expect(255.0)).abs() < 1e-6);
}

#[test]
fn corrupt_and_truncated_files_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut png = Vec::new();
    rgb_gradient(64, 48)
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .expect("encode png");
    let mut jpg = Vec::new();
    rgb_gradient(64, 48)
        .write_to(&mut Cursor::new(&mut jpg), ImageFormat::Jpeg)
        .expect("encode jpeg");
    assert!(decode_image(&png).is_ok());
    assert!(decode_image(&jpg).is_ok());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.png", Vec::new()),
        ("garbage.png", b"not an image at all".to_vec()),
        ("truncated.png", png[..png.len() / 2].to_vec()),
        ("header_only.png", png[..40].to_vec()),
        ("truncated.jpg", jpg[..jpg.len() / 2].to_vec()),
        ("header_only.jpg", jpg[..20].to_vec()),
        ("bad_body.png", {
            let mut b = png.clone();
            let mid = b.len() / 2;
            b[mid..mid + 16].fill(0xAB);
            b
        }),
    ];
    for (name, data) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, &data).expect("write");
        let err = load_image(&path).expect_err(name);
        let message = format!("{err:#}");
        assert!(
            message.contains(name),
            "error must name the file: {message}"
        );
        // One line, each clause once (the decoders' own messages quote their causes).
        assert!(!message.contains('\n'), "{message:?}");
        let clauses: Vec<&str> = message.split(": ").collect();
        let distinct: std::collections::HashSet<&str> = clauses.iter().copied().collect();
        assert_eq!(distinct.len(), clauses.len(), "{message:?}");
    }
    let missing = dir.path().join("missing.png");
    let err = load_image(&missing).expect_err("missing file");
    assert!(format!("{err:#}").contains("missing.png"));
}
