//! Process-wide settings every worker command applies at start-up.

/// Raises glibc's mmap and trim thresholds.
///
/// candle allocates a fresh buffer for every op result; with glibc's defaults, buffers above the
/// dynamic mmap threshold are mapped and unmapped on every op and the page faults cost more than
/// the arithmetic (measured 2–2.7× slower training steps on CPU; see the README).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
