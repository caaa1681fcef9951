//! This process's resident memory as the kernel counts it (Linux `/proc/self`): the current
//! figure, the peak, and a reset of the peak, so that the peak of one piece of work can be read.

use anyhow::{bail, Context, Result};

/// A `kB` field of `/proc/self/status` (`VmRSS`, `VmHWM`), in bytes.
fn status_bytes(field: &str) -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kb: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("parsing {field} in /proc/self/status: {rest:?}"))?;
            return Ok(kb * 1024);
        }
    }
    bail!("/proc/self/status has no {field} line")
}

/// Bytes resident now.
pub fn resident_bytes() -> Result<u64> {
    status_bytes("VmRSS")
}

/// The most bytes resident since the process started or since [`reset_peak`] (memory handed
/// back to the kernel since may be missing from it: read it before freeing, or with an
/// allocator that keeps what it frees, as the worker's does).
pub fn peak_resident_bytes() -> Result<u64> {
    status_bytes("VmHWM")
}

/// Hands freed heap memory back to the kernel (glibc keeps it: see
/// [`crate::runtime::tune_allocator`]) and restarts the peak from the bytes resident now.
pub fn reset_peak() -> Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's arenas to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    // "5" resets the peak resident set size (Linux 4.0 and later).
    std::fs::write("/proc/self/clear_refs", "5")
        .context("resetting the peak resident size (/proc/self/clear_refs)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_covers_a_buffer_touched_after_a_reset() {
        reset_peak().unwrap();
        let before = resident_bytes().unwrap();
        let mut buffer = vec![0u8; 64 << 20];
        for page in buffer.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&mut buffer);
        let peak = peak_resident_bytes().unwrap();
        assert!(peak >= before + (60 << 20), "{before} -> {peak}");
        drop(buffer);
    }
}
