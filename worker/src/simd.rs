//! Which x86 vector-instruction family the hand-written CPU kernels run, chosen at run time.
//!
//! Releases are built for the baseline x86-64 CPU (no `target-cpu=native`: users copy binaries
//! between machines), so the fused ops and AdamW would otherwise run SSE2 code everywhere. Each
//! kernel body is compiled three times by `multiversion!` (AVX-512, AVX2 + FMA, portable) and
//! the best family the CPU has runs. The bodies sum in fixed lanes and fuse a multiply and an
//! add only through [`MulAdd`] (Rust never contracts them): the AVX2 and AVX-512 bodies compute
//! bit-identical results, and the baseline body too except in `ops::math`'s polynomials on x86
//! (within an ulp there); the tests force each available family and compare.
//!
//! `COCA_CPU_KERNELS=avx512|avx2|portable` forces a family (for measurements and tests); a
//! family the CPU lacks falls back to the best it has, with a warning. candle's matrix products
//! (the `gemm` crate) choose their own kernels at run time: [`gemm_family`] says which, and
//! [`bf16_product_kernels`] whether bf16 products run on AMX tiles, AVX-512 BF16 or widened.

use std::sync::OnceLock;

/// A family of vector instructions the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelFamily {
    /// Baseline x86-64 (SSE2) or any other architecture.
    Portable,
    /// AVX2 with FMA (Haswell, Zen 1 and later).
    Avx2,
    /// AVX-512 F/BW/VL (Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4 and later).
    Avx512,
}

impl KernelFamily {
    /// Every family, slowest first.
    pub const ALL: [KernelFamily; 3] = [Self::Portable, Self::Avx2, Self::Avx512];

    /// The name used in `COCA_CPU_KERNELS` and in `bench`'s report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the family.
    pub fn is_available(self) -> bool {
        match self {
            Self::Portable => true,
            Self::Avx2 => has_avx2(),
            Self::Avx512 => has_avx512(),
        }
    }

    /// The best family this CPU runs.
    pub fn detected() -> Self {
        Self::ALL
            .into_iter()
            .rev()
            .find(|f| f.is_available())
            .unwrap_or(Self::Portable)
    }

    /// The families this CPU runs, slowest first (what the tests compare).
    pub fn available() -> Vec<Self> {
        Self::ALL.into_iter().filter(|f| f.is_available()).collect()
    }

    /// The family the kernels use in this process: `COCA_CPU_KERNELS` if set (and available),
    /// else [`Self::detected`]. Decided once.
    pub fn active() -> Self {
        static ACTIVE: OnceLock<KernelFamily> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let Ok(requested) = std::env::var("COCA_CPU_KERNELS") else {
                return Self::detected();
            };
            match Self::ALL
                .into_iter()
                .find(|f| f.name() == requested.to_ascii_lowercase())
            {
                Some(f) if f.is_available() => f,
                Some(f) => {
                    tracing::warn!(
                        "COCA_CPU_KERNELS={requested}: this CPU has no {}; using {}",
                        f.name(),
                        Self::detected().name()
                    );
                    Self::detected()
                }
                None => {
                    tracing::warn!(
                        "COCA_CPU_KERNELS={requested} is not one of avx512, avx2, portable; \
                         using {}",
                        Self::detected().name()
                    );
                    Self::detected()
                }
            }
        })
    }
}

/// Whether the CPU has AVX2 and FMA (checked once by the standard library, then cached).
#[inline(always)]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has the AVX-512 subsets the kernels are compiled for (and AVX2/FMA).
#[inline(always)]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return has_avx2()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernels candle's float32 matrix products run here: the `gemm` crate picks AVX-512 when
/// `avx512f` is present and this build has its AVX-512 kernels (the `avx512-products`
/// feature, on by default), else FMA, else scalar code.
pub fn gemm_family() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512-products") && std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "avx2";
        }
    }
    "portable"
}

/// How candle's bf16 matrix products run here (vendored candle change 12): `amx` on Intel AMX
/// tiles, `avx512bf16` on AVX-512 BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake),
/// else `widened` (float32 `gemm` on widened operands). `COCA_CPU_KERNELS` below `avx512`,
/// `COCA_CPU_BF16_PRODUCTS` and `COCA_CPU_AMX=0` hold it lower.
pub fn bf16_product_kernels() -> &'static str {
    candle_core::cpu_backend::amx::active().map_or("widened", |k| k.name())
}

/// Warns about a `COCA_CPU_BF16_PRODUCTS` that names no kernel (it is then ignored, as an
/// unknown `COCA_CPU_KERNELS` is); the worker calls it once at start.
pub fn warn_on_unknown_bf16_products() {
    use candle_core::cpu_backend::amx::parse_cap;
    if let Ok(value) = std::env::var("COCA_CPU_BF16_PRODUCTS") {
        if parse_cap(&value).is_none() {
            tracing::warn!(
                "COCA_CPU_BF16_PRODUCTS={value} is not one of amx, avx512bf16, widened; ignored"
            );
        }
    }
}

/// The CPU's model name (`/proc/cpuinfo`), for benchmark reports.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

/// How a kernel family evaluates `a · b + c` in the polynomials of `ops::math`: rounded once
/// ([`Fused`]) where the family has an FMA instruction, twice ([`Separate`]) where a fused
/// multiply-add would be a libm call per operation (the baseline body on x86: forced there on
/// an Intel Xeon, the calls made the B-32 embedding 1.9× slower).
pub trait MulAdd {
    /// Whether `a · b + c` is rounded once.
    const FUSED: bool;
    /// `a · b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// `a · b + c` rounded once: the AVX2 and AVX-512 bodies' FMA instruction.
pub struct Fused;

impl MulAdd for Fused {
    const FUSED: bool = true;
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// `a · b + c` as a multiply and an add, each rounded (Rust never contracts them).
pub struct Separate;

impl MulAdd for Separate {
    const FUSED: bool = false;
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// The baseline body's [`MulAdd`]: fused where every CPU of the target has FMA (aarch64, or a
/// build for x86 CPUs with it), separate elsewhere.
#[cfg(any(target_arch = "aarch64", target_feature = "fma"))]
pub type BaselineMulAdd = Fused;
/// The baseline body's [`MulAdd`]: fused where every CPU of the target has FMA (aarch64, or a
/// build for x86 CPUs with it), separate elsewhere.
#[cfg(not(any(target_arch = "aarch64", target_feature = "fma")))]
pub type BaselineMulAdd = Separate;

/// Defines `fn NAME(family: KernelFamily, args...)` that runs `body` compiled for `family`'s
/// instructions (AVX-512, AVX2 + FMA or baseline), falling back to a family the CPU has.
///
/// The body must be plain safe code over its arguments; it is compiled once per family, so
/// loops over fixed-width lane arrays vectorise to each family's registers. It is generic over
/// `M:` [`MulAdd`], the family's way of multiplying and adding, which it passes to the
/// polynomials of `ops::math` (`exp::<M>(x)`): [`Fused`] in the AVX2 and AVX-512 bodies,
/// [`BaselineMulAdd`] in the baseline one.
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(family: $crate::simd::KernelFamily, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments, clippy::extra_unused_type_parameters)]
            fn body<M: $crate::simd::MulAdd>($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                body::<$crate::simd::Fused>($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                body::<$crate::simd::Fused>($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            {
                if family >= $crate::simd::KernelFamily::Avx512 && $crate::simd::has_avx512() {
                    // SAFETY: the CPU has every feature `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if family >= $crate::simd::KernelFamily::Avx2 && $crate::simd::has_avx2() {
                    // SAFETY: the CPU has every feature `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            let _ = family;
            body::<$crate::simd::BaselineMulAdd>($($arg),*)
        }
    };
}

/// Partial sums per reduction in the kernels: `Σ x[i]` adds element `i` to lane `i mod LANES`
/// in order, then folds the lanes as [`sum_lanes`] does. One AVX-512 register, two AVX2 ones:
/// vectorised in every family without reassociating anything, so all families agree bit for bit.
pub const LANES: usize = 16;

/// The lanes' sum as a fixed tree: `l[i] + l[i+8]`, then `(a0+a4, a1+a5, a2+a6, a3+a7)`, then
/// `(s0+s2, s1+s3)`, then `t0+t1` (how two AVX2 registers are reduced in four steps).
#[inline(always)]
pub fn sum_lanes(l: [f32; LANES]) -> f32 {
    let a: [f32; 8] = std::array::from_fn(|i| l[i] + l[i + 8]);
    let s = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let t = [s[0] + s[2], s[1] + s[3]];
    t[0] + t[1]
}

/// `Σ f(x[i])`, summed in lanes as described at [`LANES`].
#[inline(always)]
pub fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(c) {
            *lane += f(*v);
        }
    }
    for (lane, v) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane += f(*v);
    }
    sum_lanes(lanes)
}

/// `Σ f(a[i], b[i])` over the shorter length, summed in lanes as described at [`LANES`].
#[inline(always)]
pub fn lane_sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (ca, cb) in (&mut ca).zip(&mut cb) {
        for (lane, (x, y)) in lanes.iter_mut().zip(ca.iter().zip(cb)) {
            *lane += f(*x, *y);
        }
    }
    for (lane, (x, y)) in lanes
        .iter_mut()
        .zip(ca.remainder().iter().zip(cb.remainder()))
    {
        *lane += f(*x, *y);
    }
    sum_lanes(lanes)
}

/// `Σ f(a[i], b[i], c[i])` over the shortest length, summed in lanes as described at [`LANES`].
#[inline(always)]
pub fn lane_sum3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut lanes = [0f32; LANES];
    let full = n / LANES * LANES;
    for k in (0..full).step_by(LANES) {
        let (a, b, c) = (&a[k..k + LANES], &b[k..k + LANES], &c[k..k + LANES]);
        for l in 0..LANES {
            lanes[l] += f(a[l], b[l], c[l]);
        }
    }
    for (l, i) in (full..n).enumerate() {
        lanes[l] += f(a[i], b[i], c[i]);
    }
    sum_lanes(lanes)
}

/// The largest of `x` (−∞ for an empty slice), in lanes (max is exact in any order).
#[inline(always)]
pub fn lane_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(c) {
            *lane = lane.max(*v);
        }
    }
    for (lane, v) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane = lane.max(*v);
    }
    lanes.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    multiversion! {
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            lane_sum2(a, b, |x, y| x * y)
        }
    }

    #[test]
    fn every_available_family_sums_bit_for_bit_alike() {
        let a: Vec<f32> = (0..1003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let b: Vec<f32> = (0..1003)
            .map(|i| ((i * 11 % 97) as f32 - 48.0) * 0.021)
            .collect();
        let reference = dot(KernelFamily::Portable, &a, &b);
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!(
            (reference as f64 - exact).abs() < 1e-3,
            "{reference} vs {exact}"
        );
        for family in KernelFamily::available() {
            assert_eq!(
                dot(family, &a, &b).to_bits(),
                reference.to_bits(),
                "{family:?}"
            );
        }
        // A family the CPU lacks falls back instead of faulting.
        assert_eq!(
            dot(KernelFamily::Avx512, &a, &b).to_bits(),
            reference.to_bits()
        );
    }

    #[test]
    fn lane_max_and_detection_agree_with_plain_code() {
        let x: Vec<f32> = (0..37).map(|i| ((i * 13 % 29) as f32).sin()).collect();
        assert_eq!(
            lane_max(&x),
            x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        );
        assert_eq!(lane_max(&[]), f32::NEG_INFINITY);
        assert!(KernelFamily::available().contains(&KernelFamily::detected()));
        assert!(KernelFamily::active().is_available());
        eprintln!(
            "CPU: {}; kernels available: {:?}; gemm: {}",
            cpu_model(),
            KernelFamily::available(),
            gemm_family()
        );
    }
}
