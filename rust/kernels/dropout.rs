//! Dropout with a counter-based mask: element `i` is kept when `hash(seed, i) >= p * 2^32`, so
//! the mask is a pure function of `(seed, i)`. The forward and the backward are then the same
//! operation (`y = x * keep * 1/(1-p)`), the backward regenerates the mask instead of storing
//! it (no mask tensor kept for autograd), and any split of the elements over threads gives the
//! same result.
//!
//! Performance note: torch's CPU dropout (`bernoulli_` then a multiply) measured 22.5 ms for
//! 2.6M float32 elements on this machine (8.6 ns per element, against 0.6 ms for a plain
//! multiply); in a seq2seq Transformer training step it was 20% of the time. The hash here is
//! two rounds of murmur3's 32-bit finaliser (a bijection with full avalanche) over the element
//! index mixed with the seed's halves, written as a plain loop over 32-bit lanes so the
//! compiler vectorises it (AVX2: 8 lanes), one chunk of 16K elements per work item.

use super::team::{self, Shared};
use super::Float;

/// murmur3's 32-bit finaliser.
#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The 32 random bits of element `i` under `seed`.
#[inline(always)]
pub fn bits(seed: u64, i: u64) -> u32 {
    let lo = seed as u32 ^ ((i >> 32) as u32).wrapping_mul(0x9e37_79b9);
    let hi = (seed >> 32) as u32;
    fmix32(fmix32(i as u32 ^ lo) ^ hi)
}

/// The keep threshold for drop probability `p` in [0, 1): kept iff `bits >= threshold`.
pub fn threshold(p: f64) -> u32 {
    let t = (p.clamp(0.0, 1.0) * 4_294_967_296.0).round();
    if t >= 4_294_967_295.0 {
        u32::MAX
    } else {
        t as u32
    }
}

const CHUNK: usize = 1 << 14;

/// One chunk, dispatched to an AVX2 build of the same code when the CPU has it (the crate's
/// baseline is SSE2, which has no 32-bit vector multiply: 2.3 ms for 2.6M elements scalar).
fn apply_chunk<T: Float>(x: &[T], out: &mut [T], start: u64, seed: u64, t: u32, scale: T) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { apply_chunk_avx2(x, out, start, seed, t, scale) };
        return;
    }
    apply_chunk_body(x, out, start, seed, t, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_chunk_avx2<T: Float>(
    x: &[T],
    out: &mut [T],
    start: u64,
    seed: u64,
    t: u32,
    scale: T,
) {
    apply_chunk_body(x, out, start, seed, t, scale)
}

#[inline(always)]
fn apply_chunk_body<T: Float>(x: &[T], out: &mut [T], start: u64, seed: u64, t: u32, scale: T) {
    // The high part of the index is constant inside a chunk unless it crosses 2^32; the
    // generic path handles that (rare) case.
    let lo = seed as u32 ^ ((start >> 32) as u32).wrapping_mul(0x9e37_79b9);
    let hi = (seed >> 32) as u32;
    if (start >> 32) == ((start + x.len() as u64) >> 32) {
        // Two vectorisable passes per block of 64: the hashes (integer lanes), then the select.
        let mut h = [0u32; 64];
        let mut base = start as u32;
        for (xb, ob) in x.chunks(64).zip(out.chunks_mut(64)) {
            for (k, hk) in h.iter_mut().enumerate() {
                *hk = fmix32(fmix32(base.wrapping_add(k as u32) ^ lo) ^ hi);
            }
            for ((o, &v), &hk) in ob.iter_mut().zip(xb).zip(h.iter()) {
                *o = if hk >= t { v * scale } else { T::ZERO };
            }
            base = base.wrapping_add(64);
        }
    } else {
        for (k, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            *o = if bits(seed, start + k as u64) >= t { v * scale } else { T::ZERO };
        }
    }
}

/// `out[i] = x[i] / (1 - p)` where element `i` is kept under `seed`, else 0 (`p` in [0, 1)).
/// The same call on the output's gradient is the backward.
pub fn apply<T: Float>(x: &[T], out: &mut [T], p: f64, seed: u64, threads: usize) {
    debug_assert_eq!(x.len(), out.len());
    let t = threshold(p);
    let scale = T::from_f64(1.0 / (1.0 - p));
    let n = x.len();
    let chunks = n.div_ceil(CHUNK);
    if chunks <= 1 || threads <= 1 {
        apply_chunk(x, out, 0, seed, t, scale);
        return;
    }
    let dst = Shared(out.as_mut_ptr());
    team::for_each(threads, chunks, |c| {
        let s = c * CHUNK;
        let e = (s + CHUNK).min(n);
        // SAFETY: chunk c covers [s, e) inside `out`, and each chunk index is handed out once.
        let o = unsafe { dst.slice(s, e - s) };
        apply_chunk(&x[s..e], o, s as u64, seed, t, scale);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_right_fraction_and_scales() {
        for &p in &[0.1, 0.5, 0.9] {
            let n = 200_000;
            let x = vec![1.0f32; n];
            let mut y = vec![0.0f32; n];
            apply(&x, &mut y, p, 42, 2);
            let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
            assert!((kept - (1.0 - p)).abs() < 0.005, "p={p} kept={kept}");
            let s = (1.0 / (1.0 - p)) as f32;
            assert!(y.iter().all(|&v| v == 0.0 || v == s));
        }
    }

    #[test]
    fn same_seed_same_mask_any_threads_and_chunk_edges() {
        let n = 3 * CHUNK + 17;
        let x: Vec<f64> = (0..n).map(|i| i as f64 + 1.0).collect();
        let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
        apply(&x, &mut a, 0.3, 7, 1);
        apply(&x, &mut b, 0.3, 7, 2);
        assert_eq!(a, b);
        for (i, (&v, &y)) in x.iter().zip(&a).enumerate() {
            assert_eq!(y != 0.0, bits(7, i as u64) >= threshold(0.3));
            if y != 0.0 {
                assert!((y - v / 0.7).abs() < 1e-9);
            }
        }
        apply(&x, &mut b, 0.3, 8, 2);
        assert_ne!(a, b);
    }

    #[test]
    fn neighbours_are_independent() {
        // Adjacent keep decisions should agree as often as independent coins would.
        let n = 400_000u64;
        let t = threshold(0.5);
        let keep: Vec<bool> = (0..n).map(|i| bits(3, i) >= t).collect();
        let same = keep.windows(2).filter(|w| w[0] == w[1]).count() as f64 / (n - 1) as f64;
        assert!((same - 0.5).abs() < 0.005, "{same}");
        // Indices past 2^32 use the high bits too.
        assert_ne!(bits(3, 5), bits(3, 5 + (1u64 << 32)));
    }
}
