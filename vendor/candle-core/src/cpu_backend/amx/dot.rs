//! coca: the AVX-512 BF16 kernel of change 12 (`vdpbf16ps` on the operands `amx.rs` packs).

#[cfg(not(target_arch = "x86_64"))]
pub(super) use portable::{available, block};
#[cfg(target_arch = "x86_64")]
pub(super) use x86::{available, block};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::{Line, BLOCK, TILE_K, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Output rows per register block: 8 rows × 2 vectors of 16 columns are 16 accumulators,
    /// with the two lines of `B` and a broadcast of `A` 19 of the 32 registers.
    const ROWS: usize = 8;

    /// Whether the CPU has AVX-512 BF16 (and the F/BW/VL the packers use).
    pub(in crate::cpu_backend::amx) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bf16")
    }

    /// One 32 × 32 block of the output into `acc` (row-major, float32), its first `rows` rows
    /// (the rest are left as they were): for each pair of `k` values, each row's pair (one
    /// 32-bit broadcast) times the two lines of `B`'s pairs, added to float32 sums.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and BF16 ([`available`]); `a` and `b` hold `k_lines × 32`
    /// lines each.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(in crate::cpu_backend::amx) unsafe fn block(
        a: &[Line],
        b: &[Line],
        k_lines: usize,
        rows: usize,
        acc: &mut [f32; BLOCK * BLOCK],
    ) {
        assert!(a.len() >= k_lines * BLOCK && b.len() >= k_lines * BLOCK && rows <= BLOCK);
        for r0 in (0..rows).step_by(ROWS) {
            let mut sums = [[_mm512_setzero_ps(); 2]; ROWS];
            for kl in 0..k_lines {
                // Rows r0..r0 + ROWS of A's k line (r0 + ROWS ≤ 32), and B's two tiles.
                let a_lines = a.as_ptr().add(kl * BLOCK + r0) as *const i32;
                let b_lines = b.as_ptr().add(kl * BLOCK);
                for p in 0..TILE_K / 2 {
                    let b0: __m512bh =
                        std::mem::transmute(_mm512_load_si512(b_lines.add(p) as *const __m512i));
                    let b1: __m512bh = std::mem::transmute(_mm512_load_si512(
                        b_lines.add(TILE_ROWS + p) as *const __m512i,
                    ));
                    for (r, sum) in sums.iter_mut().enumerate() {
                        // Row r's pair (A[r][2p], A[r][2p+1]) as one 32-bit value.
                        let pair = a_lines.add(r * TILE_K / 2 + p).read();
                        let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                        sum[0] = _mm512_dpbf16_ps(sum[0], pair, b0);
                        sum[1] = _mm512_dpbf16_ps(sum[1], pair, b1);
                    }
                }
            }
            for (r, sum) in sums.iter().enumerate() {
                let out = acc.as_mut_ptr().add((r0 + r) * BLOCK);
                _mm512_storeu_ps(out, sum[0]);
                _mm512_storeu_ps(out.add(TILE_ROWS), sum[1]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod portable {
    use super::super::{Line, BLOCK};

    /// No AVX-512 BF16 outside x86-64.
    pub(in crate::cpu_backend::amx) fn available() -> bool {
        false
    }

    pub(in crate::cpu_backend::amx) unsafe fn block(
        _: &[Line],
        _: &[Line],
        _: usize,
        _: usize,
        _: &mut [f32; BLOCK * BLOCK],
    ) {
        unreachable!("AVX-512 BF16 is never active outside x86-64")
    }
}
