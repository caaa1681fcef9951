//! The NCCL library, opened when a GPU job first needs it (never at start, so the CUDA binary
//! runs where NCCL is not installed), with the functions [`super::raw`] calls.
//!
//! Why not cudarc's loader: it looks for `libnccl.so` and a list of CUDA-numbered names
//! (`libnccl.so.13`, `.12`, …, `.1`) but never `libnccl.so.2`, the one name every NCCL 2.x
//! release installs (the nvidia-nccl-cu13 wheel ships only that one), and it panics when none
//! loads. Here `libnccl.so.2` comes first and a failure is an error saying what to install.
//! The types stay cudarc's (`nccl-02030` bindings), and each signature below is checked at
//! compile time against cudarc's declaration of the same function.

use anyhow::{anyhow, Result};
use candle_core::cuda_backend::cudarc::nccl::sys;
use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

/// The names tried, in order: NCCL 2.x's SONAME, then the development link name.
pub const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// Declares the function table, its loader, and a compile-time check of each signature
/// against cudarc's binding of the same name.
macro_rules! nccl_functions {
    ($($name:ident($($arg:ty),*) -> $ret:ty;)*) => {
        /// The NCCL entry points this worker calls, resolved once from the loaded library.
        #[allow(non_snake_case)]
        pub struct Functions {
            $(pub $name: unsafe extern "C" fn($($arg),*) -> $ret,)*
        }

        impl Functions {
            /// Resolves every entry point of `library`.
            ///
            /// # Safety
            /// `library` must be NCCL 2.x, whose functions have the signatures declared here.
            unsafe fn resolve(library: &libloading::Library) -> Result<Self, libloading::Error> {
                // SAFETY: the caller's contract; each symbol is read as the declared type.
                unsafe {
                    Ok(Self {
                        $($name: *library.get(concat!(stringify!($name), "\0").as_bytes())?,)*
                    })
                }
            }
        }

        /// Never called: it compiles only while each declared signature equals cudarc's
        /// binding of the same function (made from NCCL's headers).
        #[allow(dead_code)]
        fn signatures_match_cudarc() {
            $(let _: unsafe fn($($arg),*) -> $ret = sys::$name;)*
        }
    };
}

nccl_functions! {
    ncclGetVersion(*mut c_int) -> sys::ncclResult_t;
    ncclGetUniqueId(*mut sys::ncclUniqueId) -> sys::ncclResult_t;
    ncclCommInitRankConfig(
        *mut sys::ncclComm_t, c_int, sys::ncclUniqueId, c_int, *mut sys::ncclConfig_t
    ) -> sys::ncclResult_t;
    ncclCommAbort(sys::ncclComm_t) -> sys::ncclResult_t;
    ncclCommGetAsyncError(sys::ncclComm_t, *mut sys::ncclResult_t) -> sys::ncclResult_t;
    ncclGetErrorString(sys::ncclResult_t) -> *const c_char;
    ncclGetLastError(sys::ncclComm_t) -> *const c_char;
    ncclAllReduce(
        *const c_void, *mut c_void, usize, sys::ncclDataType_t, sys::ncclRedOp_t,
        sys::ncclComm_t, sys::cudaStream_t
    ) -> sys::ncclResult_t;
    ncclReduceScatter(
        *const c_void, *mut c_void, usize, sys::ncclDataType_t, sys::ncclRedOp_t,
        sys::ncclComm_t, sys::cudaStream_t
    ) -> sys::ncclResult_t;
    ncclAllGather(
        *const c_void, *mut c_void, usize, sys::ncclDataType_t, sys::ncclComm_t,
        sys::cudaStream_t
    ) -> sys::ncclResult_t;
    ncclBroadcast(
        *const c_void, *mut c_void, usize, sys::ncclDataType_t, c_int, sys::ncclComm_t,
        sys::cudaStream_t
    ) -> sys::ncclResult_t;
}

/// The loaded library (kept open for the process's life) and its functions.
struct Loaded {
    _library: libloading::Library,
    functions: Functions,
}

/// NCCL's functions, loading the library on first use; the error names the names tried and
/// what to install.
pub fn functions() -> Result<&'static Functions> {
    static LOADED: OnceLock<std::result::Result<Loaded, String>> = OnceLock::new();
    LOADED
        .get_or_init(load)
        .as_ref()
        .map(|loaded| &loaded.functions)
        .map_err(|message| anyhow!("{message}"))
}

/// Opens the first of [`LIBRARY_NAMES`] that loads and resolves the functions.
fn load() -> std::result::Result<Loaded, String> {
    let mut failures = Vec::new();
    for name in LIBRARY_NAMES {
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(name) } {
            Ok(library) => {
                // SAFETY: a library with NCCL's name is NCCL 2.x (its SONAME since 2.0).
                return match unsafe { Functions::resolve(&library) } {
                    Ok(functions) => Ok(Loaded {
                        _library: library,
                        functions,
                    }),
                    Err(e) => Err(format!(
                        "{name} lacks a function this build calls ({}): it is older than NCCL \
                         2.19; put a newer one (the nvidia-nccl-cu13 wheel's lib folder) on \
                         LD_LIBRARY_PATH",
                        loader_message(&e)
                    )),
                };
            }
            Err(e) => failures.push(loader_message(&e)),
        }
    }
    Err(format!(
        "the NCCL library could not be loaded ({}): GPU jobs of more than one worker need \
         NCCL 2.19 or newer; install it (e.g. `pip install nvidia-nccl-cu13` and put its \
         nvidia/nccl/lib folder on LD_LIBRARY_PATH, or the distribution's libnccl2), or set \
         {}=host to reduce through host memory instead (slower)",
        failures.join("; "),
        crate::comm::GPU_COLLECTIVES_ENV
    ))
}

/// The dynamic loader's own words (libloading's error says only "dlopen failed" and keeps
/// them as its source).
fn loader_message(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => cause.to_string(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_naming_what_to_install() {
        // This machine has no NCCL (the CUDA build's tests run without a GPU); where it has
        // one, the library loads and every function resolves.
        match functions() {
            Ok(f) => {
                let mut version = 0;
                // SAFETY: ncclGetVersion writes one int through a valid pointer.
                let code = unsafe { (f.ncclGetVersion)(&mut version) };
                assert_eq!(code, sys::ncclResult_t::ncclSuccess);
                assert!(version >= 20000, "NCCL version {version}");
            }
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("libnccl.so.2"), "{text}");
                assert!(text.contains("LD_LIBRARY_PATH"), "{text}");
                assert!(text.contains("COCA_GPU_COLLECTIVES=host"), "{text}");
            }
        }
    }
}
