//! Single-token attention against KV caches of different lengths (generation).
//!
//! Memory-bound: every cached key and value is read once per call. The work is split into
//! (batch, kv head, chunk of the cache) tasks so both cores stream the cache even at batch 1;
//! the query heads that share a kv head (GQA) are handled together so K/V are read once for
//! the group. Each task keeps a partial (max, sum, weighted values) per query head over blocks
//! of 32 keys (one rescale per block), and the partials are merged with their log-sum-exps.
//! Compiled a second time with AVX2+FMA and chosen at run time.
//!
//! The caches may hold float16 ([`KvElem`]): each block of 32 keys and values is converted to
//! f32 once (F16C through the `half` crate where the CPU has it, a scalar conversion elsewhere)
//! and shared by the query heads of the group, so a float16 cache streams half the bytes.

use super::Float;
use crate::{Error, Result};
use half::slice::HalfFloatSliceExt;

/// An element of a KV cache read and written in float type `T`: `T` itself, or `half::f16`
/// (converted to and from f32).
pub trait KvElem<T>: Copy + Send + Sync + 'static {
    /// `src` as `T` values: `src` itself, or its conversion written into `buf`.
    fn view<'a>(src: &'a [Self], buf: &'a mut Vec<T>) -> &'a [T];
    /// Stores `src` into `dst` (same length), rounding to the element type.
    fn store(src: &[T], dst: &mut [Self]);
}

impl<T: Float> KvElem<T> for T {
    #[inline(always)]
    fn view<'a>(src: &'a [T], _buf: &'a mut Vec<T>) -> &'a [T] {
        src
    }

    #[inline(always)]
    fn store(src: &[T], dst: &mut [T]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem<f32> for half::f16 {
    #[inline(always)]
    fn view<'a>(src: &'a [half::f16], buf: &'a mut Vec<f32>) -> &'a [f32] {
        buf.resize(src.len(), 0.0);
        src.convert_to_f32_slice(buf);
        buf
    }

    #[inline(always)]
    fn store(src: &[f32], dst: &mut [half::f16]) {
        dst.convert_from_f32_slice(src);
    }
}

/// Shapes of a decode call: q `(B, Hq, D)`, caches `(B, Hk, L, D)` / `(B, Hk, L, Dv)`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub b: usize,
    pub hq: usize,
    pub hk: usize,
    pub l: usize,
    pub d: usize,
    pub dv: usize,
}

const BLOCK: usize = 32;

#[inline(always)]
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = T::ZERO;
    for (x, y) in ra.iter().zip(rb) {
        s += *x * *y;
    }
    for v in acc {
        s += v;
    }
    s
}

/// A partial result over one chunk of the cache for one query head.
#[derive(Clone)]
struct Partial<T> {
    m: T,
    l: T,
    acc: Vec<T>,
}

#[inline(always)]
fn chunk<T: Float, K: KvElem<T>>(
    qs: &[&[T]],
    k: &[K],
    v: &[K],
    keys: (usize, usize),
    d: usize,
    dv: usize,
    scale: T,
) -> Vec<Partial<T>> {
    let (j0, j1) = keys;
    let neg_inf = T::from_f64(f64::NEG_INFINITY);
    let mut parts: Vec<Partial<T>> =
        qs.iter().map(|_| Partial { m: neg_inf, l: T::ZERO, acc: vec![T::ZERO; dv] }).collect();
    let mut s = [T::ZERO; BLOCK];
    let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
    let mut b0 = j0;
    while b0 < j1 {
        let b1 = (b0 + BLOCK).min(j1);
        // This block's keys and values as T, indexed from b0 (converted once for the group).
        let kb = K::view(&k[b0 * d..b1 * d], &mut kbuf);
        let vb = K::view(&v[b0 * dv..b1 * dv], &mut vbuf);
        for (qh, part) in qs.iter().zip(parts.iter_mut()) {
            let mut bm = neg_inf;
            for j in b0..b1 {
                let x = dot(qh, &kb[(j - b0) * d..(j - b0 + 1) * d]) * scale;
                s[j - b0] = x;
                if x > bm {
                    bm = x;
                }
            }
            let m_new = if bm > part.m { bm } else { part.m };
            if m_new > part.m && part.l > T::ZERO {
                let c = (part.m - m_new).exp();
                part.l = part.l * c;
                for a in part.acc.iter_mut() {
                    *a = *a * c;
                }
            }
            part.m = m_new;
            // The block's exps in one vector pass instead of a libm call per key (the call
            // stays memory-bound: 22-27 GB/s either way, measured), then the weighted values.
            part.l += T::exp_sub_sum(&mut s[..b1 - b0], m_new);
            for j in b0..b1 {
                let p = s[j - b0];
                for (a, &x) in part.acc.iter_mut().zip(&vb[(j - b0) * dv..(j - b0 + 1) * dv]) {
                    *a += p * x;
                }
            }
        }
        b0 = b1;
    }
    parts
}

/// [`chunk`] compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA (`simd::has_avx2_fma`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2<T: Float, K: KvElem<T>>(
    qs: &[&[T]],
    k: &[K],
    v: &[K],
    keys: (usize, usize),
    d: usize,
    dv: usize,
    scale: T,
) -> Vec<Partial<T>> {
    chunk(qs, k, v, keys, d, dv, scale)
}

/// `o (B, Hq, Dv)`: query b attends to the first `lengths[b]` cached keys (0 gives zeros).
pub fn decode<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    lengths: &[usize],
    sh: Shape,
    scale: T,
    threads: usize,
) -> Result<Vec<T>> {
    decode_kv(q, k, v, lengths, sh, scale, threads)
}

/// [`decode`] over caches of element type `K` (`T` itself, or float16 for f32 queries).
pub fn decode_kv<T: Float, K: KvElem<T>>(
    q: &[T],
    k: &[K],
    v: &[K],
    lengths: &[usize],
    sh: Shape,
    scale: T,
    threads: usize,
) -> Result<Vec<T>> {
    if sh.hk == 0 || !sh.hq.is_multiple_of(sh.hk) {
        return Err(Error::value(format!(
            "kv heads ({}) must divide query heads ({})",
            sh.hk, sh.hq
        )));
    }
    if q.len() != sh.b * sh.hq * sh.d
        || k.len() != sh.b * sh.hk * sh.l * sh.d
        || v.len() != sh.b * sh.hk * sh.l * sh.dv
    {
        return Err(Error::value("q, k_cache or v_cache has the wrong number of elements"));
    }
    if lengths.len() != sh.b {
        return Err(Error::value(format!(
            "cache_lengths has {} entries, expected {}",
            lengths.len(),
            sh.b
        )));
    }
    if let Some(&bad) = lengths.iter().find(|&&x| x > sh.l) {
        return Err(Error::value(format!(
            "cache length {bad} exceeds the cache's capacity {}",
            sh.l
        )));
    }
    if sh.b == 0 || sh.hq == 0 || sh.dv == 0 {
        return Ok(vec![T::ZERO; sh.b * sh.hq * sh.dv]);
    }
    let group = sh.hq / sh.hk;
    // Enough chunks that both cores stream even at batch 1; at least 256 keys each.
    let pairs = sh.b * sh.hk;
    let chunks = if pairs >= 2 * threads { 1 } else { (2 * threads).div_ceil(pairs).max(1) };
    let tasks: Vec<(usize, usize)> =
        (0..pairs).flat_map(|p| (0..chunks).map(move |c| (p, c))).collect();
    let use_avx2 = super::simd::has_avx2_fma();
    let slots: Vec<std::sync::Mutex<Vec<Partial<T>>>> =
        tasks.iter().map(|_| std::sync::Mutex::new(Vec::new())).collect();
    let work = |&(p, c): &(usize, usize)| -> Vec<Partial<T>> {
        let b = p / sh.hk;
        let len = lengths[b];
        let per = len.div_ceil(chunks).max(256.min(len.max(1)));
        let (j0, j1) = ((c * per).min(len), ((c + 1) * per).min(len));
        let qs: Vec<&[T]> =
            (0..group).map(|g| &q[(p * group + g) * sh.d..(p * group + g + 1) * sh.d]).collect();
        let kh = &k[p * sh.l * sh.d..(p + 1) * sh.l * sh.d];
        let vh = &v[p * sh.l * sh.dv..(p + 1) * sh.l * sh.dv];
        #[cfg(target_arch = "x86_64")]
        if use_avx2 {
            // SAFETY: AVX2 and FMA are present (checked once above).
            return unsafe { chunk_avx2(&qs, kh, vh, (j0, j1), sh.d, sh.dv, scale) };
        }
        let _ = use_avx2;
        chunk(&qs, kh, vh, (j0, j1), sh.d, sh.dv, scale)
    };
    // On the shared kernel team (torch's OpenMP threads when loaded: no core lost to their
    // spinning between a model's torch ops and this call).
    super::team::for_each(threads, tasks.len(), |i| {
        let r = work(&tasks[i]);
        *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = r;
    });
    let partials: Vec<Vec<Partial<T>>> =
        slots.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).collect();
    let mut o = vec![T::ZERO; sh.b * sh.hq * sh.dv];
    let neg_inf = T::from_f64(f64::NEG_INFINITY);
    for p in 0..pairs {
        for g in 0..group {
            let parts: Vec<&Partial<T>> =
                (0..chunks).map(|c| &partials[p * chunks + c][g]).collect();
            let m = parts.iter().map(|x| x.m).fold(neg_inf, |a, b| if b > a { b } else { a });
            if !(m > neg_inf) {
                continue; // no keys: zeros
            }
            let out = &mut o[(p * group + g) * sh.dv..(p * group + g + 1) * sh.dv];
            let mut l = T::ZERO;
            for part in parts {
                if !(part.m > neg_inf) {
                    continue;
                }
                let c = (part.m - m).exp();
                l += part.l * c;
                for (a, &x) in out.iter_mut().zip(&part.acc) {
                    *a += x * c;
                }
            }
            let inv = T::ONE / l;
            for a in out.iter_mut() {
                *a = *a * inv;
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_full_attention_on_the_last_position() {
        let sh = Shape { b: 3, hq: 4, hk: 2, l: 700, d: 16, dv: 8 };
        let mut rng = crate::testutil::Lcg(5);
        let mut r = |n: usize| rng.uniform(n);
        let (q, k, v) = (r(3 * 4 * 16), r(3 * 2 * 700 * 16), r(3 * 2 * 700 * 8));
        let lengths = [700usize, 1, 0];
        let o = crate::parallel::install(2, || decode(&q, &k, &v, &lengths, sh, 0.25, 2)).unwrap();
        for b in 0..3 {
            for h in 0..4 {
                let kvh = b * 2 + h / 2;
                let qh = &q[(b * 4 + h) * 16..(b * 4 + h + 1) * 16];
                let s: Vec<f64> = (0..lengths[b])
                    .map(|j| {
                        0.25 * (0..16).map(|c| qh[c] * k[(kvh * 700 + j) * 16 + c]).sum::<f64>()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for c in 0..8 {
                    let want = if lengths[b] == 0 {
                        0.0
                    } else {
                        s.iter()
                            .enumerate()
                            .map(|(j, x)| (x - m).exp() / z * v[(kvh * 700 + j) * 8 + c])
                            .sum::<f64>()
                    };
                    let got = o[(b * 4 + h) * 8 + c];
                    assert!((got - want).abs() < 1e-12, "b{b} h{h} c{c}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn float16_caches_equal_f32_caches_holding_the_same_values() {
        // Values rounded to f16 first: the f16 cache and an f32 cache of the rounded values hold
        // the same numbers, so the two results differ only by summation order (none here).
        use half::f16;
        let sh = Shape { b: 2, hq: 4, hk: 2, l: 300, d: 16, dv: 16 };
        let mut rng = crate::testutil::Lcg(9);
        let q: Vec<f32> = rng.uniform(2 * 4 * 16).iter().map(|&x| x as f32).collect();
        let kv = |rng: &mut crate::testutil::Lcg| -> (Vec<f16>, Vec<f32>) {
            let h: Vec<f16> =
                rng.uniform(2 * 2 * 300 * 16).iter().map(|&x| f16::from_f64(x * 3.0)).collect();
            let f = h.iter().map(|x| x.to_f32()).collect();
            (h, f)
        };
        let ((kh, kf), (vh, vf)) = (kv(&mut rng), kv(&mut rng));
        let lengths = [300usize, 33];
        let a = crate::parallel::install(2, || {
            decode_kv::<f32, f16>(&q, &kh, &vh, &lengths, sh, 0.25, 2)
        })
        .unwrap();
        let b =
            crate::parallel::install(2, || decode(&q, &kf, &vf, &lengths, sh, 0.25, 2)).unwrap();
        assert_eq!(a, b);
        let mut out = vec![f16::ZERO; 3];
        <f16 as KvElem<f32>>::store(&[1.0, 65504.0, 1e-8], &mut out);
        assert_eq!(out, [f16::ONE, f16::MAX, f16::ZERO]);
    }
}
