//! The job secret that every control-plane peer must prove it knows.

use anyhow::{bail, Context, Result};
use ring::rand::{SecureRandom, SystemRandom};
use std::fmt;
use std::path::Path;

/// Shortest secret accepted: 16 bytes (128 bits for a random one; a human-chosen string of this
/// length is weaker, so generate one, e.g. with `openssl rand -hex 32`).
pub const MIN_TOKEN_BYTES: usize = 16;

/// The job secret. Only peers that know it may join the control plane; it is never sent over the
/// wire (peers exchange HMACs bound to their TLS session, see `tls`), and never printed: `Debug`
/// shows its length only.
///
/// No `PartialEq`: comparing secrets belongs to constant-time HMAC verification only.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl Token {
    /// A fresh 32-byte secret from the operating system's generator, for a launcher that makes
    /// up the job's token itself (single node, or node 0 handing it to the others).
    pub fn random() -> Result<Token> {
        let mut bytes = vec![0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
        Ok(Token(bytes))
    }

    /// The user-given secret (`--rdzv-token` / `COCA_RDZV_TOKEN`), used as is (its bytes).
    /// Errors if it is empty or shorter than [`MIN_TOKEN_BYTES`].
    pub fn from_secret(secret: &str) -> Result<Token> {
        Self::from_bytes(secret.as_bytes().to_vec()).context("invalid rendezvous token")
    }

    /// The secret stored in a file (readable by the job's user only, so it never shows in `ps`).
    /// One trailing newline (`\n` or `\r\n`) is removed. Errors name the file.
    pub fn from_file(path: &Path) -> Result<Token> {
        let mut bytes = std::fs::read(path)
            .with_context(|| format!("cannot read the rendezvous token file {}", path.display()))?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        Self::from_bytes(bytes)
            .with_context(|| format!("invalid rendezvous token in {}", path.display()))
    }

    /// Lowercase hex of the secret, to hand it to workers through the environment.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }

    /// The inverse of [`Token::to_hex`]. The error never repeats the input (it is a secret).
    pub fn from_hex(s: &str) -> Result<Token> {
        let bytes = match hex::decode(s.trim()) {
            Ok(bytes) => bytes,
            Err(_) => bail!(
                "invalid rendezvous token: not a hex string ({} characters)",
                s.len()
            ),
        };
        Self::from_bytes(bytes).context("invalid rendezvous token (hex)")
    }

    /// The secret itself, as the HMAC key.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn from_bytes(bytes: Vec<u8>) -> Result<Token> {
        if bytes.is_empty() {
            bail!("the token is empty");
        }
        if bytes.len() < MIN_TOKEN_BYTES {
            bail!(
                "the token is too short: {} bytes, at least {MIN_TOKEN_BYTES} needed \
                 (generate one with e.g. `openssl rand -hex 32`)",
                bytes.len()
            );
        }
        Ok(Token(bytes))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<redacted, {} bytes>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_constructors_and_redaction() {
        let t = Token::random().unwrap();
        assert_eq!(t.as_bytes().len(), 32);
        assert_ne!(t.as_bytes(), Token::random().unwrap().as_bytes());
        assert_eq!(
            Token::from_hex(&t.to_hex()).unwrap().as_bytes(),
            t.as_bytes()
        );
        let dbg = format!("{t:?}");
        assert!(
            !dbg.contains(&t.to_hex()) && dbg.contains("redacted"),
            "{dbg}"
        );

        let e = Token::from_secret("").unwrap_err();
        assert!(format!("{e:#}").contains("empty"), "{e:#}");
        let e = Token::from_secret("short").unwrap_err();
        assert!(format!("{e:#}").contains("too short: 5 bytes"), "{e:#}");
        let s = Token::from_secret("0123456789abcdef").unwrap();
        assert_eq!(s.as_bytes(), b"0123456789abcdef");

        let e = Token::from_hex("zz-not-hex-secret").unwrap_err();
        assert!(!format!("{e:#}").contains("not-hex-secret"), "{e:#}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef\r\n").unwrap();
        assert_eq!(Token::from_file(&path).unwrap().as_bytes(), s.as_bytes());
        std::fs::write(&path, "abc\n").unwrap();
        let e = Token::from_file(&path).unwrap_err();
        assert!(
            format!("{e:#}").contains(&path.display().to_string()),
            "{e:#}"
        );
        let missing = dir.path().join("missing");
        let e = Token::from_file(&missing).unwrap_err();
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
    }
}
