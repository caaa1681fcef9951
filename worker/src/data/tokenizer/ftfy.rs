//! A port of `ftfy.fix_text` (6.3, default settings), the first step of open_clip's text
//! cleaning: HTML unescaping, mojibake repair, and the character fixes, repeated to a fixed point.

use super::*;

/// ftfy's `max_decode_length`: segments are at most this many code points.
const FTFY_MAX_SEGMENT: usize = 1_000_000;

/// `ftfy.fix_text(text)` with default settings, less mojibake repair.
pub(super) fn fix_text(text: &str) -> String {
    if text.is_ascii() && !text.bytes().any(|b| b == b'&' || b < 0x20 || b == 0x7f) {
        // Nothing for any step to do (NFC and every table leave printable ASCII alone).
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    // "auto": entities are decoded until a segment containing '<' is seen, then never again.
    let mut unescape = true;
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.find('\n').map_or(rest.len(), |i| i + 1);
        if let Some((i, _)) = rest[..end].char_indices().nth(FTFY_MAX_SEGMENT) {
            end = i;
        }
        let segment = &rest[..end];
        if unescape && segment.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(segment, unescape));
        rest = &rest[end..];
    }
    out
}

/// ftfy's `fix_and_explain` on one segment: all fixers, repeated until nothing changes.
fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    // ftfy loops until a fixed point; every fixer only shortens or canonicalises, so this
    // converges in two or three passes. The bound only guards against surprises.
    for _ in 0..32 {
        let mut t: Cow<'_, str> = Cow::Borrowed(text.as_str());
        if unescape {
            t = ftfy_unescape_html(t);
        }
        t = fix_encoding(t);
        t = fix_c1_controls(t);
        t = fix_latin_ligatures(t);
        t = fix_character_width(t);
        t = uncurl_quotes(t);
        t = fix_line_breaks(t);
        t = remove_terminal_escapes(t);
        t = remove_control_chars(t);
        if !matches!(
            unicode_normalization::is_nfc_quick(t.chars()),
            unicode_normalization::IsNormalized::Yes
        ) {
            t = Cow::Owned(t.nfc().collect());
        }
        match t {
            Cow::Borrowed(_) => break,
            Cow::Owned(s) if s == text => break,
            Cow::Owned(s) => text = s,
        }
    }
    text
}

/// Applies `f` to every char, copying only when some char maps to something else.
fn map_chars<'a>(text: Cow<'a, str>, f: impl Fn(char) -> Option<&'static str>) -> Cow<'a, str> {
    let Some(first) = text.char_indices().find(|&(_, c)| f(c).is_some()) else {
        return text;
    };
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..first.0]);
    for c in text[first.0..].chars() {
        match f(c) {
            Some(s) => out.push_str(s),
            None => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Windows-1252 for bytes 0x80..=0x9F, with the five undefined bytes kept as the C1 control of
/// the same value (ftfy's "sloppy" codec; also Python's `html._invalid_charrefs` for those).
const WINDOWS_1252_C1: [&str; 32] = [
    "\u{20ac}", "\u{81}", "\u{201a}", "\u{192}", "\u{201e}", "\u{2026}", "\u{2020}", "\u{2021}",
    "\u{2c6}", "\u{2030}", "\u{160}", "\u{2039}", "\u{152}", "\u{8d}", "\u{17d}", "\u{8f}",
    "\u{90}", "\u{2018}", "\u{2019}", "\u{201c}", "\u{201d}", "\u{2022}", "\u{2013}", "\u{2014}",
    "\u{2dc}", "\u{2122}", "\u{161}", "\u{203a}", "\u{153}", "\u{9d}", "\u{17e}", "\u{178}",
];

/// ftfy `fix_c1_controls`: C1 control characters read as Windows-1252.
fn fix_c1_controls(text: Cow<'_, str>) -> Cow<'_, str> {
    map_chars(text, |c| match c {
        // The five undefined bytes map to themselves; leave them to avoid a needless copy.
        '\u{81}' | '\u{8d}' | '\u{8f}' | '\u{90}' | '\u{9d}' => None,
        '\u{80}'..='\u{9f}' => Some(WINDOWS_1252_C1[c as usize - 0x80]),
        _ => None,
    })
}

/// ftfy `fix_latin_ligatures`.
fn fix_latin_ligatures(text: Cow<'_, str>) -> Cow<'_, str> {
    map_chars(text, |c| {
        Some(match c {
            '\u{132}' => "IJ",
            '\u{133}' => "ij",
            '\u{149}' => "\u{2bc}n",
            '\u{1f1}' => "DZ",
            '\u{1f2}' => "Dz",
            '\u{1f3}' => "dz",
            '\u{1c4}' => "D\u{17d}",
            '\u{1c5}' => "D\u{17e}",
            '\u{1c6}' => "d\u{17e}",
            '\u{1c7}' => "LJ",
            '\u{1c8}' => "Lj",
            '\u{1c9}' => "lj",
            '\u{1ca}' => "NJ",
            '\u{1cb}' => "Nj",
            '\u{1cc}' => "nj",
            '\u{fb00}' => "ff",
            '\u{fb01}' => "fi",
            '\u{fb02}' => "fl",
            '\u{fb03}' => "ffi",
            '\u{fb04}' => "ffl",
            '\u{fb05}' => "\u{17f}t",
            '\u{fb06}' => "st",
            _ => return None,
        })
    })
}

/// ftfy `fix_character_width`: U+3000 to a space, and U+FF01..U+FFEF to their NFKC forms.
fn fix_character_width(text: Cow<'_, str>) -> Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c == '\u{3000}' || ('\u{ff01}'..='\u{ffef}').contains(&c))
    {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\u{3000}' {
            out.push(' ');
        } else if ('\u{ff01}'..='\u{ffef}').contains(&c) {
            out.extend(std::iter::once(c).nfkc());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// ftfy `uncurl_quotes`.
fn uncurl_quotes(text: Cow<'_, str>) -> Cow<'_, str> {
    map_chars(text, |c| match c {
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => Some("'"),
        '\u{201c}'..='\u{201f}' => Some("\""),
        _ => None,
    })
}

/// ftfy `fix_line_breaks`: CRLF, CR, U+2028, U+2029 and U+0085 become `\n`.
fn fix_line_breaks(text: Cow<'_, str>) -> Cow<'_, str> {
    if !text.contains(['\r', '\u{2028}', '\u{2029}', '\u{85}']) {
        return text;
    }
    let t = text.replace("\r\n", "\n");
    Cow::Owned(t.replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n"))
}

/// ftfy `remove_terminal_escapes`: `ESC [ (digits|;)* letter`.
fn remove_terminal_escapes(text: Cow<'_, str>) -> Cow<'_, str> {
    if !text.contains('\u{1b}') {
        return text;
    }
    static ANSI: OnceLock<Regex> = OnceLock::new();
    let re = ANSI.get_or_init(|| Regex::new(r"\x1b\[((?:\d|;)*)([a-zA-Z])").expect("valid regex"));
    match re.replace_all(&text, "") {
        Cow::Borrowed(_) => text,
        Cow::Owned(s) => Cow::Owned(s),
    }
}

/// ftfy `remove_control_chars`.
fn remove_control_chars(text: Cow<'_, str>) -> Cow<'_, str> {
    map_chars(text, |c| match c {
        '\u{0}'..='\u{8}'
        | '\u{b}'
        | '\u{e}'..='\u{1f}'
        | '\u{7f}'
        | '\u{206a}'..='\u{206f}'
        | '\u{feff}'
        | '\u{fff9}'..='\u{fffc}' => Some(""),
        _ => None,
    })
}

/// ftfy's entity table: every HTML5 name ending in `;`, plus upper-cased forms of the
/// all-lower-case names that `html.unescape` would leave alone (decoded upper-cased).
fn ftfy_entities() -> &'static HashMap<String, String> {
    static TABLE: OnceLock<HashMap<String, String>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = HashMap::new();
        for e in entities::ENTITIES.iter() {
            let name = &e.entity[1..];
            if !name.ends_with(';') {
                continue;
            }
            table.insert(e.entity.to_string(), e.characters.to_string());
            if name == name.to_lowercase() {
                let upper = format!("&{}", name.to_uppercase());
                if html_unescape(&upper) == upper {
                    table.insert(upper, e.characters.to_uppercase());
                }
            }
        }
        table
    })
}

/// ftfy `unescape_html`: only `&name;` / `&#...;` forms, never without the semicolon.
fn ftfy_unescape_html(text: Cow<'_, str>) -> Cow<'_, str> {
    if !text.contains('&') {
        return text;
    }
    static ENTITY: OnceLock<Regex> = OnceLock::new();
    let re = ENTITY.get_or_init(|| Regex::new(r"&#?[0-9A-Za-z]{1,24};").expect("valid regex"));
    let table = ftfy_entities();
    let replaced = re.replace_all(&text, |caps: &regex::Captures<'_>| {
        let m = &caps[0];
        if let Some(v) = table.get(m) {
            v.clone()
        } else if m.starts_with("&#") {
            let u = html_unescape(m);
            if u.contains(';') {
                m.to_string()
            } else {
                u
            }
        } else {
            m.to_string()
        }
    });
    match replaced {
        Cow::Borrowed(_) => text,
        Cow::Owned(s) => Cow::Owned(s),
    }
}

// ---------------------------------------------------------------------------------------------
// ftfy.fix_encoding: mojibake repair
// ---------------------------------------------------------------------------------------------

/// One of ftfy's single-byte encodings: byte -> char, and the inverse.
struct Charmap {
    name: &'static str,
    encode: HashMap<char, u8>,
}

/// Compiled regexes and tables of ftfy's mojibake detector and fixer.
struct Mojibake {
    badness: Regex,
    utf8_detector: Regex,
    /// `utf8_continuation_strict`: a detector match may not follow one of these.
    continuation_strict: Regex,
    charmaps: Vec<Charmap>,
    altered_utf8: regex::bytes::Regex,
    lossy_utf8: regex::bytes::Regex,
}

/// Python's `str.format` on ftfy's templates: `{name}` substitution, then `{{`/`}}`.
fn fill_template(template: &str, values: &[(&str, &str)]) -> String {
    let mut s = template.to_string();
    for (name, value) in values {
        s = s.replace(&format!("{{{name}}}"), value);
    }
    s.replace("{{", "{").replace("}}", "}")
}

fn mojibake() -> &'static Mojibake {
    static TABLES: OnceLock<Mojibake> = OnceLock::new();
    TABLES.get_or_init(|| {
        let strict = UTF8_CLUES
            .iter()
            .find(|(name, _)| *name == "utf8_continuation_strict")
            .map_or("", |(_, v)| *v);
        let charmaps = CHARMAPS
            .iter()
            .map(|&(name, upper, sub)| {
                let mut encode: HashMap<char, u8> = (0u8..0x80)
                    .filter(|&b| b != 0x1a)
                    .map(|b| (char::from(b), b))
                    .collect();
                encode.insert(sub, 0x1a);
                encode.extend(upper.chars().zip(0x80u8..=0xff));
                Charmap { name, encode }
            })
            .collect();
        Mojibake {
            badness: Regex::new(&fill_template(BADNESS_TEMPLATE, &MOJIBAKE_CATEGORIES))
                .expect("valid ftfy badness regex"),
            utf8_detector: Regex::new(&fill_template(UTF8_DETECTOR_TEMPLATE, &UTF8_CLUES))
                .expect("valid ftfy UTF-8 detector regex"),
            continuation_strict: Regex::new(&format!("^[{strict}]$"))
                .expect("valid continuation class"),
            charmaps,
            altered_utf8: regex::bytes::Regex::new(
                r"(?-u)[\xc2\xc3\xc5\xce\xd0\xd9][ ]|[\xe2\xe3][ ][\x80-\x84\x86-\x9f\xa1-\xbf]|[\xe0-\xe3][\x80-\x84\x86-\x9f\xa1-\xbf][ ]|[\xf0][ ][\x80-\xbf][\x80-\xbf]|[\xf0][\x80-\xbf][ ][\x80-\xbf]|[\xf0][\x80-\xbf][\x80-\xbf][ ]",
            )
            .expect("valid ALTERED_UTF8_RE"),
            lossy_utf8: regex::bytes::Regex::new(
                r"(?-u)[\xc2-\xdf][\x1a]|[\xc2-\xc3][?]|\xed[\xa0-\xaf][\x1a?]\xed[\xb0-\xbf][\x1a?\x80-\xbf]|\xed[\xa0-\xaf][\x1a?\x80-\xbf]\xed[\xb0-\xbf][\x1a?]|[\xe0-\xef][\x1a?][\x1a\x80-\xbf]|[\xe0-\xef][\x1a\x80-\xbf][\x1a?]|[\xf0-\xf4][\x1a?][\x1a\x80-\xbf][\x1a\x80-\xbf]|[\xf0-\xf4][\x1a\x80-\xbf][\x1a?][\x1a\x80-\xbf]|[\xf0-\xf4][\x1a\x80-\xbf][\x1a\x80-\xbf][\x1a?]|\x1a",
            )
            .expect("valid LOSSY_UTF8_RE"),
        }
    })
}

/// ftfy `is_bad`: does the text contain a sequence typical of mojibake?
fn is_bad(text: &str) -> bool {
    mojibake().badness.is_match(text)
}

/// ftfy `fix_encoding`: [`fix_encoding_step`] until nothing changes.
fn fix_encoding(text: Cow<'_, str>) -> Cow<'_, str> {
    let mut text = text;
    // Each successful step removes mojibake; the bound only guards against surprises.
    for _ in 0..32 {
        match fix_encoding_step(&text) {
            Some(fixed) if fixed != *text => text = Cow::Owned(fixed),
            _ => break,
        }
    }
    text
}

/// ftfy `_fix_encoding_one_step_and_explain`; `None` when the text is left as it is.
fn fix_encoding_step(text: &str) -> Option<String> {
    if text.is_ascii() || !is_bad(text) {
        return None;
    }
    let tables = mojibake();
    for map in &tables.charmaps {
        let Some(mut bytes) = text
            .chars()
            .map(|c| map.encode.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
        else {
            continue;
        };
        if map.name != "macroman" && tables.altered_utf8.is_match(&bytes) {
            bytes = restore_byte_a0(&bytes);
        }
        if map.name.starts_with("sloppy") {
            bytes = tables
                .lossy_utf8
                .replace_all(&bytes, "\u{fffd}".as_bytes())
                .into_owned();
        }
        let decoded = if bytes.contains(&0xed) || bytes.contains(&0xc0) {
            decode_utf8_variants(&bytes)
        } else {
            String::from_utf8(bytes).ok()
        };
        if let Some(fixed) = decoded {
            return Some(fixed);
        }
    }
    if find_utf8_sequence(text, 0).is_some() {
        let fixed = decode_inconsistent_utf8(text);
        if fixed != text {
            return Some(fixed);
        }
    }
    // ftfy then tries Latin-1 -> Windows-1252 and its C1 fixer; both give what
    // `fix_c1_controls` gives (they differ only in how they fail on undefined bytes).
    if text.contains(|c: char| ('\u{80}'..='\u{9f}').contains(&c)) {
        return Some(fix_c1_controls(Cow::Borrowed(text)).into_owned());
    }
    None
}

/// ftfy `restore_byte_a0`: put back the 0xA0 bytes that became spaces inside UTF-8 sequences.
fn restore_byte_a0(bytes: &[u8]) -> Vec<u8> {
    // A_GRAVE_WORD_RE = b"\xc3 (?! |quele|quela|quilo|s )" -> b"\xc3\xa0 "
    let mut out = Vec::with_capacity(bytes.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 0xc3 && bytes.get(i + 1) == Some(&b' ') {
            let rest = &bytes[i + 2..];
            let excluded = [&b" "[..], b"quele", b"quela", b"quilo", b"s "]
                .iter()
                .any(|p| rest.starts_with(p));
            if !excluded {
                out.extend_from_slice(b"\xc3\xa0 ");
                i += 2;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    mojibake()
        .altered_utf8
        .replace_all(&out, |m: &regex::bytes::Captures<'_>| {
            m[0].iter()
                .map(|&b| if b == b' ' { 0xa0 } else { b })
                .collect::<Vec<u8>>()
        })
        .into_owned()
}

/// ftfy's `utf-8-variants` codec (strict): UTF-8, plus Java's `C0 80` for NUL and CESU-8
/// surrogate pairs; anything else invalid fails.
fn decode_utf8_variants(bytes: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        if rest.starts_with(&[0xc0, 0x80]) {
            out.push('\0');
            i += 2;
            continue;
        }
        if rest.len() >= 6
            && rest[0] == 0xed
            && (0xa0..=0xaf).contains(&rest[1])
            && (0x80..=0xbf).contains(&rest[2])
            && rest[3] == 0xed
            && (0xb0..=0xbf).contains(&rest[4])
            && (0x80..=0xbf).contains(&rest[5])
        {
            let cp = ((u32::from(rest[1]) & 0x0f) << 16)
                + ((u32::from(rest[2]) & 0x3f) << 10)
                + ((u32::from(rest[4]) & 0x0f) << 6)
                + (u32::from(rest[5]) & 0x3f)
                + 0x10000;
            out.push(char::from_u32(cp)?);
            i += 6;
            continue;
        }
        // Plain UTF-8 up to the next byte that could start a special sequence.
        let next = rest[1..]
            .iter()
            .position(|&b| b == 0xc0 || b == 0xed)
            .map_or(rest.len(), |p| p + 1);
        let chunk = std::str::from_utf8(&rest[..next]).ok()?;
        out.push_str(chunk);
        i += next;
    }
    Some(out)
}

/// The next match of ftfy's `UTF8_DETECTOR_RE` at or after byte `from`, honouring its
/// look-behind: the match may not directly follow a `utf8_continuation_strict` character.
fn find_utf8_sequence(text: &str, from: usize) -> Option<std::ops::Range<usize>> {
    let tables = mojibake();
    let mut pos = from;
    while pos <= text.len() {
        let m = tables.utf8_detector.find_at(text, pos)?;
        let prev = text[..m.start()].chars().next_back();
        let blocked = prev.is_some_and(|c| {
            let mut buf = [0u8; 4];
            tables.continuation_strict.is_match(c.encode_utf8(&mut buf))
        });
        if !blocked {
            return Some(m.range());
        }
        pos = m.start() + text[m.start()..].chars().next().map_or(1, char::len_utf8);
    }
    None
}

/// ftfy `decode_inconsistent_utf8`: fix mojibake embedded in otherwise sound text.
fn decode_inconsistent_utf8(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    while let Some(r) = find_utf8_sequence(text, last) {
        out.push_str(&text[last..r.start]);
        let sub = &text[r.clone()];
        if sub.len() < text.len() && is_bad(sub) {
            out.push_str(&fix_encoding(Cow::Borrowed(sub)));
        } else {
            out.push_str(sub);
        }
        last = r.end;
    }
    out.push_str(&text[last..]);
    out
}

// ---- Tables generated from ftfy 6.3.1 (badness.py, chardata.py, bad_codecs) ----

/// ftfy `MOJIBAKE_CATEGORIES`, substituted into [`BADNESS_TEMPLATE`].
const MOJIBAKE_CATEGORIES: [(&str, &str); 14] = [
    ("common", "\u{a0}\u{ad}·´–—―…’"),
    ("c1", "\u{80}-\u{9f}"),
    ("bad", "¦¤¨¬¯¸ƒˆˇ˘˛˜†‡‰⌐◊\u{fffd}ªº"),
    ("law", "¶§"),
    ("currency", "¢£¥₧€"),
    ("start_punctuation", "¡«¿©΄΅‘‚“„•‹\u{f8ff}"),
    ("end_punctuation", "®»˝”›™"),
    ("numeric", "²³¹±¼½¾×µ÷⁄∂∆∏∑√∞∩∫≈≠≡≤≥№"),
    ("kaomoji", "Ò-ÖÙ-Üò-öø-üŐŌŪŲ°"),
    (
        "upper_accented",
        "À-ÑØÜÝĂĀĄĆČĎĐĘĚĒĖĞĢİĪĶĹĽŁĻŃŇŅŒŘŚŞŠŢŤŮŰŸŹŻŽҐ",
    ),
    ("lower_accented", "ßà-ñăąāćčďđęěēėğģįīķĺľłļœŕśşšťüźżžґﬁﬂ"),
    ("upper_common", "ÞΑ-ΩΆΈΉΊΌΎΏΪΫЁ-Я"),
    ("lower_common", "α-ωάέήίΰа-џ"),
    ("box", "│┌┐┘├┤┬┼═-╬▀▄█▌▐░▒▓"),
];
/// ftfy `BADNESS_RE` (verbose whitespace and comments removed).
const BADNESS_TEMPLATE: &str = "[{c1}]|[{bad}{lower_accented}{upper_accented}{box}{start_punctuation}{end_punctuation}{currency}{numeric}{law}][{bad}]|[a-zA-Z][{lower_common}{upper_common}][{bad}]|[{bad}][{lower_accented}{upper_accented}{box}{start_punctuation}{end_punctuation}{currency}{numeric}{law}]|[{lower_accented}{lower_common}{box}{end_punctuation}{currency}{numeric}][{upper_accented}]|[{box}{end_punctuation}{currency}{numeric}][{lower_accented}]|[{lower_accented}{box}{end_punctuation}][{currency}]|\\s[{upper_accented}][{currency}]|[{upper_accented}{box}][{numeric}{law}]|[{lower_accented}{upper_accented}{box}{currency}{end_punctuation}][{start_punctuation}][{numeric}]|[{lower_accented}{upper_accented}{currency}{numeric}{box}{law}][{end_punctuation}][{start_punctuation}]|[{currency}{numeric}{box}][{start_punctuation}]|[a-z][{upper_accented}][{start_punctuation}{currency}]|[{box}][{kaomoji}]|[{lower_accented}{upper_accented}{currency}{numeric}{start_punctuation}{end_punctuation}{law}][{box}]|[{box}][{end_punctuation}]|[{lower_accented}{upper_accented}][{start_punctuation}{end_punctuation}]\\w|[Œœ][^A-Za-z]|[{upper_accented}]°|[ÂÃÎÐ][€œŠš¢£Ÿž\\xa0\\xad®©°·»{start_punctuation}{end_punctuation}–—´]|×[²³]|[ØÙ][{common}{currency}{bad}{numeric}{start_punctuation}ŸŠ®°µ»][ØÙ][{common}{currency}{bad}{numeric}{start_punctuation}ŸŠ®°µ»]|à[²µ¹¼½¾]|√[±∂†≠®™´≤≥¥µø]|≈[°¢]|‚Ä[ìîïòôúùû†°¢π]|‚[âó][àä°ê]|вЂ|[ВГРС][{c1}{bad}{start_punctuation}{end_punctuation}{currency}°µ][ВГРС]|ГўВЂВ.[A-Za-z ]|Ã[\\xa0¡]|[a-z]\\s?[ÃÂ][ ]|^[ÃÂ][ ]|[a-z.,?!{end_punctuation}]Â[ {start_punctuation}{end_punctuation}]|β€[™\\xa0Ά\\xad®°]|[ΒΓΞΟ][{c1}{bad}{start_punctuation}{end_punctuation}{currency}°][ΒΓΞΟ]|ā€";
/// ftfy `UTF8_CLUES`, substituted into [`UTF8_DETECTOR_TEMPLATE`].
const UTF8_CLUES: [(&str, &str); 5] = [
    ("utf8_first_of_2", "ĂÂÄĀÅÃÆĆČÇĎĐÉĚÊËĖÈĒĘÐĞĢÍÎÏİÌĪĶĹĻŁŃŇŅÑÓÔÖŐÒŌØÕŘŚŠŞŢÞÚÛÜŰÙŪŲŮÝŹŽŻß×ΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩΪΫάέήίВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"),
    ("utf8_first_of_3", "áăâäàāąåãæćčçďéěêëėèēęęģíîïìīįķĺļŕźΰαβγδεζηθικλμνξοабвгдежзийклмноп"),
    ("utf8_first_of_4", "đðğóšπσру"),
    ("utf8_continuation", "\u{80}-¿ ĄÆĽŁØŖŚŠŞŤŸŹŽŻŒąæƒľłøŗśšşťźžżœˆˇ˘˛˜˝΄΅ΆΈΉΊΌΎΏЁЂЃЄЅІЇЈЉЊЋЌЎЏёђѓєѕіїјљњћќўџҐґ–—―‘’‚“”„†‡•…‰‹›€№™"),
    ("utf8_continuation_strict", "\u{80}-¿ĄÆĽŁØŖŚŠŞŤŸŹŽŻŒąæƒľłøŗśšşťźžżœˆˇ˘˛˜˝΄΅ΆΈΉΊΌΎΏЁЂЃЄЅІЇЈЉЊЋЌЎЏёђѓєѕіїјљњћќўџҐґ†‡‰‹›€№™"),
];
/// ftfy `UTF8_DETECTOR_RE` without its leading `(?<! [{utf8_continuation_strict}])`, which
/// [`utf8_detector_sub`] checks by hand (the regex crate has no look-behind).
const UTF8_DETECTOR_TEMPLATE: &str = "([{utf8_first_of_2}][{utf8_continuation}]|[{utf8_first_of_3}][{utf8_continuation}]{{2}}|[{utf8_first_of_4}][{utf8_continuation}]{{3}})+";
/// ftfy `CHARMAP_ENCODINGS`: name, the characters of bytes 0x80..=0xFF, and of byte 0x1A
/// (U+FFFD in the "sloppy" codecs). Bytes 0x00..=0x7F other than 0x1A are ASCII in all.
const CHARMAPS: [(&str, &str, char); 10] = [
    (
        "latin-1",
        "\u{80}\u{81}\u{82}\u{83}\u{84}\u{85}\u{86}\u{87}\u{88}\u{89}\u{8a}\u{8b}\u{8c}\u{8d}\u{8e}\u{8f}\u{90}\u{91}\u{92}\u{93}\u{94}\u{95}\u{96}\u{97}\u{98}\u{99}\u{9a}\u{9b}\u{9c}\u{9d}\u{9e}\u{9f}\u{a0}¡¢£¤¥¦§¨©ª«¬\u{ad}®¯°±²³´µ¶·¸¹º»¼½¾¿ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖ×ØÙÚÛÜÝÞßàáâãäåæçèéêëìíîïðñòóôõö÷øùúûüýþÿ",
        '\u{1a}',
    ),
    (
        "sloppy-windows-1252",
        "€\u{81}‚ƒ„…†‡ˆ‰Š‹Œ\u{8d}Ž\u{8f}\u{90}‘’“”•–—˜™š›œ\u{9d}žŸ\u{a0}¡¢£¤¥¦§¨©ª«¬\u{ad}®¯°±²³´µ¶·¸¹º»¼½¾¿ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖ×ØÙÚÛÜÝÞßàáâãäåæçèéêëìíîïðñòóôõö÷øùúûüýþÿ",
        '\u{fffd}',
    ),
    (
        "sloppy-windows-1251",
        "ЂЃ‚ѓ„…†‡€‰Љ‹ЊЌЋЏђ‘’“”•–—\u{98}™љ›њќћџ\u{a0}ЎўЈ¤Ґ¦§Ё©Є«¬\u{ad}®Ї°±Ііґµ¶·ё№є»јЅѕїАБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯабвгдежзийклмнопрстуфхцчшщъыьэюя",
        '\u{fffd}',
    ),
    (
        "sloppy-windows-1250",
        "€\u{81}‚\u{83}„…†‡\u{88}‰Š‹ŚŤŽŹ\u{90}‘’“”•–—\u{98}™š›śťžź\u{a0}ˇ˘Ł¤Ą¦§¨©Ş«¬\u{ad}®Ż°±˛ł´µ¶·¸ąş»Ľ˝ľżŔÁÂĂÄĹĆÇČÉĘËĚÍÎĎĐŃŇÓÔŐÖ×ŘŮÚŰÜÝŢßŕáâăäĺćçčéęëěíîďđńňóôőö÷řůúűüýţ˙",
        '\u{fffd}',
    ),
    (
        "sloppy-windows-1253",
        "€\u{81}‚ƒ„…†‡\u{88}‰\u{8a}‹\u{8c}\u{8d}\u{8e}\u{8f}\u{90}‘’“”•–—\u{98}™\u{9a}›\u{9c}\u{9d}\u{9e}\u{9f}\u{a0}΅Ά£¤¥¦§¨©ª«¬\u{ad}®―°±²³΄µ¶·ΈΉΊ»Ό½ΎΏΐΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡÒΣΤΥΦΧΨΩΪΫάέήίΰαβγδεζηθικλμνξοπρςστυφχψωϊϋόύώÿ",
        '\u{fffd}',
    ),
    (
        "sloppy-windows-1254",
        "€\u{81}‚ƒ„…†‡ˆ‰Š‹Œ\u{8d}\u{8e}\u{8f}\u{90}‘’“”•–—˜™š›œ\u{9d}\u{9e}Ÿ\u{a0}¡¢£¤¥¦§¨©ª«¬\u{ad}®¯°±²³´µ¶·¸¹º»¼½¾¿ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏĞÑÒÓÔÕÖ×ØÙÚÛÜİŞßàáâãäåæçèéêëìíîïğñòóôõö÷øùúûüışÿ",
        '\u{fffd}',
    ),
    (
        "sloppy-windows-1257",
        "€\u{81}‚\u{83}„…†‡\u{88}‰\u{8a}‹\u{8c}¨ˇ¸\u{90}‘’“”•–—\u{98}™\u{9a}›\u{9c}¯˛\u{9f}\u{a0}¡¢£¤¥¦§Ø©Ŗ«¬\u{ad}®Æ°±²³´µ¶·ø¹ŗ»¼½¾æĄĮĀĆÄÅĘĒČÉŹĖĢĶĪĻŠŃŅÓŌÕÖ×ŲŁŚŪÜŻŽßąįāćäåęēčéźėģķīļšńņóōõö÷ųłśūüżž˙",
        '\u{fffd}',
    ),
    (
        "iso-8859-2",
        "\u{80}\u{81}\u{82}\u{83}\u{84}\u{85}\u{86}\u{87}\u{88}\u{89}\u{8a}\u{8b}\u{8c}\u{8d}\u{8e}\u{8f}\u{90}\u{91}\u{92}\u{93}\u{94}\u{95}\u{96}\u{97}\u{98}\u{99}\u{9a}\u{9b}\u{9c}\u{9d}\u{9e}\u{9f}\u{a0}Ą˘Ł¤ĽŚ§¨ŠŞŤŹ\u{ad}ŽŻ°ą˛ł´ľśˇ¸šşťź˝žżŔÁÂĂÄĹĆÇČÉĘËĚÍÎĎĐŃŇÓÔŐÖ×ŘŮÚŰÜÝŢßŕáâăäĺćçčéęëěíîďđńňóôőö÷řůúűüýţ˙",
        '\u{1a}',
    ),
    (
        "macroman",
        "ÄÅÇÉÑÖÜáàâäãåçéèêëíìîïñóòôöõúùûü†°¢£§•¶ß®©™´¨≠ÆØ∞±≤≥¥µ∂∑∏π∫ªºΩæø¿¡¬√ƒ≈∆«»…\u{a0}ÀÃÕŒœ–—“”‘’÷◊ÿŸ⁄€‹›ﬁﬂ‡·‚„‰ÂÊÁËÈÍÎÏÌÓÔ\u{f8ff}ÒÚÛÙıˆ˜¯˘˙˚¸˝˛ˇ",
        '\u{1a}',
    ),
    (
        "cp437",
        "ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u{a0}",
        '\u{1a}',
    ),
];

// ---------------------------------------------------------------------------------------------
// Python's html.unescape
// ---------------------------------------------------------------------------------------------

/// The HTML5 named references (with and without `;`), keyed without the leading `&`.
fn html5_entities() -> &'static HashMap<&'static str, &'static str> {
    static TABLE: OnceLock<HashMap<&'static str, &'static str>> = OnceLock::new();
    TABLE.get_or_init(|| {
        entities::ENTITIES
            .iter()
            .map(|e| (&e.entity[1..], e.characters))
            .collect()
    })
}

/// Python's `html.unescape` (3.x), including its numeric-reference quirks and the longest-prefix
/// rule for names without `;`.
pub(crate) fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    static CHARREF: OnceLock<Regex> = OnceLock::new();
    let re = CHARREF.get_or_init(|| {
        Regex::new(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\x0c <&#;]{1,32};?)")
            .expect("valid regex")
    });
    re.replace_all(text, |caps: &regex::Captures<'_>| replace_charref(&caps[1]))
        .into_owned()
}

fn replace_charref(s: &str) -> String {
    if let Some(num) = s.strip_prefix('#') {
        let (digits, radix) = match num.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16),
            None => (num, 10),
        };
        let digits = digits.trim_end_matches(';');
        // Saturate: anything past U+10FFFF is replaced the same way.
        let mut n: u64 = 0;
        for d in digits.chars() {
            n = n * radix + u64::from(d.to_digit(radix as u32).unwrap_or(0));
            if n > 0x10_FFFF {
                n = 0x11_0000;
            }
        }
        return numeric_charref(n);
    }
    let table = html5_entities();
    if let Some(v) = table.get(s) {
        return (*v).to_string();
    }
    // Longest prefix (of at least 2 chars, shorter than the whole) that is a known name.
    let bounds: Vec<usize> = s.char_indices().map(|(i, _)| i).skip(2).collect();
    for &b in bounds.iter().rev() {
        if let Some(v) = table.get(&s[..b]) {
            return format!("{v}{}", &s[b..]);
        }
    }
    format!("&{s}")
}

fn numeric_charref(n: u64) -> String {
    match n {
        0x00 => return "\u{fffd}".to_string(),
        0x0d => return "\r".to_string(),
        0x80..=0x9f => return WINDOWS_1252_C1[n as usize - 0x80].to_string(),
        0xd800..=0xdfff => return "\u{fffd}".to_string(),
        n if n > 0x10_ffff => return "\u{fffd}".to_string(),
        _ => {}
    }
    let invalid = matches!(n, 0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f..=0x9f | 0xfdd0..=0xfdef)
        || (n & 0xfffe) == 0xfffe;
    if invalid {
        return String::new();
    }
    char::from_u32(n as u32).map_or_else(|| "\u{fffd}".to_string(), String::from)
}
