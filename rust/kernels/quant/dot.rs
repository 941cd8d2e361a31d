//! Dot products of one weight row with one or four quantized activation rows, per ISA:
//! scalar, AVX2 (`maddubs` + `madd`, Q8_0 through the sign trick) and AVX-512 VNNI
//! (`vpdpbusd` on 256-bit vectors, Q8_0 shifted to unsigned by +128 and corrected with the
//! stored activation sums). Chosen at run time ([`Isa::detect`]); `FERROLM_QUANT_ISA` or an
//! explicit [`Isa`] forces a path (tests force each one).

use super::blocks::group;
use super::{ActRow, QType};

/// An instruction-set path of the quantized kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Isa {
    /// The best path this CPU runs, unless `FERROLM_QUANT_ISA` (scalar, avx2, avx512vnni)
    /// asks for a lower one.
    pub fn detect() -> Isa {
        let best = Isa::best();
        match std::env::var("FERROLM_QUANT_ISA").ok().and_then(|s| Isa::from_name(&s)) {
            Some(want) if want.available() => want,
            _ => best,
        }
    }

    fn best() -> Isa {
        if Isa::Avx512Vnni.available() {
            Isa::Avx512Vnni
        } else if Isa::Avx2.available() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    pub fn from_name(s: &str) -> Option<Isa> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512vnni" | "avx512" | "vnni" => Some(Isa::Avx512Vnni),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            match self {
                Isa::Scalar => true,
                Isa::Avx2 => avx2,
                Isa::Avx512Vnni => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vl")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }
}

/// The integer part of `w · x` per half-group of 16 (`Σ code·q`, Q8_0's codes signed), as
/// path `isa` computes it: equal across paths, bit for bit (the tests' handle on the paths).
pub fn group_sums(isa: Isa, qt: QType, w: &[u8], x: ActRow<'_>) -> Vec<i32> {
    assert!(isa.available(), "{} is not available on this CPU", isa.name());
    let groups = x.qs.len() / 32;
    let mut out = vec![0i32; groups * 2];
    let (bb, gpb) = (qt.block_bytes(), qt.block_values() / 32);
    for gi in 0..groups {
        let block = &w[(gi / gpb) * bb..(gi / gpb + 1) * bb];
        let q = &x.qs[gi * 32..gi * 32 + 32];
        let s = match isa {
            Isa::Scalar => scalar_sums(qt, block, gi % gpb, q),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available` checked the features; `block` and `q` hold whole groups.
            Isa::Avx2 => unsafe { avx2::sums(qt, block, gi % gpb, q) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx512Vnni => unsafe {
                let mut s = vnni::sums(qt, block, gi % gpb, q);
                if qt == QType::Q8_0 {
                    // The VNNI path multiplies w + 128: take 128·Σq back out.
                    s[0] -= 128 * x.sums[2 * gi];
                    s[1] -= 128 * x.sums[2 * gi + 1];
                }
                s
            },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!(),
        };
        out[2 * gi..2 * gi + 2].copy_from_slice(&s);
    }
    out
}

fn scalar_sums(qt: QType, block: &[u8], g: usize, q: &[i8]) -> [i32; 2] {
    let mut u = [0u8; 32];
    group(qt, block, g, &mut u);
    let mut s = [0i32; 2];
    for i in 0..32 {
        let code = if qt == QType::Q8_0 { u[i] as i8 as i32 } else { u[i] as i32 };
        s[i / 16] += code * q[i] as i32;
    }
    s
}

/// Panics unless `w` is whole blocks and the activation row covers them (the SIMD paths read
/// by pointer: this check is what keeps them inside the row).
#[inline(always)]
fn fits(qt: QType, w: &[u8], x: &ActRow<'_>) {
    let groups = w.len() / qt.block_bytes() * (qt.block_values() / 32);
    assert!(
        w.len().is_multiple_of(qt.block_bytes())
            && x.qs.len() >= groups * 32
            && x.scales.len() >= groups
            && x.sums.len() >= groups * 2
            && x.spread.len() >= groups * 8,
        "weight row and activation row disagree"
    );
}

/// `w · x` for one weight row and one activation row.
#[inline]
pub fn dot1(isa: Isa, qt: QType, w: &[u8], x: ActRow<'_>) -> f32 {
    fits(qt, w, &x);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` came from `Isa::detect` or was checked `available`; the row lengths
        // match (the caller checked the shapes).
        Isa::Avx2 => unsafe { avx2::dot::<1>(qt, w, [x])[0] },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { vnni::dot::<1>(qt, w, [x])[0] },
        _ => scalar_dot::<1>(qt, w, [x])[0],
    }
}

/// `w · x_r` for one weight row and four activation rows (each weight group unpacked once).
#[inline]
pub fn dot4(isa: Isa, qt: QType, w: &[u8], x: &[ActRow<'_>; 4]) -> [f32; 4] {
    x.iter().for_each(|r| fits(qt, w, r));
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot1`.
        Isa::Avx2 => unsafe { avx2::dot::<4>(qt, w, *x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot1`.
        Isa::Avx512Vnni => unsafe { vnni::dot::<4>(qt, w, *x) },
        _ => scalar_dot::<4>(qt, w, *x),
    }
}

fn scalar_dot<const R: usize>(qt: QType, w: &[u8], x: [ActRow<'_>; R]) -> [f32; R] {
    let (bb, gpb) = (qt.block_bytes(), qt.block_values() / 32);
    let mut acc = [0f32; R];
    let mut u = [0u8; 32];
    for (bi, block) in w.chunks_exact(bb).enumerate() {
        for g in 0..gpb {
            let gi = bi * gpb + g;
            let (a, b) = group(qt, block, g, &mut u);
            for r in 0..R {
                let q = &x[r].qs[gi * 32..gi * 32 + 32];
                let mut s = [0i32; 2];
                for i in 0..32 {
                    let code = if qt == QType::Q8_0 { u[i] as i8 as i32 } else { u[i] as i32 };
                    s[i / 16] += code * q[i] as i32;
                }
                let (sx0, sx1) = (x[r].sums[2 * gi] as f32, x[r].sums[2 * gi + 1] as f32);
                acc[r] += x[r].scales[gi]
                    * ((a[0] * s[0] as f32 + b[0] * sx0) + (a[1] * s[1] as f32 + b[1] * sx1));
            }
        }
    }
    acc
}

/// The AVX2 and VNNI paths share everything but the byte product: unpacking a group into 32
/// codes in one 256-bit register, and the per-group float update. The block type is a const
/// parameter (`T`: the index in [`QType::ALL`]) so each type's loop is compiled on its own.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_path {
    ($features:literal, $prod:ident) => {
        use super::super::blocks::scale_min_k4;
        use super::{ActRow, QType};
        use std::arch::x86_64::*;

        const Q8_0: u8 = 0;
        const Q4_0: u8 = 1;
        const Q4_1: u8 = 2;
        const Q4K: u8 = 3;
        const Q6K: u8 = 4;

        fn index(qt: QType) -> u8 {
            match qt {
                QType::Q8_0 => Q8_0,
                QType::Q4_0 => Q4_0,
                QType::Q4_1 => Q4_1,
                QType::Q4K => Q4K,
                QType::Q6K => Q6K,
            }
        }

        /// The f16 at byte `i` of `p` in all 8 lanes (F16C). Broadcast first: every lane is
        /// used, so the compiler cannot narrow the load into a 2-byte insert that merges into
        /// (and so waits for) whatever register it picks — measured: that chained every block
        /// through the loop and ran the kernel at a quarter of its speed.
        #[inline(always)]
        unsafe fn h8(p: *const u8, i: usize) -> __m256 {
            let bits = (p.add(i) as *const u16).read_unaligned();
            _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
        }

        #[inline(always)]
        unsafe fn int8(v: i32) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_set1_epi32(v))
        }

        /// Group `g` of the block at `p` as 32 codes (Q8_0: its signed bytes) and the per-lane
        /// coefficients `a` and `b` (lanes 0-3 the first half-group) as in `blocks::group`.
        #[inline(always)]
        unsafe fn unpack<const T: u8>(p: *const u8, g: usize) -> (__m256i, __m256, __m256) {
            let m4 = _mm256_set1_epi8(0x0F);
            match T {
                Q8_0 => {
                    (_mm256_loadu_si256(p.add(2) as *const __m256i), h8(p, 0), _mm256_setzero_ps())
                }
                Q4_0 | Q4_1 => {
                    let off = if T == Q4_0 { 2 } else { 4 };
                    let v = _mm_loadu_si128(p.add(off) as *const __m128i);
                    let hi = _mm_srli_epi16(v, 4);
                    let u = _mm256_and_si256(_mm256_set_m128i(hi, v), m4);
                    let d = h8(p, 0);
                    let b =
                        if T == Q4_0 { _mm256_mul_ps(d, _mm256_set1_ps(-8.0)) } else { h8(p, 2) };
                    (u, d, b)
                }
                Q4K => {
                    let v = _mm256_loadu_si256(p.add(16 + 32 * (g / 2)) as *const __m256i);
                    let v = if g % 2 == 1 { _mm256_srli_epi16(v, 4) } else { v };
                    let (sc, m) = scale_min_k4(g, std::slice::from_raw_parts(p.add(4), 12));
                    let a = _mm256_mul_ps(h8(p, 0), int8(sc as i32));
                    let b = _mm256_mul_ps(h8(p, 2), int8(-(m as i32)));
                    (_mm256_and_si256(v, m4), a, b)
                }
                _ => {
                    let (hh, t) = (g / 4, g % 4);
                    let ql = _mm256_loadu_si256(p.add(64 * hh + 32 * (t & 1)) as *const __m256i);
                    let qh = _mm256_loadu_si256(p.add(128 + 32 * hh) as *const __m256i);
                    let lo = _mm256_and_si256(
                        _mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * (t >> 1) as i32)),
                        m4,
                    );
                    let hi = _mm256_and_si256(
                        _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t as i32)),
                        _mm256_set1_epi8(3),
                    );
                    let u = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
                    let s0 = *p.add(192 + 8 * hh + 2 * t) as i8 as i32;
                    let s1 = *p.add(193 + 8 * hh + 2 * t) as i8 as i32;
                    let sc = _mm256_cvtepi32_ps(_mm256_set_m128i(
                        _mm_set1_epi32(s1),
                        _mm_set1_epi32(s0),
                    ));
                    let a = _mm256_mul_ps(h8(p, 208), sc);
                    (u, a, _mm256_mul_ps(a, _mm256_set1_ps(-32.0)))
                }
            }
        }

        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }

        #[inline(always)]
        unsafe fn lanes_to_halves(p: __m256i) -> [i32; 2] {
            let mut l = [0i32; 8];
            _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, p);
            [l[0] + l[1] + l[2] + l[3], l[4] + l[5] + l[6] + l[7]]
        }

        /// The half-group integer sums of group `g` against the 32 bytes `q` (before any
        /// Q8_0 correction the path needs; see `group_sums`).
        #[target_feature(enable = $features)]
        pub unsafe fn sums(qt: QType, block: &[u8], g: usize, q: &[i8]) -> [i32; 2] {
            let p = block.as_ptr();
            let (u, a, b) = match index(qt) {
                Q8_0 => unpack::<Q8_0>(p, g),
                Q4_0 => unpack::<Q4_0>(p, g),
                Q4_1 => unpack::<Q4_1>(p, g),
                Q4K => unpack::<Q4K>(p, g),
                _ => unpack::<Q6K>(p, g),
            };
            let (u, _) = shift(index(qt), u, a, b);
            let x = _mm256_loadu_si256(q.as_ptr() as *const __m256i);
            lanes_to_halves($prod(index(qt) == Q8_0, u, x))
        }

        #[target_feature(enable = $features)]
        pub unsafe fn dot<const R: usize>(qt: QType, w: &[u8], x: [ActRow<'_>; R]) -> [f32; R] {
            match index(qt) {
                Q8_0 => dot_t::<R, Q8_0>(w, x),
                Q4_0 => dot_t::<R, Q4_0>(w, x),
                Q4_1 => dot_t::<R, Q4_1>(w, x),
                Q4K => dot_t::<R, Q4K>(w, x),
                _ => dot_t::<R, Q6K>(w, x),
            }
        }

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn dot_t<const R: usize, const T: u8>(w: &[u8], x: [ActRow<'_>; R]) -> [f32; R] {
            let qt = QType::ALL[T as usize];
            let (bb, gpb) = (qt.block_bytes(), qt.block_values() / 32);
            let blocks = w.len() / bb;
            let mut acc = [_mm256_setzero_ps(); R];
            let mut bacc = [_mm256_setzero_ps(); R];
            for bi in 0..blocks {
                let p = w.as_ptr().add(bi * bb);
                for g in 0..gpb {
                    let gi = bi * gpb + g;
                    let (u, a, b) = unpack::<T>(p, g);
                    let (u, b) = shift(T, u, a, b);
                    for r in 0..R {
                        let xr = &x[r];
                        let xq = _mm256_loadu_si256(xr.qs.as_ptr().add(gi * 32) as *const __m256i);
                        let prod = _mm256_cvtepi32_ps($prod(T == Q8_0, u, xq));
                        let dx = _mm256_broadcast_ss(xr.scales.get_unchecked(gi));
                        acc[r] = _mm256_fmadd_ps(prod, _mm256_mul_ps(a, dx), acc[r]);
                        let sx = _mm256_loadu_ps(xr.spread.as_ptr().add(8 * gi));
                        bacc[r] = _mm256_fmadd_ps(b, sx, bacc[r]);
                    }
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = hsum(_mm256_add_ps(acc[r], bacc[r]));
            }
            out
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    simd_path!("avx2,fma,f16c", prod);

    /// Byte products summed to 8 i32 lanes (lanes 0-3 the first half-group): unsigned codes
    /// times signed activations by `maddubs` (no saturation: codes ≤ 63, |q| ≤ 127); Q8_0's
    /// signed codes through the sign trick (|w| · sign(q, w)).
    #[inline(always)]
    unsafe fn prod(signed: bool, u: __m256i, x: __m256i) -> __m256i {
        let p16 = if signed {
            _mm256_maddubs_epi16(_mm256_sign_epi8(u, u), _mm256_sign_epi8(x, u))
        } else {
            _mm256_maddubs_epi16(u, x)
        };
        _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
    }

    #[inline(always)]
    fn shift(_: u8, u: __m256i, _a: __m256, b: __m256) -> (__m256i, __m256) {
        (u, b)
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    simd_path!("avx2,fma,f16c,avx512f,avx512vl,avx512vnni", prod);

    /// Byte products summed to 8 i32 lanes by `vpdpbusd` (unsigned codes × signed bytes).
    #[inline(always)]
    unsafe fn prod(_: bool, u: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x)
    }

    /// Q8_0's signed codes become unsigned (w + 128); the offset -128·d joins `b`.
    #[inline(always)]
    unsafe fn shift(t: u8, u: __m256i, a: __m256, b: __m256) -> (__m256i, __m256) {
        if t == 0 {
            // Q8_0
            (_mm256_xor_si256(u, _mm256_set1_epi8(-128)), _mm256_mul_ps(a, _mm256_set1_ps(-128.0)))
        } else {
            (u, b)
        }
    }
}
