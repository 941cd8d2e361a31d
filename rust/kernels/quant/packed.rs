//! Row-interleaved weights for the batch-1 products of decoding: Q8_0, Q4_0 and Q4_1 blocks
//! repacked so that one 512-bit load holds four bytes of each of 16 output rows.
//!
//! Why: with GGUF's row-major blocks, a dot product spends most of its instructions on
//! per-block float work (unpacking two f16 scales, converting and scaling the block's integer
//! sum) that serves 32 weights of one row. Interleaving 16 rows puts one row in each 32-bit
//! lane: a `vpdpbusd` multiplies 4 codes of 16 rows by 4 activation bytes broadcast from
//! memory, the 16 block scales arrive in one f16 vector, and the float update of a block
//! column is a handful of instructions for 16 rows. This is the layout idea of ggml's
//! `repack.cpp` (which does it for Q4_0); written here for the types ferrolm's decode reads.
//!
//! Layout of a group of 16 rows: its block columns one after another; a column is the 16
//! rows' f16 scales `d` (32 bytes), for Q4_1 their f16 minimums `m` (32 bytes), then the
//! codes in chunks of 64 bytes — chunk `c`, lane `r` = bytes `4c..4c + 4` of row `r`'s
//! codes (Q4: byte `i` holds value `i` in its low nibble and `i + 16` in its high one; Q8_0:
//! the signed byte of value `i`). A group takes exactly the bytes its 16 rows take in GGUF.
//!
//! Every path (scalar, AVX2, AVX-512 VNNI) computes the same integer sums and then the same
//! float operations per row in the same order (fused multiply-adds), so their results are
//! equal bit for bit; tests force each path.

use half::f16;

use super::{ActRow, Isa, QType, QuantRows};
use crate::kernels::team::{self, Shared};

/// How far ahead of the block column being multiplied the kernels ask for the weights
/// (into L2). A decode step streams each weight once from DRAM; the hardware prefetchers
/// alone left one core at ~9 GB/s. Measured on SmolLM2's decode step (AVX-512, quiet):
/// 13.2 -> 11.2 ms on one thread, 11.2 -> 7.1 ms on two, flat from 8 to 32 KiB.
pub const PREFETCH: usize = 16 << 10;

/// Asks for the `bytes` of weights `PREFETCH` bytes ahead of `p` (a hint: never faults, so
/// reaching past the end of the weights is harmless).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(p: *const u8, bytes: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    let mut o = 0;
    while o < bytes {
        // SAFETY: prefetch is a hint on any address; `wrapping_add` computes it without UB.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(PREFETCH + o) as *const i8) };
        o += 64;
    }
}

/// Rows per interleaved group.
pub const ROWS: usize = 16;

/// A weight matrix (n rows of k values) repacked for [`gemv`].
pub struct Packed {
    pub qt: QType,
    pub n: usize,
    pub k: usize,
    data: Vec<u8>,
}

/// Bytes of the scale (and minimum) vectors at the head of a block column.
fn head_bytes(qt: QType) -> usize {
    if qt == QType::Q4_1 {
        64
    } else {
        32
    }
}

/// Bytes of one row's codes in a block.
fn code_bytes(qt: QType) -> usize {
    if qt == QType::Q8_0 {
        32
    } else {
        16
    }
}

impl Packed {
    /// Whether `qt` blocks of an (n, k) matrix can be repacked.
    pub fn supports(qt: QType, n: usize) -> bool {
        matches!(qt, QType::Q8_0 | QType::Q4_0 | QType::Q4_1) && n > 0 && n.is_multiple_of(ROWS)
    }

    /// Repacks `w` (n rows of `k` values in `qt` blocks, GGUF layout), or None when the type
    /// or the row count is not supported ([`Packed::supports`]).
    ///
    /// Panics when `w`'s length disagrees with the shape (`super::check` it first).
    pub fn new(qt: QType, w: &[u8], n: usize, k: usize) -> Option<Packed> {
        if !Packed::supports(qt, n) {
            return None;
        }
        let row = super::check(qt, n, k, w.len()).expect("checked by the caller");
        let (bb, hb, cb) = (qt.block_bytes(), head_bytes(qt), code_bytes(qt));
        let (nb, col) = (k / 32, ROWS * bb);
        let mut data = crate::kernels::alloc::zeroed::<u8>(w.len());
        for (g, out) in data.chunks_exact_mut(ROWS * row).enumerate() {
            for b in 0..nb {
                let dst = &mut out[b * col..(b + 1) * col];
                for r in 0..ROWS {
                    let src = &w[(g * ROWS + r) * row + b * bb..][..bb];
                    dst[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                    if qt == QType::Q4_1 {
                        dst[32 + 2 * r..34 + 2 * r].copy_from_slice(&src[2..4]);
                    }
                    let codes = &src[bb - cb..];
                    for c in 0..cb / 4 {
                        dst[hb + 64 * c + 4 * r..][..4].copy_from_slice(&codes[4 * c..4 * c + 4]);
                    }
                }
            }
        }
        Some(Packed { qt, n, k, data })
    }

    /// Bytes of one group of 16 rows.
    fn group_bytes(&self) -> usize {
        ROWS * self.qt.block_bytes() * (self.k / 32)
    }
}

/// `out[j] = w_j · x` for the rows of groups `g0..g1` (`out` holds `16 · (g1 - g0)` values).
pub fn gemv(isa: Isa, p: &Packed, x: ActRow<'_>, groups: (usize, usize), out: &mut [f32]) {
    assert!(
        x.qs.len() == p.k
            && x.scales.len() * 32 >= p.k
            && x.sums.len() * 16 >= p.k
            && x.gsum.len() * 32 >= p.k
            && groups.0 <= groups.1
            && groups.1 * ROWS <= p.n
            && out.len() == (groups.1 - groups.0) * ROWS,
        "packed product shapes"
    );
    let gb = p.group_bytes();
    for (g, o) in (groups.0..groups.1).zip(out.chunks_exact_mut(ROWS)) {
        let w = &p.data[g * gb..(g + 1) * gb];
        // SAFETY: `o` holds the 16 values the group writes; `w` is one whole group and `x`
        // has `k` codes (asserted above).
        unsafe { group::<1>(isa, p.qt, w, [x], [o.as_mut_ptr()]) };
    }
}

/// `y (m × n) = x · Wᵀ` for the quantized activation rows `x`, output rows split across
/// `threads` by groups of 16; each weight group is read from cache for every 4 activation
/// rows (the VNNI path unpacks it once for the 4).
pub fn matmul(isa: Isa, p: &Packed, x: &QuantRows, threads: usize, y: &mut [f32]) {
    let (m, n) = (x.m, p.n);
    assert!(x.k == p.k && y.len() == m * n, "packed product shapes");
    let gb = p.group_bytes();
    let groups = n / ROWS;
    // A few groups per item: both threads busy to the end, the counter touched rarely.
    let chunk = (groups / (threads.max(1) * 8)).clamp(1, 16);
    let out = Shared(y.as_mut_ptr());
    team::for_each(threads, groups.div_ceil(chunk), |item| {
        for g in item * chunk..((item + 1) * chunk).min(groups) {
            let w = &p.data[g * gb..(g + 1) * gb];
            let col = |i: usize| {
                // SAFETY: (i, 16g..16g + 16) is inside y (m × n); group g is this item's.
                unsafe { out.ptr().add(i * n + g * ROWS) }
            };
            let mut i = 0;
            while i + 4 <= m {
                let rows = [x.row(i), x.row(i + 1), x.row(i + 2), x.row(i + 3)];
                // SAFETY: each pointer has the group's 16 outputs of its row; shapes asserted.
                unsafe {
                    group::<4>(isa, p.qt, w, rows, [col(i), col(i + 1), col(i + 2), col(i + 3)])
                };
                i += 4;
            }
            while i < m {
                // SAFETY: as above.
                unsafe { group::<1>(isa, p.qt, w, [x.row(i)], [col(i)]) };
                i += 1;
            }
        }
    });
}

/// One group of 16 weight rows against `R` activation rows: 16 values to each `out[r]`.
///
/// # Safety
/// `w` is one whole group of `k / 32` block columns, each `x[r]` has `k` codes, each `out[r]`
/// points to 16 writable floats, and `isa` is available.
unsafe fn group<const R: usize>(
    isa: Isa,
    qt: QType,
    w: &[u8],
    x: [ActRow<'_>; R],
    out: [*mut f32; R],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => vnni::group(qt, w, x, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            for r in 0..R {
                avx2::group(qt, w, x[r], &mut *(out[r] as *mut [f32; ROWS]));
            }
        }
        _ => {
            for r in 0..R {
                scalar_group(qt, w, x[r], &mut *(out[r] as *mut [f32; ROWS]));
            }
        }
    }
}

/// The reference path: per row, the block's integer sum `Σ code·q` (Q8_0 signed), then
/// `acc = fma(sum, d·dx, acc)` and the offset `acc2 = fma(b, dx·Σq, acc2)` with `b` Q4_1's
/// minimum, Q4_0's `-8·d` (Q8_0: none); the row's result is `acc + acc2`.
fn scalar_group(qt: QType, w: &[u8], x: ActRow<'_>, out: &mut [f32; ROWS]) {
    let (hb, cb) = (head_bytes(qt), code_bytes(qt));
    let col = ROWS * qt.block_bytes();
    let mut acc = [0f32; ROWS];
    let mut acc2 = [0f32; ROWS];
    for (b, c) in w.chunks_exact(col).enumerate() {
        let q = &x.qs[32 * b..32 * b + 32];
        let (dx, sx) = (x.scales[b], x.gsum[b]);
        for r in 0..ROWS {
            let mut s = 0i32;
            for ch in 0..cb / 4 {
                for i in 0..4 {
                    let byte = c[hb + 64 * ch + 4 * r + i];
                    let v = 4 * ch + i;
                    if qt == QType::Q8_0 {
                        s += byte as i8 as i32 * q[v] as i32;
                    } else {
                        s += (byte & 0xF) as i32 * q[v] as i32
                            + (byte >> 4) as i32 * q[v + 16] as i32;
                    }
                }
            }
            let d = f16::from_bits(u16::from_le_bytes([c[2 * r], c[2 * r + 1]])).to_f32();
            acc[r] = (s as f32).mul_add(d * dx, acc[r]);
            let off = match qt {
                QType::Q4_1 => {
                    f16::from_bits(u16::from_le_bytes([c[32 + 2 * r], c[33 + 2 * r]])).to_f32()
                }
                QType::Q4_0 => -8.0 * d,
                _ => 0.0,
            };
            if qt != QType::Q8_0 {
                acc2[r] = off.mul_add(sx, acc2[r]);
            }
        }
    }
    for r in 0..ROWS {
        out[r] = acc[r] + acc2[r];
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::super::{ActRow, QType};
    use super::ROWS;
    use std::arch::x86_64::*;

    /// Four activation bytes at `p` in every 32-bit lane.
    ///
    /// # Safety
    /// `p..p + 4` is readable.
    #[inline(always)]
    unsafe fn bcast(p: *const i8) -> __m512i {
        _mm512_set1_epi32((p as *const i32).read_unaligned())
    }

    /// # Safety
    /// As `super::group`: `w` whole block columns of one group, `x[r]` covering them, 16
    /// writable floats at each `out[r]`, and the CPU has AVX-512 (F, BW, VL, VNNI).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")]
    pub unsafe fn group<const R: usize>(
        qt: QType,
        w: &[u8],
        x: [ActRow<'_>; R],
        out: [*mut f32; R],
    ) {
        match qt {
            QType::Q8_0 => group_t::<0, R>(w, x, out),
            QType::Q4_0 => group_t::<1, R>(w, x, out),
            _ => group_t::<2, R>(w, x, out),
        }
    }

    /// `T`: 0 Q8_0, 1 Q4_0, 2 Q4_1. The codes of a block column are unpacked once for the
    /// `R` activation rows; each row's float updates are those of the one-row case.
    ///
    /// # Safety
    /// As `group`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")]
    unsafe fn group_t<const T: u8, const R: usize>(
        w: &[u8],
        x: [ActRow<'_>; R],
        out: [*mut f32; R],
    ) {
        let hb = if T == 2 { 64 } else { 32 };
        let col = ROWS * [34, 18, 20][T as usize];
        let nb = w.len() / col;
        let m4 = _mm512_set1_epi8(0x0F);
        let flip = _mm512_set1_epi8(-128);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc2 = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let c = w.as_ptr().add(b * col);
            super::prefetch(c, col);
            // Codes: Q4 the 4 chunks' low and high nibbles; Q8_0 its 8 chunks + 128 (unsigned;
            // 128·Σq comes back out below, exactly, in i32).
            let mut u = [_mm512_setzero_si512(); 8];
            for ch in 0..4 {
                if T == 0 {
                    for h in 0..2 {
                        let v = _mm512_loadu_si512(c.add(hb + 128 * ch + 64 * h) as *const _);
                        u[2 * ch + h] = _mm512_xor_si512(v, flip);
                    }
                } else {
                    let v = _mm512_loadu_si512(c.add(hb + 64 * ch) as *const _);
                    u[2 * ch] = _mm512_and_si512(v, m4);
                    u[2 * ch + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(c as *const __m256i));
            let off = match T {
                2 => _mm512_cvtph_ps(_mm256_loadu_si256(c.add(32) as *const __m256i)),
                1 => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
                _ => d,
            };
            for r in 0..R {
                let xr = &x[r];
                let q = xr.qs.as_ptr().add(32 * b);
                let dx = *xr.scales.get_unchecked(b);
                let mut s0 = _mm512_setzero_si512();
                let mut s1 = _mm512_setzero_si512();
                for ch in 0..4 {
                    // Byte offsets of the activation values that meet chunk pair (2ch, 2ch + 1).
                    let (o0, o1) =
                        if T == 0 { (8 * ch, 8 * ch + 4) } else { (4 * ch, 16 + 4 * ch) };
                    s0 = _mm512_dpbusd_epi32(s0, u[2 * ch], bcast(q.add(o0)));
                    s1 = _mm512_dpbusd_epi32(s1, u[2 * ch + 1], bcast(q.add(o1)));
                }
                if T == 0 {
                    let qsum = *xr.sums.get_unchecked(2 * b) + *xr.sums.get_unchecked(2 * b + 1);
                    s0 = _mm512_sub_epi32(s0, _mm512_set1_epi32(128 * qsum));
                }
                let s = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                acc[r] = _mm512_fmadd_ps(s, _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[r]);
                if T != 0 {
                    let sx = _mm512_set1_ps(*xr.gsum.get_unchecked(b));
                    acc2[r] = _mm512_fmadd_ps(off, sx, acc2[r]);
                }
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r], _mm512_add_ps(acc[r], acc2[r]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::{ActRow, QType};
    use super::ROWS;
    use std::arch::x86_64::*;

    /// # Safety
    /// `p..p + 4` is readable.
    #[inline(always)]
    unsafe fn bcast(p: *const i8) -> __m256i {
        _mm256_set1_epi32((p as *const i32).read_unaligned())
    }

    /// # Safety
    /// As `super::group` for one row, and the CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group(qt: QType, w: &[u8], x: ActRow<'_>, out: &mut [f32; ROWS]) {
        match qt {
            QType::Q8_0 => group_t::<0>(w, x, out),
            QType::Q4_0 => group_t::<1>(w, x, out),
            _ => group_t::<2>(w, x, out),
        }
    }

    /// As the VNNI path, 8 rows per register (the two halves of each 64-byte chunk).
    ///
    /// # Safety
    /// As `group`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_t<const T: u8>(w: &[u8], x: ActRow<'_>, out: &mut [f32; ROWS]) {
        let hb = if T == 2 { 64 } else { 32 };
        let col = ROWS * [34, 18, 20][T as usize];
        let nb = w.len() / col;
        let m4 = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut acc2 = [_mm256_setzero_ps(); 2];
        for b in 0..nb {
            let c = w.as_ptr().add(b * col);
            super::prefetch(c, col);
            let q = x.qs.as_ptr().add(32 * b);
            let (dx, sx) = (*x.scales.get_unchecked(b), *x.gsum.get_unchecked(b));
            for h in 0..2 {
                let s = if T == 0 {
                    // Signed codes: |w| · sign(q, w) per byte pair; each pair's i16 sum is at
                    // most 2·128·127, so widen every product to i32 before adding.
                    let mut s = _mm256_setzero_si256();
                    for ch in 0..8 {
                        let v = _mm256_loadu_si256(c.add(hb + 64 * ch + 32 * h) as *const _);
                        let p = _mm256_maddubs_epi16(
                            _mm256_sign_epi8(v, v),
                            _mm256_sign_epi8(bcast(q.add(4 * ch)), v),
                        );
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                    }
                    s
                } else {
                    // Nibble pairs: each i16 is at most 2·15·127, eight of them fit in i16.
                    let mut s16 = _mm256_setzero_si256();
                    for ch in 0..4 {
                        let v = _mm256_loadu_si256(c.add(hb + 64 * ch + 32 * h) as *const _);
                        let lo = _mm256_and_si256(v, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo, bcast(q.add(4 * ch))));
                        s16 = _mm256_add_epi16(
                            s16,
                            _mm256_maddubs_epi16(hi, bcast(q.add(16 + 4 * ch))),
                        );
                    }
                    _mm256_madd_epi16(s16, ones)
                };
                let s = _mm256_cvtepi32_ps(s);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(c.add(16 * h) as *const __m128i));
                acc[h] = _mm256_fmadd_ps(s, _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[h]);
                if T != 0 {
                    let sx = _mm256_set1_ps(sx);
                    let off = if T == 2 {
                        _mm256_cvtph_ps(_mm_loadu_si128(c.add(32 + 16 * h) as *const __m128i))
                    } else {
                        _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
                    };
                    acc2[h] = _mm256_fmadd_ps(off, sx, acc2[h]);
                }
            }
        }
        for h in 0..2 {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), _mm256_add_ps(acc[h], acc2[h]));
        }
    }
}
