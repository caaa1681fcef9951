//! Backing memory that is streamed over and over with 2 MiB pages (Linux's transparent huge
//! pages).
//!
//! A decoding step reads every weight matrix of the text tower and the decoder once (530 MB for
//! `coca_ViT-B-32`). On 4 KiB pages each page costs a TLB miss and the hardware prefetcher
//! stops at every page boundary; on this project's 2-core machine the step's products ran at
//! ~40 GB/s on 4 KiB pages and ~51 GB/s on 2 MiB pages, alternating in one process. The
//! worker's allocator keeps everything on the heap, where THP (in its usual `madvise` mode)
//! gives 4 KiB pages unless asked.

use std::io;

/// The size of a transparent huge page on x86-64 and most aarch64 kernels.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// Moves `data` onto huge pages now: marks the 2 MiB pages it touches `MADV_HUGEPAGE` (so
/// they stay huge) and collapses them (`MADV_COLLAPSE`, Linux 6.1). The contents do not
/// change. The pages at either end are shared with whatever lies beside `data`; they are
/// advised too, which changes nothing for that memory but its page size.
///
/// This is advice: the error says why the kernel did not take it (an older kernel, THP off,
/// no huge page free, part of the range not mapped), and the memory then stays as it was. It
/// costs a copy of the memory the first time (~0.5 s for 530 MB here) and little afterwards.
pub fn advise<T>(data: &[T]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let start = data.as_ptr() as usize / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
    let end =
        (data.as_ptr() as usize + std::mem::size_of_val(data)).next_multiple_of(HUGE_PAGE_BYTES);
    advise_range(start, end - start)
}

#[cfg(target_os = "linux")]
fn advise_range(start: usize, len: usize) -> io::Result<()> {
    /// `MADV_COLLAPSE` from linux/mman.h (the libc crate has it for glibc targets only).
    const MADV_COLLAPSE: libc::c_int = 25;
    let at = start as *mut libc::c_void;
    // SAFETY: the range covers whole pages of this process's own memory; neither advice
    // changes what the memory holds. Where part of it is unmapped the call fails (ENOMEM)
    // after advising the mapped parts, so its result is left to the collapse's.
    unsafe { libc::madvise(at, len, libc::MADV_HUGEPAGE) };
    // SAFETY: as above; a collapse copies pages into huge ones and keeps their contents.
    match unsafe { libc::madvise(at, len, MADV_COLLAPSE) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_range(_start: usize, _len: usize) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "transparent huge pages are Linux's",
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::alloc::{alloc, dealloc, Layout};

    /// `AnonHugePages` of the mapping holding `address`, in kB, from /proc/self/smaps.
    fn anon_huge_kb(address: usize) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&address);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(kb) = line.strip_prefix("AnonHugePages:") {
                    return kb.trim().trim_end_matches("kB").trim().parse().ok();
                }
            }
        }
        None
    }

    #[test]
    fn advice_keeps_the_contents_and_takes_huge_pages_where_the_kernel_can() {
        let bytes = 3 * HUGE_PAGE_BYTES;
        let layout = Layout::from_size_align(bytes, HUGE_PAGE_BYTES).unwrap();
        // SAFETY: a non-zero size; freed below with the same layout.
        let ptr = unsafe { alloc(layout) };
        assert!(!ptr.is_null());
        // SAFETY: `bytes` bytes were just allocated; every one is written before it is read.
        let data = unsafe {
            for i in 0..bytes {
                ptr.add(i).write((i % 251) as u8);
            }
            std::slice::from_raw_parts(ptr, bytes)
        };
        let advised = advise(data);
        assert!(data.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        match advised {
            // A collapse that succeeded left the whole range on huge pages.
            Ok(()) => {
                let kb = anon_huge_kb(ptr as usize).expect("the buffer's mapping in smaps");
                assert!(kb >= 3 * 2048, "{kb} kB on huge pages, 6144 expected");
            }
            // Older kernels, THP off or no huge page free: nothing to check but the contents.
            Err(e) => eprintln!("huge pages not taken here: {e}"),
        }
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(ptr, layout) };
        assert!(advise::<f32>(&[]).is_ok());
    }
}
