//! coca: cuBLAS's layout rule for a matrix product, checked on the CPU when asked.
//!
//! The CUDA backend's `gemm_config` (`src/cuda_backend/mod.rs`) refuses operand layouts that
//! the CPU's `gemm` takes (e.g. a row of a 3-D tensor, whose row stride is the whole
//! sequence: "matmul is only supported for contiguous tensors"). With
//! `COCA_CHECK_CUBLAS_LAYOUTS=1` in the environment the CPU product applies the same rule and
//! fails the same way, so a program's products — its backward pass's too — are proven to
//! run on a GPU by running them on the CPU.

use crate::{Layout, Result};
use std::sync::OnceLock;

/// Whether `COCA_CHECK_CUBLAS_LAYOUTS` is set (read once).
pub(super) fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("COCA_CHECK_CUBLAS_LAYOUTS").is_some_and(|v| v != "0"))
}

/// `Ok` where `gemm_config` of the CUDA backend accepts the layouts of a `(b, m, n, k)`
/// product, else its error, word for word.
pub(super) fn check(
    (_, m, n, k): (usize, usize, usize, usize),
    lhs_l: &Layout,
    rhs_l: &Layout,
) -> Result<()> {
    let refused = || {
        crate::bail!(
            "matmul is only supported for contiguous tensors lstride: {lhs_l:?} rstride: {rhs_l:?} mnk: {:?} (cuBLAS's rule, checked on the CPU: COCA_CHECK_CUBLAS_LAYOUTS)",
            (m, n, k)
        )
    };
    let (ls, rs) = (lhs_l.stride(), rhs_l.stride());
    if ls.len() < 2 || rs.len() < 2 {
        return refused();
    }
    let (rhs_m1, rhs_m2) = (rs[rs.len() - 1], rs[rs.len() - 2]);
    let (lhs_m1, lhs_m2) = (ls[ls.len() - 1], ls[ls.len() - 2]);
    let rhs_ok = ((rhs_m1 == 1 || n == 1) && (rhs_m2 == n || k == 1))
        || ((rhs_m1 == k || n == 1) && (rhs_m2 == 1 || k == 1));
    let lhs_ok = ((lhs_m1 == 1 || k == 1) && (lhs_m2 == k || m == 1))
        || ((lhs_m1 == m || k == 1) && (lhs_m2 == 1 || m == 1));
    // The batch strides: what `stride_a` and `stride_b` accept.
    let batch_ok = |stride: &[usize], l: &Layout| match stride[..stride.len() - 2] {
        [s1, s] => s1 == s * l.dims()[1] || l.dims()[0] == 1 || l.dims()[1] == 1,
        [_] | [] => true,
        _ => false,
    };
    if rhs_ok && lhs_ok && batch_ok(ls, lhs_l) && batch_ok(rs, rhs_l) {
        Ok(())
    } else {
        refused()
    }
}
