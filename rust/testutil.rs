//! Helpers shared by the unit tests: a tiny deterministic generator (no rand dependency, the
//! same stream on every machine).

/// A 64-bit linear congruential generator (Knuth's MMIX constants).
pub struct Lcg(pub u64);

impl Lcg {
    fn step(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0
    }

    /// The next 31 high bits.
    pub fn next_u31(&mut self) -> u64 {
        self.step() >> 33
    }

    /// `n` values uniform in [-0.5, 0.5).
    pub fn uniform(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| ((self.step() >> 11) as f64 / (1u64 << 53) as f64) - 0.5).collect()
    }
}
