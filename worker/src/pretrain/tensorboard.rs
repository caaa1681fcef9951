//! TensorBoard event files (`output_dir/runs/<time>_<host>/events.out.tfevents.*`) with the
//! training scalars, readable by TensorBoard and `tensorboard.backend.event_processing`.
//!
//! The format is TFRecord: each record is `u64 length, u32 masked CRC-32C of the length, the
//! bytes, u32 masked CRC-32C of the bytes`, and each record's bytes are one `Event` protobuf.
//! The CRC comes from the maintained `crc32c` crate. The protobuf is encoded here by hand: only
//! six fields of three messages are written (`Event.wall_time/step/file_version/summary`,
//! `Summary.value`, `Summary.Value.tag/simple_value`), which is less code than a `.proto` file,
//! a build script and `prost` (the TensorBoard crates themselves are unmaintained and pin old
//! dependencies). [`read_scalars`] decodes the same subset, checking every CRC.

use anyhow::{bail, ensure, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// TFRecord's CRC mask.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// One `Event` with `wall_time`, `step` and either `file_version` or a summary of scalars.
fn event(
    wall_time: f64,
    step: i64,
    file_version: Option<&str>,
    scalars: &[(&str, f32)],
) -> Vec<u8> {
    let mut out = Vec::new();
    varint(&mut out, (1 << 3) | 1); // wall_time: double
    out.extend_from_slice(&wall_time.to_le_bytes());
    varint(&mut out, 2 << 3); // step: int64
    varint(&mut out, step as u64);
    if let Some(version) = file_version {
        bytes_field(&mut out, 3, version.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            varint(&mut v, (2 << 3) | 5); // simple_value: float
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        bytes_field(&mut out, 5, &summary);
    }
    out
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An open event file.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// Creates `output_dir/runs/<unix time>_<host>/events.out.tfevents.<unix time>.<host>` and
    /// writes the file-version event.
    pub fn create(output_dir: &Path) -> Result<Self> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        let secs = now_s() as u64;
        let dir = output_dir.join("runs").join(format!("{secs}_{host}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the TensorBoard folder {}", dir.display()))?;
        let path = dir.join(format!("events.out.tfevents.{secs}.{host}"));
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = Self { path, file };
        writer.record(&event(now_s(), 0, Some("brain.Event:2"), &[]))?;
        Ok(writer)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event holding `scalars` at `step`, flushed so that TensorBoard sees it now.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let values: Vec<(&str, f32)> = scalars.iter().map(|(t, v)| (*t, *v as f32)).collect();
        self.record(&event(now_s(), step as i64, None, &values))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&rec)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// One scalar read back: step, tag, value.
pub type Scalar = (i64, String, f32);

/// Reads a varint at `*pos`.
fn read_varint(bytes: &[u8], pos: &mut usize) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*pos).context("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    bail!("varint longer than 10 bytes")
}

/// Splits a message into (field, wire type, payload) for the wire types written here.
fn fields(bytes: &[u8]) -> Result<Vec<(u64, u64, &[u8])>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let key = read_varint(bytes, &mut pos)?;
        let (field, wire) = (key >> 3, key & 7);
        let len = match wire {
            0 => {
                let start = pos;
                read_varint(bytes, &mut pos)?;
                out.push((field, wire, &bytes[start..pos]));
                continue;
            }
            1 => 8,
            5 => 4,
            2 => read_varint(bytes, &mut pos)? as usize,
            w => bail!("wire type {w} is not used by event files"),
        };
        let payload = bytes.get(pos..pos + len).context("truncated field")?;
        out.push((field, wire, payload));
        pos += len;
    }
    Ok(out)
}

/// Every scalar of an event file, checking each record's two CRCs. Exists so that tests (and a
/// user without TensorBoard) can read back what was written.
pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < bytes.len() {
        let header = bytes
            .get(pos..pos + 12)
            .context("truncated record header")?;
        let len = u64::from_le_bytes(header[..8].try_into()?) as usize;
        ensure!(
            masked_crc(&header[..8]).to_le_bytes() == header[8..12],
            "length CRC mismatch at byte {pos}"
        );
        let data = bytes
            .get(pos + 12..pos + 12 + len)
            .context("truncated record")?;
        let crc = bytes
            .get(pos + 12 + len..pos + 16 + len)
            .context("truncated record CRC")?;
        ensure!(
            masked_crc(data).to_le_bytes() == crc,
            "data CRC mismatch at byte {pos}"
        );
        pos += 16 + len;
        let mut step = 0i64;
        let mut values = Vec::new();
        for (field, _, payload) in fields(data)? {
            match field {
                2 => step = read_varint(payload, &mut 0)? as i64,
                5 => {
                    for (_, _, value) in fields(payload)? {
                        let (mut tag, mut v) = (String::new(), None);
                        for (f, _, p) in fields(value)? {
                            match f {
                                1 => tag = String::from_utf8(p.to_vec())?,
                                2 => v = Some(f32::from_le_bytes(p.try_into()?)),
                                _ => {}
                            }
                        }
                        if let Some(v) = v {
                            values.push((tag, v));
                        }
                    }
                }
                _ => {}
            }
        }
        out.extend(values.into_iter().map(|(t, v)| (step, t, v)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_round_trip_with_crcs() {
        // The CRC-32C check value and TFRecord's mask of it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let tmp = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(tmp.path()).unwrap();
        w.scalars(3, &[("train/loss", 2.5), ("train/lr", 1e-4)])
            .unwrap();
        w.scalars(300, &[("eval/top1", 12.0)]).unwrap();
        let got = read_scalars(w.path()).unwrap();
        assert_eq!(
            got,
            vec![
                (3, "train/loss".to_string(), 2.5),
                (3, "train/lr".to_string(), 1e-4),
                (300, "eval/top1".to_string(), 12.0),
            ]
        );
        assert!(w.path().starts_with(tmp.path().join("runs")));
        // A flipped byte is caught.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(w.path(), bytes).unwrap();
        assert!(read_scalars(w.path()).is_err());
    }
}
