//! Process-wide settings every worker command applies at start-up.

/// Keeps freed memory in the process instead of returning it to the kernel.
///
/// candle allocates a fresh buffer for every op result; with glibc's defaults, large buffers are
/// mmapped and unmapped on every op and the page faults (and TLB shootdowns) cost more than the
/// arithmetic (2–2.7× slower training steps measured on CPU; see the README). The mmap
/// threshold cannot be raised above 32 MiB, and a ViT-B/32 step allocates buffers of 100 MiB
/// and more (vocabulary logits and embedding gradients), so mmap is turned off altogether and
/// the heap is trimmed only above 1 GiB of free memory.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}
