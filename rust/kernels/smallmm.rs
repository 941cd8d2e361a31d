//! f32 matrix products against a right-hand side packed once into 16-column panels
//! ([panel][k][16]): the recurrent step of LSTM/GRU (M = active batch rows, typically 1..16),
//! their input projection, and attention's per-block products. Each call streams the panels it
//! needs once with an R x 32 (AVX-512) or R x 16 (AVX2) register tile per panel pass, every
//! loaded weight vector feeding R FMAs; callers may split the panels among threads and block
//! the inner dimension. Instruction sets are detected at run time (AVX-512F, else AVX2+FMA, else
//! scalar), never assumed. Written by hand because a general GEMM re-packs its right-hand side
//! on every call, the whole weight per time step here (measurements in docs/kernels.md).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use std::any::TypeId;

use super::Mat;

const W: usize = 16;

/// A right-hand side `B (K x N)` packed into 16-column panels.
pub struct Packed {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl Packed {
    /// Packs `b` (any strides); columns past N in the last panel are zero.
    pub fn new(b: Mat<f32>) -> Self {
        let (k, n) = (b.rows, b.cols);
        let panels = n.div_ceil(W);
        let mut data = vec![0.0f32; panels * k * W];
        for p in 0..panels {
            let cols = (n - p * W).min(W);
            let panel = &mut data[p * k * W..(p + 1) * k * W];
            // SAFETY (all three loops): (kk, p * W + c) is inside the view (kk < rows,
            // p * W + c < cols) and the view was built over a slice covering its extent.
            if b.cs == 1 {
                // Rows contiguous (V, a weight's transpose): 16 floats copied per row.
                for (kk, dst) in panel.chunks_exact_mut(W).enumerate() {
                    let src = unsafe {
                        std::slice::from_raw_parts(
                            b.ptr.offset(kk as isize * b.rs + (p * W) as isize),
                            cols,
                        )
                    };
                    dst[..cols].copy_from_slice(src);
                }
            } else if b.rs == 1 {
                // Columns contiguous (Kᵀ, a weight): read each column along its length.
                for c in 0..cols {
                    let src = unsafe {
                        std::slice::from_raw_parts(b.ptr.offset((p * W + c) as isize * b.cs), k)
                    };
                    for (kk, &x) in src.iter().enumerate() {
                        panel[kk * W + c] = x;
                    }
                }
            } else {
                for kk in 0..k {
                    for c in 0..cols {
                        panel[kk * W + c] = unsafe {
                            *b.ptr.offset(kk as isize * b.rs + (p * W + c) as isize * b.cs)
                        };
                    }
                }
            }
        }
        Packed { data, k, n }
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.n
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// The left-hand side of a product: `m` rows of `A` with row stride `lda` (for [`mm_raw_t`],
/// `A` stored transposed: `A(i, k) = a[k * lda + i]`).
#[derive(Clone, Copy)]
pub struct Lhs<'a, T = f32> {
    pub a: &'a [T],
    pub lda: usize,
    pub m: usize,
}

impl<'a, T: 'static> Lhs<'a, T> {
    /// The same rows as f32, for the packed kernel of a generic caller; `T` must be f32.
    pub fn f32(self) -> Lhs<'a, f32> {
        assert!(TypeId::of::<T>() == TypeId::of::<f32>(), "the packed kernel is f32 only");
        // SAFETY: T is f32 (asserted), so the slice holds f32 values.
        let a = unsafe { std::slice::from_raw_parts(self.a.as_ptr() as *const f32, self.a.len()) };
        Lhs { a, lda: self.lda, m: self.m }
    }
}

/// One product as the kernels below run it: `out (row stride ldo) (+)= A · B[ks]`, `A` the
/// `m` rows of `a` (row stride `lda`, transposed when `TA`), over the inner range `ks`.
#[derive(Clone, Copy)]
struct Job<'a> {
    out: *mut f32,
    ldo: usize,
    a: &'a [f32],
    lda: usize,
    m: usize,
    b: &'a Packed,
    accumulate: bool,
    ks: (usize, usize),
}

/// The number of 16-column panels.
impl Packed {
    pub fn panels(&self) -> usize {
        self.n.div_ceil(W)
    }
}

/// `out[m x N] (row stride ldo) (+)= A[m x K] · B`.
pub fn mm(
    out: &mut [f32],
    ldo: usize,
    a: Lhs<'_>,
    b: &Packed,
    accumulate: bool,
    panels: (usize, usize),
) {
    let m = a.m;
    if m == 0 {
        return;
    }
    assert!(ldo >= b.n && out.len() >= (m - 1) * ldo + b.n, "out out of bounds");
    // SAFETY: bounds checked just above; `out` is exclusively borrowed.
    unsafe { mm_raw(out.as_mut_ptr(), ldo, a, b, accumulate, panels) }
}

/// As [`mm`], writing through a raw pointer, so threads can fill disjoint column ranges of one
/// buffer (each passes its own `panels`).
///
/// # Safety
/// `out` must be valid for `(m - 1) * ldo + N` elements, and no other thread may touch the
/// columns of the given panels in those rows meanwhile.
pub unsafe fn mm_raw(
    out: *mut f32,
    ldo: usize,
    a: Lhs<'_>,
    b: &Packed,
    accumulate: bool,
    panels: (usize, usize),
) {
    mm_raw_k(out, ldo, a, b, accumulate, panels, (0, b.k))
}

/// As [`mm_raw`], over the inner-dimension range `ks` only (`a`'s columns and `B`'s rows
/// `[ks.0, ks.1)`), so long products can be blocked to keep the panel slice in cache.
///
/// # Safety
/// As [`mm_raw`].
pub unsafe fn mm_raw_k(
    out: *mut f32,
    ldo: usize,
    lhs: Lhs<'_>,
    b: &Packed,
    accumulate: bool,
    panels: (usize, usize),
    ks: (usize, usize),
) {
    let Lhs { a, lda, m } = lhs;
    assert!(ks.0 <= ks.1 && ks.1 <= b.k, "k range out of bounds");
    if m == 0 {
        return;
    }
    assert!(lda >= b.k && a.len() >= (m - 1) * lda + b.k, "lhs out of bounds");
    dispatch::<false>(Job { out, ldo, a, lda, m, b, accumulate, ks }, panels)
}

/// As [`mm_raw`], with the left-hand side given transposed:
/// `out[m x N] (+)= aᵀ · B` where `a` is `K x m` (row stride `lda`), i.e.
/// `A(i, k) = a[k * lda + i]`.
/// For the attention backward's `dV += Pᵀ dO` and `dK += dSᵀ Q` (no transpose copy: the
/// broadcast loads read `a` along its rows instead of down its columns).
///
/// # Safety
/// As [`mm_raw`].
pub unsafe fn mm_raw_t(out: *mut f32, ldo: usize, lhs: Lhs<'_>, b: &Packed, accumulate: bool) {
    let Lhs { a, lda, m } = lhs;
    let ks = (0, b.k);
    if m == 0 || ks.0 == ks.1 {
        if m > 0 && !accumulate {
            for r in 0..m {
                std::ptr::write_bytes(out.add(r * ldo), 0, b.n);
            }
        }
        return;
    }
    assert!(lda >= m && a.len() >= (ks.1 - 1) * lda + m, "lhs out of bounds");
    dispatch::<true>(Job { out, ldo, a, lda, m, b, accumulate, ks }, (0, usize::MAX))
}

/// `A(r, kk)`'s offset in `a`: row-major, or transposed (`TA`).
#[inline(always)]
fn at<const TA: bool>(lda: usize, r: usize, kk: usize) -> usize {
    if TA {
        kk * lda + r
    } else {
        r * lda + kk
    }
}

unsafe fn dispatch<const TA: bool>(job: Job<'_>, panels: (usize, usize)) {
    let Job { ldo, b, .. } = job;
    let n = b.n;
    assert!(ldo >= n, "out row stride too small");
    let (p0, p1) = (panels.0, panels.1.min(n.div_ceil(W)));
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F present (detected); bounds asserted by the callers, panel and
        // column indices are clamped to N inside.
        Isa::Avx512 => mm_avx512::<TA>(job, p0, p1),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA present (detected); bounds as above.
        Isa::Avx2 => mm_avx2::<TA>(job, p0, p1),
        _ => mm_scalar::<TA>(job, p0, p1),
    }
}

unsafe fn mm_scalar<const TA: bool>(job: Job<'_>, p0: usize, p1: usize) {
    let Job { out, ldo, a, lda, m, b, accumulate, ks } = job;
    let (k, n) = (b.k, b.n);
    for p in p0..p1 {
        let panel = &b.data[p * k * W..(p + 1) * k * W];
        for r in 0..m {
            let mut acc = [0.0f32; W];
            for kk in ks.0..ks.1 {
                let av = a[at::<TA>(lda, r, kk)];
                for c in 0..W {
                    acc[c] += av * panel[kk * W + c];
                }
            }
            // `c` is both the accumulator lane and the output column offset.
            #[allow(clippy::needless_range_loop)]
            for c in 0..W {
                let col = p * W + c;
                if col < n {
                    let o = out.add(r * ldo + col);
                    *o = if accumulate { *o + acc[c] } else { acc[c] };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn mm_avx512<const TA: bool>(job: Job<'_>, p0: usize, p1: usize) {
    let m = job.m;
    let mut p = p0;
    while p < p1 {
        let two = p + 1 < p1;
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(8);
            macro_rules! tile {
                ($R:literal) => {
                    tile512::<$R, TA>(job, r, p, two)
                };
            }
            match rows {
                8 => tile!(8),
                7 => tile!(7),
                6 => tile!(6),
                5 => tile!(5),
                4 => tile!(4),
                3 => tile!(3),
                2 => tile!(2),
                _ => tile!(1),
            }
            r += rows;
        }
        p += if two { 2 } else { 1 };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile512<const R: usize, const TA: bool>(job: Job<'_>, r0: usize, p: usize, two: bool) {
    let Job { out, ldo, a, lda, b, accumulate, ks, .. } = job;
    let k = b.k;
    let pa = b.data.as_ptr().add(p * k * W + ks.0 * W);
    let pb = if two { b.data.as_ptr().add((p + 1) * k * W + ks.0 * W) } else { pa };
    let ap = a.as_ptr().add(at::<TA>(lda, r0, ks.0));
    let mut acc0 = [_mm512_setzero_ps(); R];
    let mut acc1 = [_mm512_setzero_ps(); R];
    for kk in 0..ks.1 - ks.0 {
        let b0 = _mm512_loadu_ps(pa.add(kk * W));
        let b1 = _mm512_loadu_ps(pb.add(kk * W));
        for r in 0..R {
            let av = _mm512_set1_ps(*ap.add(at::<TA>(lda, r, kk)));
            acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
        }
    }
    let n = b.n;
    for (half, acc) in [(0usize, &acc0), (1, &acc1)] {
        if half == 1 && !two {
            break;
        }
        let col0 = (p + half) * W;
        let valid = n.saturating_sub(col0).min(W);
        let mask: __mmask16 = if valid >= W { 0xFFFF } else { ((1u32 << valid) - 1) as u16 };
        // `r` indexes the register tile and the output rows together.
        #[allow(clippy::needless_range_loop)]
        for r in 0..R {
            let dst = out.add((r0 + r) * ldo + col0);
            let v = if accumulate {
                _mm512_add_ps(acc[r], _mm512_maskz_loadu_ps(mask, dst))
            } else {
                acc[r]
            };
            _mm512_mask_storeu_ps(dst, mask, v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mm_avx2<const TA: bool>(job: Job<'_>, p0: usize, p1: usize) {
    let m = job.m;
    for p in p0..p1 {
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(6);
            macro_rules! tile {
                ($R:literal) => {
                    tile256::<$R, TA>(job, r, p)
                };
            }
            match rows {
                6 => tile!(6),
                5 => tile!(5),
                4 => tile!(4),
                3 => tile!(3),
                2 => tile!(2),
                _ => tile!(1),
            }
            r += rows;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile256<const R: usize, const TA: bool>(job: Job<'_>, r0: usize, p: usize) {
    let Job { out, ldo, a, lda, b, accumulate, ks, .. } = job;
    let k = b.k;
    let pa = b.data.as_ptr().add(p * k * W + ks.0 * W);
    let ap = a.as_ptr().add(at::<TA>(lda, r0, ks.0));
    let mut acc0 = [_mm256_setzero_ps(); R];
    let mut acc1 = [_mm256_setzero_ps(); R];
    for kk in 0..ks.1 - ks.0 {
        let b0 = _mm256_loadu_ps(pa.add(kk * W));
        let b1 = _mm256_loadu_ps(pa.add(kk * W + 8));
        for r in 0..R {
            let av = _mm256_set1_ps(*ap.add(at::<TA>(lda, r, kk)));
            acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
        }
    }
    let col0 = p * W;
    let valid = b.n.saturating_sub(col0).min(W);
    for r in 0..R {
        let dst = out.add((r0 + r) * ldo + col0);
        if valid == W {
            let (mut v0, mut v1) = (acc0[r], acc1[r]);
            if accumulate {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(dst));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(dst.add(8)));
            }
            _mm256_storeu_ps(dst, v0);
            _mm256_storeu_ps(dst.add(8), v1);
        } else {
            let mut tmp = [0.0f32; W];
            _mm256_storeu_ps(tmp.as_mut_ptr(), acc0[r]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc1[r]);
            for (c, &v) in tmp.iter().enumerate().take(valid) {
                let d = dst.add(c);
                *d = if accumulate { *d + v } else { v };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_reads_every_layout() {
        let (k, n) = (7usize, 37usize);
        let rm: Vec<f32> = (0..k * n).map(|i| i as f32).collect();
        // A column-major copy.
        let cm: Vec<f32> = (0..k * n).map(|i| ((i % k) * n + i / k) as f32).collect();
        let wide: Vec<f32> =
            (0..k * 2 * n).map(|i| if i % 2 == 0 { (i / 2) as f32 } else { -1.0 }).collect();
        let views = [
            Mat::rm(&rm, k, n),
            Mat { ptr: cm.as_ptr(), rows: k, cols: n, rs: 1, cs: k as isize },
            Mat { ptr: wide.as_ptr(), rows: k, cols: n, rs: 2 * n as isize, cs: 2 },
        ];
        for v in views {
            let p = Packed::new(v);
            for kk in 0..k {
                for col in 0..n.div_ceil(W) * W {
                    let got = p.data[((col / W) * k + kk) * W + col % W];
                    let want = if col < n { (kk * n + col) as f32 } else { 0.0 };
                    assert_eq!(got, want);
                }
            }
        }
    }

    #[test]
    fn matches_naive_for_every_isa_path() {
        for &(m, k, n) in
            &[(1usize, 5usize, 3usize), (3, 17, 40), (8, 64, 100), (11, 33, 16), (9, 8, 65)]
        {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            let bm: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect();
            let packed = Packed::new(Mat::rm(&bm, k, n));
            let mut want = vec![0.5f32; m * n];
            for r in 0..m {
                for c in 0..n {
                    let s: f32 = (0..k).map(|kk| a[r * k + kk] * bm[kk * n + c]).sum();
                    want[r * n + c] += s;
                }
            }
            let mut got = vec![0.5f32; m * n];
            mm(&mut got, n, Lhs { a: &a, lda: k, m }, &packed, true, (0, usize::MAX));
            for (x, y) in got.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "{m}x{k}x{n}: {x} vs {y}");
            }
            let job = |out| Job {
                out,
                ldo: n,
                a: &a,
                lda: k,
                m,
                b: &packed,
                accumulate: true,
                ks: (0, k),
            };
            let mut s = vec![0.5f32; m * n];
            // SAFETY: `s` holds m x n elements.
            unsafe { mm_scalar::<false>(job(s.as_mut_ptr()), 0, n.div_ceil(W)) };
            for (x, y) in s.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4);
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                let mut v = vec![0.5f32; m * n];
                // SAFETY: features checked; shapes as for `mm`.
                unsafe { mm_avx2::<false>(job(v.as_mut_ptr()), 0, n.div_ceil(W)) };
                for (x, y) in v.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-4);
                }
            }
            // K blocked in two halves (accumulating) equals the whole product.
            let mut blocked = vec![0.5f32; m * n];
            // SAFETY: `blocked` holds m x n elements.
            unsafe {
                let lhs = Lhs { a: &a, lda: k, m };
                mm_raw_k(blocked.as_mut_ptr(), n, lhs, &packed, true, (0, usize::MAX), (0, k / 2));
                mm_raw_k(blocked.as_mut_ptr(), n, lhs, &packed, true, (0, usize::MAX), (k / 2, k));
            }
            for (x, y) in blocked.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4);
            }
            // The transposed left-hand side: aᵀ stored K x m.
            let mut at_: Vec<f32> = vec![0.0; k * m];
            for r in 0..m {
                for kk in 0..k {
                    at_[kk * m + r] = a[r * k + kk];
                }
            }
            let job_t = |out| Job {
                out,
                ldo: n,
                a: &at_,
                lda: m,
                m,
                b: &packed,
                accumulate: true,
                ks: (0, k),
            };
            let mut t = vec![0.5f32; m * n];
            // SAFETY: `t` holds m x n elements.
            unsafe { mm_raw_t(t.as_mut_ptr(), n, Lhs { a: &at_, lda: m, m }, &packed, true) };
            for (x, y) in t.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4);
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                let mut v = vec![0.5f32; m * n];
                // SAFETY: features checked; shapes as above.
                unsafe { mm_avx2::<true>(job_t(v.as_mut_ptr()), 0, n.div_ceil(W)) };
                for (x, y) in v.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-4);
                }
            }
            let mut sc = vec![0.5f32; m * n];
            // SAFETY: `sc` holds m x n elements.
            unsafe { mm_scalar::<true>(job_t(sc.as_mut_ptr()), 0, n.div_ceil(W)) };
            for (x, y) in sc.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4);
            }
            let mut over = vec![9.0f32; m * n];
            mm(&mut over, n, Lhs { a: &a, lda: k, m }, &packed, false, (0, usize::MAX));
            for (x, y) in over.iter().zip(&want) {
                assert!((x - (y - 0.5)).abs() < 1e-4);
            }
        }
    }
}
