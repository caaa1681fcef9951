//! coca: bf16 matrix products on native bf16 instructions (change 12): Intel AMX tiles, or
//! AVX-512 BF16 dot products.
//!
//! 0.11.1 has no bf16 GEMM on the CPU: each bf16 product widens both operands to float32, runs
//! the float32 `gemm` and rounds the result, so under autocast a bf16 product costs what a
//! float32 one does plus three conversions. Two instruction sets multiply bf16 pairs into
//! float32 sums:
//! - AMX (Intel Xeon since Sapphire Rapids) multiplies tiles (`tdpbf16ps`): on a 2-core
//!   Sapphire Rapids VM one core ran 1,530 G multiply-adds/s from tiles, against 103 G with
//!   AVX-512 float32 FMAs (and 52 G with `vdpbf16ps`, so that CPU uses its tiles).
//! - AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake) multiplies 32 bf16 pairs per
//!   instruction (`vdpbf16ps`): on a Zen 4 EPYC one core ran 117 G multiply-adds/s from it,
//!   twice its 58.5 G with float32 FMAs.
//!
//! Both kernels read the same packed operands (`A` in lines of 32 values of `k`, `B` in the
//! pair layout) and fill the same 32 × 32 float32 blocks. The arithmetic is that of the
//! widening path up to the order of the float32 additions: a product of two bf16 values is
//! exact in float32, and each output is the float32 sum over `k` (in order, pair by pair)
//! rounded once to bf16, as the widened product's output is. Both treat bf16 subnormal inputs
//! (below 1.2e-38) as zero and flush float32 subnormal sums to zero; nothing in a network's
//! products lives there.
//!
//! Which kernel runs is decided once ([`active`]): AMX where the CPU has AMX-BF16 and the
//! kernel grants the process its tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), else AVX-512
//! BF16 where the CPU has it, else none (the widening path). `COCA_CPU_KERNELS` below AVX-512
//! holds the process to the widening path, `COCA_CPU_BF16_PRODUCTS=amx|avx512bf16|widened`
//! caps the choice at that kernel, and `COCA_CPU_AMX=0` (the earlier switch) is the cap
//! `avx512bf16`. [`with_kernel_on_this_thread`] makes the calling thread use a given kernel
//! (tests compare each with the widening path).

use super::convert::bf16_from_f32_slice;
use crate::Layout;
use half::bf16;
use rayon::prelude::*;
use std::cell::Cell;
use std::ops::Range;
use std::sync::OnceLock;

/// Rows of `A` (and of the output) per tile.
const TILE_ROWS: usize = 16;
/// bf16 values of `k` per tile row (64 bytes).
const TILE_K: usize = 32;
/// Output rows and columns of one task's register block: 2 × 2 tiles.
const BLOCK: usize = 32;
/// Output columns per task (whole register blocks): its packed share of `B` (`k` × 128 bf16,
/// 192 KiB at `k` = 768) stays in the core's L2 while every row block of `A` passes it.
const TASK_COLUMNS: usize = 128;

/// One 64-byte tile row: 32 bf16 (`A`, a row's `k` values) or 16 bf16 pairs (`B`, a pair of
/// `k` values for each of 16 columns), aligned to a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; TILE_K]);

const ZERO_LINE: Line = Line([0; TILE_K]);

/// The AVX-512 BF16 kernel.
mod dot;

/// A native bf16 product kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// `vdpbf16ps` on AVX-512 registers.
    Avx512Bf16,
    /// `tdpbf16ps` on AMX tiles.
    Amx,
}

impl Kernel {
    /// The kernel's name in reports and in `COCA_CPU_BF16_PRODUCTS`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512Bf16 => "avx512bf16",
            Self::Amx => "amx",
        }
    }

    /// Whether this CPU (and, for AMX, the operating system) runs the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Self::Avx512Bf16 => dot::available(),
            Self::Amx => {
                static GRANTED: OnceLock<bool> = OnceLock::new();
                *GRANTED.get_or_init(hardware::enable)
            }
        }
    }

    /// The kernels this CPU runs, best last.
    pub fn available() -> Vec<Self> {
        [Self::Avx512Bf16, Self::Amx]
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }
}

/// Which kernel the calling thread was told to use, if any (`Some(None)`: the widening path).
#[derive(Clone, Copy)]
struct Forced(Option<Option<Kernel>>);

thread_local! {
    static FORCED: Cell<Forced> = const { Cell::new(Forced(None)) };
}

/// Runs `f` with the bf16 products it makes on this thread going through `kernel` (`None`:
/// the widening path, float32 `gemm`), whatever the process chose; the kernel must be
/// available ([`Kernel::is_available`]). Tests compare the kernels this way.
pub fn with_kernel_on_this_thread<R>(kernel: Option<Kernel>, f: impl FnOnce() -> R) -> R {
    assert!(
        kernel.is_none_or(Kernel::is_available),
        "{kernel:?} is not available on this CPU"
    );
    let before = FORCED.with(|w| w.replace(Forced(Some(kernel))));
    let result = f();
    FORCED.with(|w| w.set(before));
    result
}

/// Runs `f` with the bf16 products it makes on this thread going through the widening path
/// (float32 `gemm`), whatever the CPU has: the tests' reference for the native kernels.
pub fn widened_on_this_thread<R>(f: impl FnOnce() -> R) -> R {
    with_kernel_on_this_thread(None, f)
}

/// `COCA_CPU_BF16_PRODUCTS`'s value as a cap on the kernel: `Some(None)` for `widened`,
/// `Some(Some(kernel))` for a kernel's name, `None` for anything else (which is ignored).
pub fn parse_cap(value: &str) -> Option<Option<Kernel>> {
    match value.trim().to_ascii_lowercase().as_str() {
        "widened" => Some(None),
        "avx512bf16" => Some(Some(Kernel::Avx512Bf16)),
        "amx" => Some(Some(Kernel::Amx)),
        _ => None,
    }
}

/// The kernel bf16 products run on in this process (see the module's documentation for the
/// switches), or `None` for the widening path. Decided once.
pub fn active() -> Option<Kernel> {
    static ACTIVE: OnceLock<Option<Kernel>> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        use super::convert::VectorWidth;
        if VectorWidth::active() != VectorWidth::Avx512 {
            return None;
        }
        let requested = std::env::var("COCA_CPU_BF16_PRODUCTS").ok();
        let mut cap = match requested.as_deref().and_then(parse_cap) {
            Some(None) => return None,
            Some(Some(kernel)) => kernel,
            None => Kernel::Amx,
        };
        if std::env::var("COCA_CPU_AMX").is_ok_and(|v| v.trim() == "0") {
            cap = cap.min(Kernel::Avx512Bf16);
        }
        Kernel::available().into_iter().filter(|&k| k <= cap).max()
    })
}

/// Whether bf16 products in this process run on a native kernel (AMX or AVX-512 BF16): they
/// then read their operands through any strides and keep no float32 copies.
pub fn is_active() -> bool {
    active().is_some()
}

/// The kernel the bf16 product about to be made on this thread runs on (`None`: widened).
pub(super) fn kernel_here() -> Option<Kernel> {
    match FORCED.with(|w| w.get()) {
        Forced(Some(forced)) => forced,
        Forced(None) => active(),
    }
}

/// The strides of one operand of a batch of products: between batch entries, rows and columns.
#[derive(Clone, Copy)]
pub(super) struct Strides {
    pub batch: usize,
    pub row: usize,
    pub col: usize,
}

impl Strides {
    /// The last two strides of `l` and the batch stride `batch`.
    pub(super) fn of(l: &Layout, batch: usize) -> Self {
        let s = l.stride();
        let rank = s.len();
        Self {
            batch,
            row: s[rank - 2],
            col: s[rank - 1],
        }
    }
}

/// The batch of products `lhs[i] · rhs[i]` (`[m, k]` by `[k, n]`, strided as given from the
/// slices' starts) as contiguous bf16 `[b, m, n]`, on `kernel` (which must be available).
pub(super) fn matmul(
    kernel: Kernel,
    lhs: &[bf16],
    lhs_s: Strides,
    rhs: &[bf16],
    rhs_s: Strides,
    (b, m, n, k): (usize, usize, usize, usize),
) -> Vec<bf16> {
    if m == 0 || n == 0 || k == 0 {
        return vec![bf16::ZERO; b * m * n];
    }
    let mut dst = Vec::with_capacity(b * m * n);
    // SAFETY: the tasks below write every element before the vector is returned (each
    // entry's column ranges cover 0..n and its row blocks 0..m), and bf16 has no invalid bit
    // patterns.
    unsafe { dst.set_len(b * m * n) };
    let k_lines = k.div_ceil(TILE_K);
    let row_blocks = m.div_ceil(BLOCK);
    let tasks_per_entry = n.div_ceil(TASK_COLUMNS);
    // Each entry's A, packed once (the tasks of its columns share it).
    let packed_a: Vec<Vec<Line>> = (0..b)
        .into_par_iter()
        .map(|e| pack_a(&lhs[e * lhs_s.batch..], lhs_s, (m, k), k_lines))
        .collect();
    // Too few column ranges to occupy the threads: row blocks split too (each part packs its
    // columns of B again).
    let threads = rayon::current_num_threads();
    let row_parts = threads.div_ceil(b * tasks_per_entry).clamp(1, row_blocks);
    let blocks_per_part = row_blocks.div_ceil(row_parts);
    let out = SharedOut(dst.as_mut_ptr());
    (0..b * tasks_per_entry * row_parts)
        .into_par_iter()
        .for_each(|task| {
            let (e, t, part) = (
                task / (tasks_per_entry * row_parts),
                task / row_parts % tasks_per_entry,
                task % row_parts,
            );
            let cols = t * TASK_COLUMNS..((t + 1) * TASK_COLUMNS).min(n);
            let b_packed = pack_b(&rhs[e * rhs_s.batch..], rhs_s, k, cols.clone(), k_lines);
            let a = &packed_a[e];
            let mut acc = [0f32; BLOCK * BLOCK];
            // SAFETY: the kernel is available (the CPU has it; for AMX the tile state is
            // granted); both kernels read whole blocks of `a` and `b_packed` (sized by k_lines
            // and whole register blocks) and write `acc` (32 rows of 32 float32).
            let _tiles = (kernel == Kernel::Amx).then(|| unsafe { hardware::Tiles::configure() });
            let first = part * blocks_per_part;
            for rb in first..(first + blocks_per_part).min(row_blocks) {
                let a_block = &a[rb * k_lines * BLOCK..(rb + 1) * k_lines * BLOCK];
                let row0 = rb * BLOCK;
                let rows = BLOCK.min(m - row0);
                for (cb, b_block) in b_packed.chunks_exact(k_lines * BLOCK).enumerate() {
                    match kernel {
                        Kernel::Amx => unsafe {
                            hardware::block(a_block, b_block, k_lines, &mut acc)
                        },
                        Kernel::Avx512Bf16 => unsafe {
                            dot::block(a_block, b_block, k_lines, rows, &mut acc)
                        },
                    }
                    let col0 = cols.start + cb * BLOCK;
                    let width = BLOCK.min(cols.end - col0);
                    for r in 0..rows {
                        let at = e * m * n + (row0 + r) * n + col0;
                        // SAFETY: tasks write disjoint parts of the output (each entry's columns
                        // split by `t`, its row blocks by `part`), rows below m, columns below n.
                        let row = unsafe { std::slice::from_raw_parts_mut(out.at(at), width) };
                        bf16_from_f32_slice(&acc[r * BLOCK..r * BLOCK + width], row);
                    }
                }
            }
        });
    dst
}

/// The output's base pointer, shared by the tasks that write disjoint parts of it.
struct SharedOut(*mut bf16);
// SAFETY: the tasks write disjoint elements (see `matmul`) and the buffer outlives them.
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn at(&self, i: usize) -> *mut bf16 {
        // SAFETY: `i` is within the output (checked by the caller's bounds).
        unsafe { self.0.add(i) }
    }
}

/// `A` `[m, k]` packed as [row block][k line][32 rows] lines: a tile (16 rows of one k line)
/// is 16 consecutive lines. Zero beyond `m` and `k`. Row blocks in parallel.
fn pack_a(a: &[bf16], s: Strides, (m, k): (usize, usize), k_lines: usize) -> Vec<Line> {
    let mut packed = vec![ZERO_LINE; m.div_ceil(BLOCK) * k_lines * BLOCK];
    packed
        .par_chunks_mut(k_lines * BLOCK)
        .enumerate()
        // SAFETY: both kernels run only where AVX-512 F/BW/VL is (`Kernel::is_available`).
        .for_each(|(rb, block)| unsafe { pack_a_block(a, s, (m, k), rb, block) });
    packed
}

/// Row block `rb` of [`pack_a`] into `block` (zero-filled, `k_lines × 32` lines).
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")
)]
unsafe fn pack_a_block(
    a: &[bf16],
    s: Strides,
    (m, k): (usize, usize),
    rb: usize,
    block: &mut [Line],
) {
    let rows = rb * BLOCK..((rb + 1) * BLOCK).min(m);
    for (kl, lines) in block.chunks_exact_mut(BLOCK).enumerate() {
        let k0 = kl * TILE_K;
        let len = TILE_K.min(k - k0);
        if s.col == 1 {
            // Rows contiguous: each line a copy of 32 values of one row.
            for (line, i) in lines.iter_mut().zip(rows.clone()) {
                for (v, x) in line
                    .0
                    .iter_mut()
                    .zip(&a[i * s.row + k0..i * s.row + k0 + len])
                {
                    *v = x.to_bits();
                }
            }
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if s.row == 1 && len == TILE_K {
            // Columns contiguous (a transposed view): pairs of rows gathered as u32.
            let mut r = 0;
            while rows.start + r + 1 < rows.end {
                if let Some([even, odd]) = x86::row_pair(a, s.col, rows.start + r, k0) {
                    lines[r] = even;
                    lines[r + 1] = odd;
                    r += 2;
                } else {
                    break;
                }
            }
            for (line, i) in lines[r..].iter_mut().zip(rows.start + r..rows.end) {
                for (j, v) in line.0.iter_mut().enumerate() {
                    *v = a[i + (k0 + j) * s.col].to_bits();
                }
            }
            continue;
        }
        for (line, i) in lines.iter_mut().zip(rows.clone()) {
            for (j, v) in line.0[..len].iter_mut().enumerate() {
                *v = a[i * s.row + (k0 + j) * s.col].to_bits();
            }
        }
    }
}

/// Columns `cols` of `B` `[k, n]` packed in bf16 pairs (the tiles' VNNI layout) as [column
/// block][k line][2 tiles of 16 columns][16 pair rows] lines: line `p` of a tile holds
/// `(B[2p][j], B[2p+1][j])` for its 16 columns `j`. Zero beyond `k` and the columns. Written
/// in order, each line once.
fn pack_b(b: &[bf16], s: Strides, k: usize, cols: Range<usize>, k_lines: usize) -> Vec<Line> {
    let lines = cols.len().div_ceil(BLOCK) * k_lines * BLOCK;
    let mut packed = Vec::with_capacity(lines);
    // SAFETY: both kernels run only where AVX-512 F/BW/VL is (`Kernel::is_available`).
    unsafe { pack_b_lines(b, s, k, cols, k_lines, &mut packed) };
    debug_assert_eq!(packed.len(), lines);
    packed
}

/// The lines of [`pack_b`], pushed onto `packed`.
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")
)]
unsafe fn pack_b_lines(
    b: &[bf16],
    s: Strides,
    k: usize,
    cols: Range<usize>,
    k_lines: usize,
    packed: &mut Vec<Line>,
) {
    let width = cols.len();
    for cb in 0..width.div_ceil(BLOCK) {
        for kl in 0..k_lines {
            for tile in 0..2 {
                let c0 = cb * BLOCK + tile * TILE_ROWS;
                let lanes = width.saturating_sub(c0).min(TILE_ROWS);
                let j0 = cols.start + c0;
                for pair in 0..TILE_K / 2 {
                    let kk = kl * TILE_K + 2 * pair;
                    #[cfg(target_arch = "x86_64")]
                    if lanes == TILE_ROWS && kk + 1 < k {
                        if let Some(line) = x86::pair_line(b, s, kk, j0) {
                            packed.push(line);
                            continue;
                        }
                    }
                    let mut line = ZERO_LINE;
                    for l in 0..lanes {
                        for h in 0..2 {
                            if kk + h < k {
                                line.0[2 * l + h] =
                                    b[(kk + h) * s.row + (j0 + l) * s.col].to_bits();
                            }
                        }
                    }
                    packed.push(line);
                }
            }
        }
    }
}

/// The packers' AVX-512 steps (inlined into their callers, compiled for AVX-512).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Line, Strides, TILE_K, TILE_ROWS};
    use half::bf16;
    use std::arch::x86_64::*;

    /// The gather's element offsets `l · stride` of its 16 lanes; `None` where they overflow
    /// its 32-bit indices.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    unsafe fn lane_offsets(stride: usize) -> Option<__m512i> {
        let step = i32::try_from(stride)
            .ok()
            .filter(|&c| c.checked_mul(TILE_ROWS as i32).is_some())?;
        Some(_mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(step),
        ))
    }

    /// The line `(B[kk][j], B[kk+1][j])` for the 16 columns from `j0` (all inside `B`), from
    /// two contiguous rows or (columns contiguous) as 16 gathered u32; `None` for other
    /// strides.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pair_line(b: &[bf16], s: Strides, kk: usize, j0: usize) -> Option<Line> {
        let mut line = super::ZERO_LINE;
        let out = line.0.as_mut_ptr() as *mut __m512i;
        if s.col == 1 {
            let r0 = &b[kk * s.row + j0..][..TILE_ROWS];
            let r1 = &b[(kk + 1) * s.row + j0..][..TILE_ROWS];
            let lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(r0.as_ptr() as *const __m256i));
            let hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(r1.as_ptr() as *const __m256i));
            _mm512_store_si512(out, _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi)));
            return Some(line);
        }
        if s.row != 1 {
            return None;
        }
        let index = lane_offsets(s.col)?;
        // The last u32 read is B[kk][j0+15], B[kk+1][j0+15]: inside the slice.
        let base = &b[kk + j0 * s.col..kk + (j0 + TILE_ROWS - 1) * s.col + 2];
        let pairs = _mm512_i32gather_epi32::<2>(index, base.as_ptr() as *const i32);
        _mm512_store_si512(out, pairs);
        Some(line)
    }

    /// The lines of rows `i` and `i + 1` of `A` at `k0..k0 + 32`, where `A`'s columns are
    /// contiguous (`A[i][kk]` at `i + kk·col`): 32 gathered u32, each the pair of rows at one
    /// `kk`, split into the two rows. `None` where the offsets overflow the gather's indices.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn row_pair(
        a: &[bf16],
        col: usize,
        i: usize,
        k0: usize,
    ) -> Option<[Line; 2]> {
        let index = lane_offsets(col)?;
        let mut lines = [super::ZERO_LINE; 2];
        for half in 0..2 {
            let kk = k0 + half * TILE_K / 2;
            // The last u32 read is A[i][kk+15], A[i+1][kk+15]: inside the slice.
            let base = &a[i + kk * col..i + (kk + TILE_ROWS - 1) * col + 2];
            let pairs = _mm512_i32gather_epi32::<2>(index, base.as_ptr() as *const i32);
            let even = _mm512_cvtepi32_epi16(pairs);
            let odd = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(pairs));
            let at = half * TILE_K / 2;
            _mm256_storeu_si256(lines[0].0[at..].as_mut_ptr() as *mut __m256i, even);
            _mm256_storeu_si256(lines[1].0[at..].as_mut_ptr() as *mut __m256i, odd);
        }
        Some(lines)
    }
}

#[cfg(target_arch = "x86_64")]
mod hardware {
    use super::{Line, BLOCK, TILE_ROWS};
    use std::arch::asm;

    /// Asks for the AMX tile state if the CPU has AMX-BF16 (CPUID leaf 7: EDX bits 22 and
    /// 24); true when granted.
    pub(super) fn enable() -> bool {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        // Leaf 7 is read only where the CPU reports it (its highest basic leaf is 7 or more).
        let has_amx = __cpuid(0).eax >= 7 && {
            let edx = __cpuid_count(7, 0).edx;
            edx & (1 << 22) != 0 && edx & (1 << 24) != 0
        };
        if !has_amx {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only changes which extended state the
        // kernel lets this process use; it fails cleanly on kernels without AMX support.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    /// Palette 1's tile configuration: 8 tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    /// The tiles configured on this thread, released when dropped.
    pub(super) struct Tiles;

    impl Tiles {
        /// Configures 8 full tiles on the calling thread.
        ///
        /// # Safety
        /// The CPU must have AMX and the process its tile state ([`enable`] returned true).
        pub(super) unsafe fn configure() -> Self {
            let mut config = Config {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                bytes_per_row: [0; 16],
                rows: [0; 16],
            };
            for t in 0..8 {
                config.bytes_per_row[t] = 64;
                config.rows[t] = TILE_ROWS as u8;
            }
            asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
            Tiles
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: the tiles were configured on this thread (each task makes and drops
            // its `Tiles` within one closure, on one thread).
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// One 32 × 32 block of the output into `acc` (row-major, float32): the sum over
    /// `k_lines` steps of A's two row tiles by B's two column tiles.
    ///
    /// # Safety
    /// Tiles configured on this thread ([`Tiles::configure`]); `a` and `b` hold
    /// `k_lines × 32` lines each.
    pub(super) unsafe fn block(
        a: &[Line],
        b: &[Line],
        k_lines: usize,
        acc: &mut [f32; BLOCK * BLOCK],
    ) {
        debug_assert!(a.len() >= k_lines * BLOCK && b.len() >= k_lines * BLOCK);
        let (a, b) = (a.as_ptr(), b.as_ptr());
        let stride = 64usize;
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for kl in 0..k_lines {
            let (a0, b0) = (a.add(kl * BLOCK), b.add(kl * BLOCK));
            let (a1, b1) = (a0.add(TILE_ROWS), b0.add(TILE_ROWS));
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                s = in(reg) stride,
                options(nostack, readonly)
            );
        }
        // C tiles: tmm0 rows 0-15 × columns 0-15, tmm1 columns 16-31, tmm2/tmm3 rows 16-31.
        let c = acc.as_mut_ptr();
        let row_bytes = BLOCK * 4;
        asm!(
            "tilestored [{c00} + {s}*1], tmm0",
            "tilestored [{c01} + {s}*1], tmm1",
            "tilestored [{c10} + {s}*1], tmm2",
            "tilestored [{c11} + {s}*1], tmm3",
            c00 = in(reg) c,
            c01 = in(reg) c.add(TILE_ROWS),
            c10 = in(reg) c.add(TILE_ROWS * BLOCK),
            c11 = in(reg) c.add(TILE_ROWS * BLOCK + TILE_ROWS),
            s = in(reg) row_bytes,
            options(nostack)
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod hardware {
    use super::{Line, BLOCK};

    /// No AMX outside x86-64.
    pub(super) fn enable() -> bool {
        false
    }

    pub(super) struct Tiles;

    impl Tiles {
        pub(super) unsafe fn configure() -> Self {
            unreachable!("AMX is never active outside x86-64")
        }
    }

    pub(super) unsafe fn block(_: &[Line], _: &[Line], _: usize, _: &mut [f32; BLOCK * BLOCK]) {
        unreachable!("AMX is never active outside x86-64")
    }
}
