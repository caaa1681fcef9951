//! Tests of `tokenizer`.

use super::*;
use std::path::{Path, PathBuf};

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

fn load_i64(tensors: &safetensors::SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<i64>) {
    let t = tensors.tensor(name).expect("tensor present");
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name} dtype");
    let data = t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    (t.shape().to_vec(), data)
}

#[test]
fn matches_open_clip_fixture() {
    let Some(dir) = fixtures() else { return };
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("extras.json")).expect("read extras.json"))
            .expect("parse extras.json");
    let strings: Vec<&str> = json["tokenizer_strings"]
        .as_array()
        .expect("tokenizer_strings")
        .iter()
        .map(|v| v.as_str().expect("string"))
        .collect();
    let bytes = std::fs::read(dir.join("extras.safetensors")).expect("read extras");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("parse extras");
    let tok = ClipTokenizer::new().expect("tokenizer");
    let mut failures = Vec::new();
    for (name, ctx) in [("tokenizer.ids_77", 77), ("tokenizer.ids_model_ctx", 16)] {
        let (shape, want) = load_i64(&tensors, name);
        assert_eq!(shape, vec![strings.len(), ctx], "{name} shape");
        let batch = tok.tokenize_batch(&strings, ctx);
        for (i, (s, got)) in strings.iter().zip(&batch).enumerate() {
            let want_row: Vec<u32> = want[i * ctx..(i + 1) * ctx]
                .iter()
                .map(|&v| u32::try_from(v).expect("id fits u32"))
                .collect();
            if *got != want_row {
                failures.push(format!("{name}[{i}] {s:?}: got {got:?}, want {want_row:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}

#[test]
fn known_ids_and_padding() {
    let tok = ClipTokenizer::new().expect("tokenizer");
    assert_eq!(
        tok.encode("a photo of a cat"),
        vec![320, 1125, 539, 320, 2368]
    );
    assert_eq!(
        tok.tokenize("a photo of a cat", 8),
        vec![SOT, 320, 1125, 539, 320, 2368, EOT, PAD]
    );
    // Truncation keeps EOT last.
    assert_eq!(
        tok.tokenize("a photo of a cat", 4),
        vec![SOT, 320, 1125, EOT]
    );
    assert_eq!(tok.tokenize("", 4), vec![SOT, EOT, PAD, PAD]);
    assert_eq!(tok.tokenize("a", 1), vec![EOT]);
    assert!(tok.tokenize("a", 0).is_empty());
    assert_eq!(tok.vocab_size(), 49408);
}

#[test]
fn cleaning_follows_open_clip() {
    // html.unescape twice after ftfy's own unescaping, whitespace collapse, lower-case.
    assert_eq!(
        clean_text("&lt;b&gt;Bold&lt;/b&gt;  text &amp;amp; more"),
        "<b>bold</b> text & more"
    );
    // ftfy: curly quotes, ligatures, full-width forms, NFC.
    assert_eq!(clean_text("it&#x2019;s ﬂuffy"), "it's fluffy");
    assert_eq!(clean_text("ＬＯＵＤ　ＮＯＩＳＥＳ"), "loud noises");
    assert_eq!(clean_text("cafe\u{301}"), "caf\u{e9}");
    assert_eq!(clean_text("P&EACUTE;REZ"), "pérez");
    // No semicolon: only html.unescape's longest-prefix rule applies.
    assert_eq!(clean_text("&ampx &notit;"), "&x ¬it;");
    // Python whitespace includes U+001C..U+001F; control characters are removed.
    assert_eq!(clean_text("\u{1c}a\u{1f}\u{3000}b\u{7}c\r\n"), "a bc");
    assert_eq!(clean_text("\u{1b}[36;44mblue\u{1b}[0m"), "blue");
    // Numeric references: Windows-1252 remap, invalid code points.
    assert_eq!(clean_text("&#128;&#0;&#xD800;&#1;x"), "€\u{fffd}\u{fffd}x");
}

#[test]
fn mojibake_is_repaired_like_ftfy() {
    // Reference values from open_clip 3.3.0 (`_clean_lower` and `encode`).
    let cases = [
        ("âœ” No problems", "✔ no problems"),
        ("sÃ³", "só"),
        ("voilÃ le travail", "voilà le travail"),
        ("â€œ like this â€\u{fffd}", "\" like this \u{fffd}"),
        ("Ã  la mode", "à la mode"),
        ("Ð¿Ñ€Ð¸Ð²ÐµÑ‚", "привет"),
        (
            "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t have eyebrows.",
            "the mona lisa doesn't have eyebrows.",
        ),
        ("Ãœber", "über"),
        // Sound text with some of the same characters is left alone.
        ("Über 2½ °C – naïve, ½ × 3", "über 2½ °c – naïve, ½ × 3"),
    ];
    for (input, want) in cases {
        assert_eq!(clean_text(input), want, "{input:?}");
    }
    let tok = ClipTokenizer::new().expect("tokenizer");
    assert_eq!(tok.encode("cafÃ© crÃ¨me"), vec![15304, 1075, 12138, 614]);
}

#[test]
fn long_s_and_ypogegrammeni_follow_the_case_insensitive_regex() {
    let tok = ClipTokenizer::new().expect("tokenizer");
    // Reference ids from open_clip 3.3.0 (regex with re.IGNORECASE).
    assert_eq!(tok.encode("'ſ"), vec![6, 129, 379]);
    assert_eq!(tok.encode("'ſt"), vec![6, 129, 379, 339]);
    assert_eq!(tok.encode("a\u{345}b"), vec![320, 321]);
    assert_eq!(
        tok.encode("<ſtart_of_text>"),
        vec![27, 129, 123, 16707, 62, 684, 62, 18169, 285]
    );
    assert_eq!(tok.encode("x <start_of_text>"), vec![343, SOT]);
}

#[test]
fn decode_round_trips_and_stops_at_eot() {
    let tok = ClipTokenizer::new().expect("tokenizer");
    let ids = tok.tokenize("Hello, world! 一只猫 😀", 20);
    assert_eq!(tok.decode(&ids), "hello , world ! 一只猫 😀 ");
    assert!(tok.decode_raw(&ids).starts_with("<start_of_text>hello"));
    let pads = ids.iter().rev().take_while(|&&i| i == PAD).count();
    assert!(pads > 0);
    let raw = tok.decode_raw(&ids);
    assert!(
        raw.ends_with(&format!("<end_of_text>{}", "!".repeat(pads))),
        "{raw:?}"
    );
    // A half-emitted UTF-8 sequence becomes U+FFFD rather than an error; bad ids are skipped.
    // (id 172 is the lone byte 0xF0, the first byte of a 4-byte sequence).
    assert_eq!(tok.decode(&[320, 172, 2368]), "a \u{fffd}cat ");
    assert_eq!(tok.decode(&[SOT, 320, 99_999, 2368, EOT, 320]), "a cat ");
}

#[test]
fn clones_share_and_work_across_threads() {
    let tok = ClipTokenizer::new().expect("tokenizer");
    let want = tok.tokenize("two dogs playing in the snow", 77);
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let t = tok.clone();
            std::thread::spawn(move || t.tokenize("two dogs playing in the snow", 77))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().expect("thread"), want);
    }
}
