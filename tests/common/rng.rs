//! A tiny seeded PRNG (SplitMix64) for reproducible chaos: crash moments, traffic mixes. The seed comes
//! from `IDEMPROXY_TEST_SEED` when set, else from the clock, and is always printed so a failing run can be
//! replayed exactly (as far as thread scheduling allows).

use std::time::{SystemTime, UNIX_EPOCH};

/// SplitMix64: small, fast, and good enough for picking test inputs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// `IDEMPROXY_TEST_SEED` (decimal or 0x-hex) or a clock-derived seed; prints it with `what`.
    pub fn from_env(what: &str) -> Rng {
        let seed = match std::env::var("IDEMPROXY_TEST_SEED") {
            Ok(s) => {
                let s = s.trim();
                let parsed = match s.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => s.parse(),
                };
                parsed.unwrap_or_else(|_| panic!("IDEMPROXY_TEST_SEED={s:?} is not a u64"))
            }
            Err(_) => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed),
        };
        eprintln!("[{what}] seed = {seed} (replay with IDEMPROXY_TEST_SEED={seed})");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(hi > lo, "empty range {lo}..{hi}");
        lo + self.next_u64() % (hi - lo)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// A child generator (for a task), deterministic given this one's state.
    pub fn fork(&mut self) -> Rng {
        Rng(self.next_u64())
    }
}
