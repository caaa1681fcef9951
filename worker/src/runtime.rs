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

/// glibc reads its tunables from this variable once, when the process starts.
const GLIBC_TUNABLES: &str = "GLIBC_TUNABLES";

/// The glibc tunable (2.35 and later) that backs malloc's heap and arenas with transparent huge
/// pages: it advises `MADV_HUGEPAGE` on the memory it takes from the kernel, which the kernel's
/// usual THP mode (`madvise`) waits for.
const HUGE_PAGE_HEAP: &str = "glibc.malloc.hugetlb=1";

/// `COCA_HUGE_PAGE_HEAP=0` keeps the heap on 4 KiB pages ([`huge_page_heap`]).
pub const HUGE_PAGE_HEAP_ENV: &str = "COCA_HUGE_PAGE_HEAP";

/// Whether this process's heap was asked for huge pages (`bench` reports it).
pub fn heap_on_huge_pages() -> bool {
    std::env::var(GLIBC_TUNABLES).is_ok_and(|t| t.contains(HUGE_PAGE_HEAP))
}

/// The `GLIBC_TUNABLES` value to restart with, or `None` to go on as started: when the heap
/// already has its setting (or the user set `glibc.malloc.hugetlb` otherwise), when
/// [`HUGE_PAGE_HEAP_ENV`] is `0`/`false`, or when the kernel's THP mode (`thp_mode`, the
/// contents of `/sys/kernel/mm/transparent_hugepage/enabled`) is `never` or unknown.
fn restart_tunables(
    tunables: Option<&str>,
    opt_out: Option<&str>,
    thp_mode: Option<&str>,
) -> Option<String> {
    if matches!(opt_out.map(str::trim), Some("0" | "false")) {
        return None;
    }
    let tunables = tunables.unwrap_or("");
    if tunables.contains("glibc.malloc.hugetlb") {
        return None;
    }
    let mode = thp_mode?;
    if !(mode.contains("[always]") || mode.contains("[madvise]")) {
        return None;
    }
    Some(match tunables {
        "" => HUGE_PAGE_HEAP.to_string(),
        other => format!("{other}:{HUGE_PAGE_HEAP}"),
    })
}

/// Restarts this process, once and before anything else runs, with glibc's heap on
/// transparent huge pages. Every tensor lives on the heap ([`tune_allocator`]); on 4 KiB pages
/// each of the millions of pages a training step's buffers span costs a page fault when first
/// touched and a TLB miss on every pass over it. The tunable can only be given at start-up, so
/// the process replaces itself (`exec`: the same pid, arguments and environment plus the
/// tunable). Measured on a 2-core Xeon VM, B-32 at batch 8, alternating with and without:
/// steps of 6.60 s against 6.96 s and 7.97 s against 8.11 s, a run's page faults 2.6 million →
/// 7,500 (docs/speed-history.md). Returns when it does not restart (see `restart_tunables`); a failed
/// `exec` is reported and the process goes on.
pub fn huge_page_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        let thp_mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok();
        let Some(value) = restart_tunables(
            std::env::var(GLIBC_TUNABLES).ok().as_deref(),
            std::env::var(HUGE_PAGE_HEAP_ENV).ok().as_deref(),
            thp_mode.as_deref(),
        ) else {
            return;
        };
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new("/proc/self/exe");
        if let Some(arg0) = args.next() {
            command.arg0(arg0);
        }
        let err = command.args(args).env(GLIBC_TUNABLES, value).exec();
        eprintln!(
            "coca-worker: warning: could not restart with the heap on huge pages ({err}); \
             going on with 4 KiB pages"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_once_with_the_tunable_unless_told_or_unable() {
        let madvise = Some("always [madvise] never\n");
        assert_eq!(
            restart_tunables(None, None, madvise).as_deref(),
            Some(HUGE_PAGE_HEAP)
        );
        // Other tunables are kept.
        assert_eq!(
            restart_tunables(Some("glibc.malloc.arena_max=2"), None, madvise).as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
        );
        // Restarted already, or the user chose a hugetlb setting: no restart (no loop).
        assert_eq!(restart_tunables(Some(HUGE_PAGE_HEAP), None, madvise), None);
        assert_eq!(
            restart_tunables(Some("glibc.malloc.hugetlb=0"), None, madvise),
            None
        );
        // Opted out, THP off, or no THP at all.
        assert_eq!(restart_tunables(None, Some("0"), madvise), None);
        assert_eq!(restart_tunables(None, Some("false"), madvise), None);
        assert_eq!(
            restart_tunables(None, None, Some("always madvise [never]")),
            None
        );
        assert_eq!(restart_tunables(None, None, None), None);
        assert!(restart_tunables(None, Some("1"), Some("[always] madvise never")).is_some());
    }
}
