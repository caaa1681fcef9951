//! OpenAI's CLIP byte-level BPE tokenizer, exactly as open_clip 3.3.0's `SimpleTokenizer`.
//!
//! The text goes through open_clip's `_clean_lower`: `ftfy.fix_text`, `html.unescape` twice,
//! strip, whitespace collapse, lower-case. It is then split with the CLIP regex (case-insensitive,
//! as open_clip compiles it) and each piece is byte-level BPE encoded with a `</w>` end-of-word
//! marker. [`ClipTokenizer::tokenize`] adds `<start_of_text>` (49406) and `<end_of_text>` (49407),
//! truncates keeping 49407 last, and zero-pads to the context length.
//!
//! # Where the vocabulary and the BPE come from
//!
//! The merges are OpenAI's `bpe_simple_vocab_16e6.txt`, compiled into the binary by the
//! [`instant_clip_tokenizer`] crate (crates.io; no download at build or run time). That crate is
//! also the BPE engine: it builds the same 49,408-entry vocabulary as open_clip (the 512 byte
//! symbols, the first 48,894 merges, then the two specials) and applies merges lowest rank
//! first, left to right, as `SimpleTokenizer.bpe` does, on pre-computed integer pairs with no
//! per-word string allocation. The `tokenizers` crate could run the same BPE but ships no
//! vocabulary (it would still need this file) and is a much larger dependency, with its own
//! pre-tokenizer that would have to be disabled; `instant_clip_tokenizer` is both the data source
//! and the faster engine here.
//!
//! What `instant_clip_tokenizer` does *not* do is open_clip's text cleaning, and it splits words
//! with the CLIP regex compiled case-sensitively. Both are handled in this module:
//! * the cleaning is ported below (`clean_text`);
//! * on lower-cased text the case-insensitive regex differs from the case-sensitive one in
//!   exactly two ways (checked over every code point): U+0345 COMBINING GREEK YPOGEGRAMMENI is
//!   matched by no alternative (so it acts as a separator and is dropped, like whitespace), and
//!   `ſ` (U+017F, which case-folds to `s`) matches the `s` of `'s` and of `<start_of_text>`.
//!   U+0345 is replaced by a space, and the two `ſ` words are given their BPE ids directly.
//!
//! # ftfy coverage
//!
//! `ftfy.fix_text` (6.3, default settings) is ported step for step: per-line segments with the
//! "auto" HTML-unescape rule, ftfy's own entity decoding (including upper-cased names such as
//! `&NTILDE;`), mojibake repair (`fix_encoding`: the "badness" heuristic, re-encoding through
//! its ten single-byte codecs including the "sloppy" Windows ones, `restore_byte_a0`,
//! `replace_lossy_sequences`, the CESU-8/Java UTF-8 variants, `decode_inconsistent_utf8`), C1
//! controls read as Windows-1252, Latin ligatures, full-/half-width forms, curly quotes, line
//! breaks, terminal escapes, control characters and NFC, all repeated to a fixed point. ftfy's
//! regexes and code tables are generated from ftfy 6.3.1 (see the generated section below).
//!
//! Checked against open_clip 3.3.0 (ftfy 6.3.1, regex 2026.11) on 24k adversarial strings
//! (entities, controls, every code point below U+3000 and a sample above) and 8k mojibake strings
//! (6k of which ftfy repairs): ids are identical except where a code point is unassigned in
//! Python's Unicode tables but assigned in Rust's (newer Unicode: e.g. U+0558, U+1C89, CJK
//! extension H/J), which Python does not treat as a letter.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use instant_clip_tokenizer::{Token, Tokenizer};
use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// `<start_of_text>`: the first token of every tokenized text.
pub const SOT: u32 = 49406;
/// `<end_of_text>`: the last real token of every tokenized text (kept through truncation).
pub const EOT: u32 = 49407;
/// Padding id after `<end_of_text>` (it is also the id of `!`; open_clip pads with zeros).
pub const PAD: u32 = 0;
/// Vocabulary size: 256 byte symbols, their 256 `</w>` forms, 48,894 merges and 2 specials.
pub const VOCAB_SIZE: usize = 49408;
/// open_clip's default context length for CLIP text towers.
pub const DEFAULT_CONTEXT_LENGTH: usize = 77;

/// The CLIP tokenizer; cheap to clone or share across threads.
///
/// Building one parses the 49k merges (tens of milliseconds); build it once and clone it.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    bpe: Tokenizer,
    /// The CLIP regex with the only two case-insensitive matches that survive lower-casing.
    words: Regex,
}

/// BPE of the word `'ſ` (the contraction alternative `'s` matches it case-insensitively).
const APOSTROPHE_LONG_S: [u32; 3] = [6, 129, 379];
/// BPE of the word `<ſtart_of_text>` (matched by the special-token alternative, but not the
/// special token itself, so open_clip BPE-encodes it as one word).
const LONG_S_START_OF_TEXT: [u32; 9] = [27, 129, 123, 16707, 62, 684, 62, 18169, 285];

impl ClipTokenizer {
    /// Builds the tokenizer from the vocabulary bundled with `instant_clip_tokenizer`.
    pub fn new() -> Result<Self> {
        let bpe = Tokenizer::new();
        anyhow::ensure!(
            bpe.start_of_text().to_u16() as u32 == SOT && bpe.end_of_text().to_u16() as u32 == EOT,
            "bundled CLIP vocabulary has unexpected special ids {} / {}",
            bpe.start_of_text().to_u16(),
            bpe.end_of_text().to_u16()
        );
        let words = Regex::new(
            r"<start_of_text>|<end_of_text>|<ſtart_of_text>|'s|'ſ|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .context("compiling the CLIP word-split regex")?;
        Ok(Self {
            inner: Arc::new(Inner { bpe, words }),
        })
    }

    /// BPE ids of `text` after open_clip's cleaning, without `<start_of_text>`/`<end_of_text>`
    /// (open_clip's `SimpleTokenizer.encode`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = clean_text(text);
        let mut tokens: Vec<Token> = Vec::with_capacity(cleaned.len() / 3 + 4);
        let mut ids = Vec::new();
        if !cleaned.contains('ſ') {
            // Without `ſ` the case-sensitive split of `instant_clip_tokenizer` is the same as
            // open_clip's, so the whole text can go through in one call.
            self.inner.bpe.encode(&cleaned, &mut tokens);
            ids.extend(tokens.iter().map(|t| u32::from(t.to_u16())));
            return ids;
        }
        for word in self.inner.words.find_iter(&cleaned) {
            match word.as_str() {
                "'ſ" => ids.extend_from_slice(&APOSTROPHE_LONG_S),
                "<ſtart_of_text>" => ids.extend_from_slice(&LONG_S_START_OF_TEXT),
                w => {
                    // Any other match is a single match of the case-sensitive regex too.
                    tokens.clear();
                    self.inner.bpe.encode(w, &mut tokens);
                    ids.extend(tokens.iter().map(|t| u32::from(t.to_u16())));
                }
            }
        }
        ids
    }

    /// `[SOT] + encode(text) + [EOT]`, truncated to `context_length` with `EOT` kept as the last
    /// token, then zero-padded: the result always has `context_length` entries (open_clip's
    /// `tokenize`; a `context_length` of 0 gives an empty vector).
    pub fn tokenize(&self, text: &str, context_length: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(context_length.max(2));
        ids.push(SOT);
        ids.extend(self.encode(text));
        ids.push(EOT);
        if ids.len() > context_length {
            ids.truncate(context_length);
            if let Some(last) = ids.last_mut() {
                *last = EOT;
            }
        }
        ids.resize(context_length, PAD);
        ids
    }

    /// [`tokenize`](Self::tokenize) for each text; one row of `context_length` ids per text.
    pub fn tokenize_batch(&self, texts: &[&str], context_length: usize) -> Vec<Vec<u32>> {
        texts
            .iter()
            .map(|t| self.tokenize(t, context_length))
            .collect()
    }

    /// Text of a generated or tokenized sequence: `<start_of_text>` is skipped and decoding stops
    /// at the first `<end_of_text>`, so the padding after it never appears; the rest is
    /// open_clip's `decode` (bytes joined, invalid UTF-8 replaced by U+FFFD, `</w>` turned into a
    /// space, so the text usually ends with a space). This is what open_clip's captioning recipe
    /// computes with `decode(ids).split("<end_of_text>")[0].replace("<start_of_text>", "")`. Ids
    /// outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let end = ids.iter().position(|&i| i == EOT).unwrap_or(ids.len());
        let body: Vec<u32> = ids[..end].iter().copied().filter(|&i| i != SOT).collect();
        self.decode_raw(&body)
    }

    /// open_clip's `SimpleTokenizer.decode` unchanged: every id is decoded, the specials as the
    /// literal text `<start_of_text>` / `<end_of_text>` and padding as `!`. Ids outside the
    /// vocabulary (where open_clip raises `KeyError`) are skipped.
    pub fn decode_raw(&self, ids: &[u32]) -> String {
        let bpe = &self.inner.bpe;
        let tokens = ids
            .iter()
            .filter_map(|&i| u16::try_from(i).ok())
            .filter_map(|i| Token::from_u16(i, bpe));
        bpe.decode(tokens)
    }

    /// Number of token ids, 49,408.
    pub fn vocab_size(&self) -> usize {
        VOCAB_SIZE
    }
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &VOCAB_SIZE)
            .finish()
    }
}

/// open_clip's `_clean_lower`: `ftfy.fix_text` (see the module doc for what is ported), then
/// `html.unescape` twice, strip, collapse whitespace runs to one space, lower-case. Also replaces
/// U+0345 with a space (see the module doc), which changes no token.
pub fn clean_text(text: &str) -> String {
    let fixed = fix_text(text);
    let once = html_unescape(&fixed);
    let twice = html_unescape(&once);
    // basic_clean's strip() is subsumed by whitespace_clean's split/join/strip.
    let mut out = String::with_capacity(twice.len());
    for word in twice.split(is_py_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    let mut lower = out.to_lowercase();
    if lower.contains('\u{345}') {
        lower = lower.replace('\u{345}', " ");
    }
    lower
}

/// Python's `str.isspace` (what `str.split()` and `str.strip()` use): bidirectional classes
/// WS, B, S and general category Zs. Wider than Rust's `char::is_whitespace` (U+001C..U+001F).
fn is_py_space(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | '\u{1c}'..='\u{20}'
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

mod ftfy;
use ftfy::{fix_text, html_unescape};

#[cfg(test)]
mod tests;
