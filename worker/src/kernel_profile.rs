//! Marks what `bench` times in a GPU kernel timeline: when the CUDA driver has loaded
//! `scripts/cuda/kernel_profile.c` as its injection library (`CUDA_INJECTION64_PATH`), the
//! windows opened here (a training step's forward and backward, its update, the embedding) are
//! what `kernel_profile_summary.py` reports on, beside the same windows of open_clip's
//! benchmark. Without that library every call is a no-op.

use std::ffi::{c_char, c_int, c_void, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;

/// The injection library's environment variable (read by the CUDA driver at `cuInit`).
pub const INJECTION_ENV: &str = "CUDA_INJECTION64_PATH";

/// `coca_kernel_profile_window(label)`: opens a window (`label`) or closes it (null).
type WindowFn = unsafe extern "C" fn(*const c_char) -> c_int;

/// The profiler's window marker, when it is loaded.
#[derive(Clone, Copy, Default)]
pub struct KernelWindows(Option<WindowFn>);

impl KernelWindows {
    /// The marker of the library `CUDA_INJECTION64_PATH` names, if the driver has loaded it
    /// (call after the device is open).
    pub fn from_env() -> Self {
        std::env::var_os(INJECTION_ENV)
            .map(|path| Self::loaded(&path))
            .unwrap_or_default()
    }

    /// The marker of the library at `path` if this process has already loaded it; nothing is
    /// loaded here.
    pub fn loaded(path: &OsStr) -> Self {
        let Ok(path) = CString::new(path.as_bytes()) else {
            return Self(None);
        };
        // SAFETY: RTLD_NOLOAD returns a handle only to a library already loaded (nothing is
        // loaded or initialised); the symbol, when present, has the C signature of WindowFn
        // (scripts/cuda/kernel_profile.c). The handle is kept for the process's life.
        unsafe {
            let handle = libc::dlopen(path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
            if handle.is_null() {
                return Self(None);
            }
            let symbol = libc::dlsym(handle, c"coca_kernel_profile_window".as_ptr());
            if symbol.is_null() {
                return Self(None);
            }
            Self(Some(std::mem::transmute::<*mut c_void, WindowFn>(symbol)))
        }
    }

    /// Whether windows are being recorded.
    pub fn is_active(&self) -> bool {
        self.0.is_some()
    }

    /// Opens a window named `label`, when `timed` (synchronise the device first, so that only
    /// the window's own kernels start inside it).
    pub fn open(&self, label: &CStr, timed: bool) {
        if let (Some(window), true) = (self.0, timed) {
            // SAFETY: a NUL-terminated label that outlives the call.
            unsafe { window(label.as_ptr()) };
        }
    }

    /// Closes the open window, when `timed` (after synchronising the device).
    pub fn close(&self, timed: bool) {
        if let (Some(window), true) = (self.0, timed) {
            // SAFETY: null closes the window.
            unsafe { window(std::ptr::null()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A stand-in for the profiler: the same entry point, recording its calls in a file.
    const STUB: &str = r#"
#include <stdio.h>
int coca_kernel_profile_window(const char *label) {
  FILE *f = fopen(RECORD, "a");
  if (!f) return -1;
  fprintf(f, "%s\n", label ? label : "close");
  fclose(f);
  return 0;
}
"#;

    #[test]
    fn windows_reach_a_loaded_profiler_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (source, library, record) = (
            dir.path().join("stub.c"),
            dir.path().join("libstub.so"),
            dir.path().join("calls.txt"),
        );
        std::fs::write(&source, STUB).unwrap();
        let built = Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&library)
            .arg(format!("-DRECORD=\"{}\"", record.display()))
            .arg(&source)
            .status();
        let Ok(status) = built else {
            eprintln!("skipped: no C compiler (cc) to build the stand-in profiler");
            return;
        };
        assert!(status.success(), "cc failed to build the stand-in profiler");

        // Not loaded yet: nothing is found, and nothing gets loaded by looking.
        assert!(!KernelWindows::loaded(library.as_os_str()).is_active());
        let path = CString::new(library.as_os_str().as_bytes()).unwrap();
        // SAFETY: loading a library of one plain C function; the handle is kept.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!handle.is_null());

        let windows = KernelWindows::loaded(library.as_os_str());
        assert!(windows.is_active());
        windows.open(c"warm-up", false);
        windows.close(false);
        windows.open(c"forward_backward", true);
        windows.close(true);
        assert_eq!(
            std::fs::read_to_string(&record).unwrap(),
            "forward_backward\nclose\n"
        );

        // Another library, or none, marks nothing.
        assert!(!KernelWindows::loaded(OsStr::new("/nonexistent/libprofile.so")).is_active());
        KernelWindows::default().open(c"forward", true);
        assert_eq!(std::fs::read_to_string(&record).unwrap().lines().count(), 2);
    }
}
