//! The checksums a download is checked against: SHA-256 (what the Hugging Face hub gives as
//! the `ETag` / `X-Linked-Etag` of LFS files) and MD5 (a standard `Content-MD5` header, or one
//! published beside a file, as PaddleMIX does for `coco.tar`).

use anyhow::{bail, Context, Result};
use base64::Engine;
use md5::Md5;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// An expected digest, as lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// SHA-256.
    Sha256(String),
    /// MD5.
    Md5(String),
}

impl std::fmt::Display for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Checksum::Sha256(h) => write!(f, "sha256 {h}"),
            Checksum::Md5(h) => write!(f, "md5 {h}"),
        }
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// An entity tag without its quotes and weak marker.
pub fn bare_etag(etag: &str) -> &str {
    etag.trim().trim_start_matches("W/").trim_matches('"')
}

impl Checksum {
    /// The SHA-256 an entity tag stands for, when it is 64 hex digits (the hub's LFS files).
    pub fn from_etag(etag: &str) -> Option<Self> {
        let tag = bare_etag(etag);
        is_hex(tag, 64).then(|| Checksum::Sha256(tag.to_ascii_lowercase()))
    }

    /// The MD5 of a `Content-MD5` header (base64 of the 16 bytes).
    pub fn from_content_md5(value: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .ok()?;
        (bytes.len() == 16).then(|| Checksum::Md5(hex(&bytes)))
    }

    /// Hashes `path` and fails with both digests when it does not match.
    pub fn verify(&self, path: &Path) -> Result<()> {
        let actual = match self {
            Checksum::Sha256(_) => digest_file::<Sha256>(path)?,
            Checksum::Md5(_) => digest_file::<Md5>(path)?,
        };
        let expected = match self {
            Checksum::Sha256(h) | Checksum::Md5(h) => h,
        };
        if !actual.eq_ignore_ascii_case(expected) {
            bail!(
                "checksum mismatch for {}: expected {self}, got {actual}",
                path.display()
            );
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest_file<D: Digest>(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = D::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_that_are_sha256_are_recognised_and_others_are_not() {
        let sha = "a".repeat(64);
        assert_eq!(
            Checksum::from_etag(&format!("\"{sha}\"")),
            Some(Checksum::Sha256(sha.clone()))
        );
        assert_eq!(
            Checksum::from_etag(&format!("W/\"{sha}\"")),
            Some(Checksum::Sha256(sha))
        );
        assert_eq!(Checksum::from_etag("\"abc-12\""), None);
        assert_eq!(Checksum::from_etag(&"z".repeat(64)), None);
    }

    #[test]
    fn verify_accepts_the_right_digests_and_names_both_on_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        Checksum::Sha256(sha.into()).verify(&path).unwrap();
        Checksum::Md5("900150983cd24fb0d6963f7d28e17f72".into())
            .verify(&path)
            .unwrap();
        let md5 = Checksum::from_content_md5("kAFQmDzST7DWlj99KOF/cg==").unwrap();
        md5.verify(&path).unwrap();
        let err = Checksum::Sha256("0".repeat(64))
            .verify(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains(sha) && err.contains(&"0".repeat(64)), "{err}");
    }
}
