//! Small deterministic random numbers, keyed by explicit seeds (never by thread or time), so
//! that initialisation, shuffling and augmentation reproduce exactly across runs and layouts.

/// SplitMix64: a small, fast, well-mixed generator for permutations and augmentation keys.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

/// SplitMix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit mixer, also
/// used on its own to derive seeds.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (n > 0), by rejection so that it is unbiased.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// Mixes several keys into one seed.
pub fn mix_seed(keys: &[u64]) -> u64 {
    let mut rng = SplitMix64(0x5EED_C0CA);
    for &k in keys {
        rng.0 ^= k;
        rng.next_u64();
    }
    rng.next_u64()
}

impl SplitMix64 {
    /// Uniform in `[0, 1)` with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A pair of independent standard normals (Box–Muller).
    pub fn normal_pair(&mut self) -> (f64, f64) {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        (r * c, r * s)
    }
}

/// A stable 64-bit hash of a string (FNV-1a), for keying seeds by parameter name.
pub fn hash_str(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
    })
}
