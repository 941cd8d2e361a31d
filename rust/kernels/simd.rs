//! Vectorised exp / sigmoid / tanh for f32 and what is built on them: the fused LSTM / GRU cell
//! epilogues, and the max, exp-and-sum and tanh passes over a slice used by attention and the
//! LSTM backward. AVX2 + FMA paths for all of them, AVX-512F paths for the LSTM cell, max and
//! exp-and-sum (detected at run time), and scalar fallbacks.
//!
//! Written by hand because the epilogue must be fused with the state update (no library
//! offers that) and libm's scalar `expf`/`tanhf` dominated an LSTM step (docs/kernels.md).
//! Accuracy: exp uses a Cody-Waite range reduction and the Cephes degree-6 polynomial (~1-2
//! ulp); tanh uses the Cephes odd polynomial below |x| = 0.625 (no cancellation near 0) and
//! 1 - 2/(e^{2|x|}+1) above; the unit tests sweep both against f64.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether the AVX2+FMA paths can run (cached by std).
#[inline]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::*;

    #[inline(always)]
    pub unsafe fn exp(x: __m256) -> __m256 {
        // Below the smallest normal result, return exactly 0 (so exp(-inf) == 0).
        let underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654), _CMP_LT_OQ);
        let r = exp_clamped(x);
        _mm256_andnot_ps(underflow, r)
    }

    #[inline(always)]
    unsafe fn exp_clamped(x: __m256) -> __m256 {
        // Operands in this order so a NaN passes through the clamp (max/min return their second
        // operand when either is NaN): NaN in, NaN out, as libm.
        let x =
            _mm256_min_ps(_mm256_set1_ps(88.72283), _mm256_max_ps(_mm256_set1_ps(-87.33654), x));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5e-1));
        let r2 = _mm256_mul_ps(r, r);
        p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        // 2^n: n in [-126, 128] after the clamp; build it in two halves so n = 128 works.
        let ni = _mm256_cvtps_epi32(n);
        let half = _mm256_srai_epi32(ni, 1);
        let rest = _mm256_sub_epi32(ni, half);
        let bias = _mm256_set1_epi32(127);
        let s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
        let s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
        _mm256_mul_ps(_mm256_mul_ps(p, s1), s2)
    }

    #[inline(always)]
    pub unsafe fn sigmoid(x: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_div_ps(one, _mm256_add_ps(one, e))
    }

    #[inline(always)]
    pub unsafe fn tanh(x: __m256) -> __m256 {
        let sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0));
        let ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
        // Large: 1 - 2 / (e^{2|x|} + 1).
        let one = _mm256_set1_ps(1.0);
        let e = exp(_mm256_add_ps(ax, ax));
        let big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0), _mm256_add_ps(e, one)));
        // Small: x + x^3 P(x^2).
        let z = _mm256_mul_ps(ax, ax);
        let mut p = _mm256_set1_ps(-5.704_988_7e-3);
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.063_909e-2));
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.373_971_6e-2));
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.333_144_2e-1));
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.333_328e-1));
        let small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), ax, ax);
        let use_small = _mm256_cmp_ps(ax, _mm256_set1_ps(0.625), _CMP_LT_OQ);
        let r = _mm256_blendv_ps(big, small, use_small);
        _mm256_or_ps(r, sign)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The activations on 16 lanes: the same polynomials as `avx`, 2^n by `vscalefps`, and
    //! reciprocals by `vrcp14ps` plus one Newton step instead of a division (a 16-lane divide
    //! costs ~10 cycles, and the cell needs five per 16 units: see docs/kernels.md).
    use super::*;

    #[inline(always)]
    unsafe fn recip(x: __m512) -> __m512 {
        let r = _mm512_rcp14_ps(x);
        // r (2 - x r): relative error 2^-14 -> ~2^-28, below f32 rounding.
        _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0)))
    }

    #[inline(always)]
    pub unsafe fn exp(x: __m512) -> __m512 {
        let lo = _mm512_set1_ps(-87.33654);
        let underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
        // NaN passes the clamp (operand order, as in `avx::exp_clamped`).
        let x = _mm512_min_ps(_mm512_set1_ps(88.72283), _mm512_max_ps(lo, x));
        let n = _mm512_roundscale_ps(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5e-1));
        let r2 = _mm512_mul_ps(r, r);
        p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        // p * 2^n (vscalefps handles n = 128 and the denormal range itself).
        _mm512_maskz_mov_ps(!underflow, _mm512_scalef_ps(p, n))
    }

    #[inline(always)]
    pub unsafe fn sigmoid(x: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        recip(_mm512_add_ps(one, exp(_mm512_sub_ps(_mm512_setzero_ps(), x))))
    }

    #[inline(always)]
    pub unsafe fn tanh(x: __m512) -> __m512 {
        let sign_bit = _mm512_set1_epi32(i32::MIN);
        let xi = _mm512_castps_si512(x);
        let sign = _mm512_and_si512(xi, sign_bit);
        let ax = _mm512_castsi512_ps(_mm512_andnot_si512(sign_bit, xi));
        let one = _mm512_set1_ps(1.0);
        // Large: 1 - 2 / (e^{2|x|} + 1).
        let e = exp(_mm512_add_ps(ax, ax));
        let big = _mm512_fnmadd_ps(_mm512_set1_ps(2.0), recip(_mm512_add_ps(e, one)), one);
        // Small: x + x^3 P(x^2).
        let z = _mm512_mul_ps(ax, ax);
        let mut p = _mm512_set1_ps(-5.704_988_7e-3);
        p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.063_909e-2));
        p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.373_971_6e-2));
        p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.333_144_2e-1));
        p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.333_328e-1));
        let small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), ax, ax);
        let use_small = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625), _CMP_LT_OQ);
        let r = _mm512_mask_blend_ps(use_small, big, small);
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign))
    }
}

/// Whether the 16-lane activations can run (cached by std).
#[inline]
fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The gate slices of one row for a range of hidden units: `LstmRow { i, f, g, o }` hold the
/// pre-activations and receive the activations.
pub struct LstmRow<'a, T> {
    pub i: &'a mut [T],
    pub f: &'a mut [T],
    pub g: &'a mut [T],
    pub o: &'a mut [T],
}

/// LSTM cell over a range of units of one row, f32; `c`/`h` are the state (updated),
/// `cs_out`/`y_out` receive the new cell and hidden state. All slices have the same length.
pub fn lstm_cell_f32(
    row: LstmRow<'_, f32>,
    c: &mut [f32],
    h: &mut [f32],
    cs_out: &mut [f32],
    y_out: &mut [f32],
) {
    let n = c.len();
    assert!(row.i.len() == n && row.f.len() == n && row.g.len() == n && row.o.len() == n);
    assert!(h.len() == n && cs_out.len() == n && y_out.len() == n);
    let mut k0 = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: AVX-512F is present (checked); every slice has n elements (asserted) and the
        // vector loop only touches indices k..k+16 <= n.
        unsafe { k0 = lstm_cell_avx512(&row, c, h, cs_out, y_out) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() && n - k0 >= 8 {
        let sub = LstmRow {
            i: &mut row.i[k0..],
            f: &mut row.f[k0..],
            g: &mut row.g[k0..],
            o: &mut row.o[k0..],
        };
        // SAFETY: AVX2 and FMA are present (checked); the sub-slices all have n - k0 elements
        // and the vector loop only touches indices below that.
        unsafe {
            k0 +=
                lstm_cell_avx(&sub, &mut c[k0..], &mut h[k0..], &mut cs_out[k0..], &mut y_out[k0..])
        };
    }
    let tail = LstmRow {
        i: &mut row.i[k0..],
        f: &mut row.f[k0..],
        g: &mut row.g[k0..],
        o: &mut row.o[k0..],
    };
    super::float::lstm_cell_scalar(
        tail,
        &mut c[k0..],
        &mut h[k0..],
        &mut cs_out[k0..],
        &mut y_out[k0..],
    );
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lstm_cell_avx512(
    row: &LstmRow<'_, f32>,
    c: &mut [f32],
    h: &mut [f32],
    cs_out: &mut [f32],
    y_out: &mut [f32],
) -> usize {
    let n = c.len();
    let (pi, pf, pg, po) = (
        row.i.as_ptr() as *mut f32,
        row.f.as_ptr() as *mut f32,
        row.g.as_ptr() as *mut f32,
        row.o.as_ptr() as *mut f32,
    );
    let mut k = 0;
    while k + 16 <= n {
        let i = avx512::sigmoid(_mm512_loadu_ps(pi.add(k)));
        let f = avx512::sigmoid(_mm512_loadu_ps(pf.add(k)));
        let gg = avx512::tanh(_mm512_loadu_ps(pg.add(k)));
        let o = avx512::sigmoid(_mm512_loadu_ps(po.add(k)));
        let cv = _mm512_fmadd_ps(f, _mm512_loadu_ps(c.as_ptr().add(k)), _mm512_mul_ps(i, gg));
        let hv = _mm512_mul_ps(o, avx512::tanh(cv));
        _mm512_storeu_ps(pi.add(k), i);
        _mm512_storeu_ps(pf.add(k), f);
        _mm512_storeu_ps(pg.add(k), gg);
        _mm512_storeu_ps(po.add(k), o);
        _mm512_storeu_ps(c.as_mut_ptr().add(k), cv);
        _mm512_storeu_ps(h.as_mut_ptr().add(k), hv);
        _mm512_storeu_ps(cs_out.as_mut_ptr().add(k), cv);
        _mm512_storeu_ps(y_out.as_mut_ptr().add(k), hv);
        k += 16;
    }
    k
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lstm_cell_avx(
    row: &LstmRow<'_, f32>,
    c: &mut [f32],
    h: &mut [f32],
    cs_out: &mut [f32],
    y_out: &mut [f32],
) -> usize {
    let n = c.len();
    let (pi, pf, pg, po) = (
        row.i.as_ptr() as *mut f32,
        row.f.as_ptr() as *mut f32,
        row.g.as_ptr() as *mut f32,
        row.o.as_ptr() as *mut f32,
    );
    let mut k = 0;
    while k + 8 <= n {
        let i = avx::sigmoid(_mm256_loadu_ps(pi.add(k)));
        let f = avx::sigmoid(_mm256_loadu_ps(pf.add(k)));
        let gg = avx::tanh(_mm256_loadu_ps(pg.add(k)));
        let o = avx::sigmoid(_mm256_loadu_ps(po.add(k)));
        let cv = _mm256_fmadd_ps(f, _mm256_loadu_ps(c.as_ptr().add(k)), _mm256_mul_ps(i, gg));
        let hv = _mm256_mul_ps(o, avx::tanh(cv));
        _mm256_storeu_ps(pi.add(k), i);
        _mm256_storeu_ps(pf.add(k), f);
        _mm256_storeu_ps(pg.add(k), gg);
        _mm256_storeu_ps(po.add(k), o);
        _mm256_storeu_ps(c.as_mut_ptr().add(k), cv);
        _mm256_storeu_ps(h.as_mut_ptr().add(k), hv);
        _mm256_storeu_ps(cs_out.as_mut_ptr().add(k), cv);
        _mm256_storeu_ps(y_out.as_mut_ptr().add(k), hv);
        k += 8;
    }
    k
}

/// The gate slices of one GRU row for a range of units: input parts `xr, xz, xn` (receive the
/// activations r, z, n) and recurrent parts `hr, hz, hn` (biases included).
pub struct GruRow<'a, T> {
    pub xr: &'a mut [T],
    pub xz: &'a mut [T],
    pub xn: &'a mut [T],
    pub hr: &'a [T],
    pub hz: &'a [T],
    pub hn: &'a [T],
}

/// GRU cell over a range of units of one row, f32: `h` is updated, `hn_out` receives the
/// recurrent candidate part, `y_out` the new state.
pub fn gru_cell_f32(row: GruRow<'_, f32>, h: &mut [f32], hn_out: &mut [f32], y_out: &mut [f32]) {
    let n = h.len();
    assert!(
        row.xr.len() == n
            && row.xz.len() == n
            && row.xn.len() == n
            && row.hr.len() == n
            && row.hz.len() == n
            && row.hn.len() == n
    );
    assert!(hn_out.len() == n && y_out.len() == n);
    let mut k0 = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: features checked; every slice has n elements; indices stay below n.
        unsafe { k0 = gru_cell_avx(&row, h, hn_out, y_out) };
    }
    let tail = GruRow {
        xr: &mut row.xr[k0..],
        xz: &mut row.xz[k0..],
        xn: &mut row.xn[k0..],
        hr: &row.hr[k0..],
        hz: &row.hz[k0..],
        hn: &row.hn[k0..],
    };
    super::float::gru_cell_scalar(tail, &mut h[k0..], &mut hn_out[k0..], &mut y_out[k0..]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gru_cell_avx(
    row: &GruRow<'_, f32>,
    h: &mut [f32],
    hn_out: &mut [f32],
    y_out: &mut [f32],
) -> usize {
    let n = h.len();
    let (xr, xz, xn) =
        (row.xr.as_ptr() as *mut f32, row.xz.as_ptr() as *mut f32, row.xn.as_ptr() as *mut f32);
    let one = _mm256_set1_ps(1.0);
    let mut k = 0;
    while k + 8 <= n {
        let r = avx::sigmoid(_mm256_add_ps(
            _mm256_loadu_ps(xr.add(k)),
            _mm256_loadu_ps(row.hr.as_ptr().add(k)),
        ));
        let z = avx::sigmoid(_mm256_add_ps(
            _mm256_loadu_ps(xz.add(k)),
            _mm256_loadu_ps(row.hz.as_ptr().add(k)),
        ));
        let hn = _mm256_loadu_ps(row.hn.as_ptr().add(k));
        let nn = avx::tanh(_mm256_fmadd_ps(r, hn, _mm256_loadu_ps(xn.add(k))));
        let hprev = _mm256_loadu_ps(h.as_ptr().add(k));
        let hv = _mm256_fmadd_ps(_mm256_sub_ps(one, z), nn, _mm256_mul_ps(z, hprev));
        _mm256_storeu_ps(xr.add(k), r);
        _mm256_storeu_ps(xz.add(k), z);
        _mm256_storeu_ps(xn.add(k), nn);
        _mm256_storeu_ps(hn_out.as_mut_ptr().add(k), hn);
        _mm256_storeu_ps(h.as_mut_ptr().add(k), hv);
        _mm256_storeu_ps(y_out.as_mut_ptr().add(k), hv);
        k += 8;
    }
    k
}

/// The largest element (-inf for an empty slice; NaNs are skipped, as the exp that follows
/// propagates them): the softmax's first pass.
pub fn max_f32(x: &[f32]) -> f32 {
    let mut k = 0;
    let mut m = f32::NEG_INFINITY;
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: AVX-512F present (checked); k + 16 <= len for every vector access.
        unsafe { (k, m) = max_avx512(x) };
    }
    for &v in &x[k..] {
        if v > m {
            m = v;
        }
    }
    m
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_avx512(x: &[f32]) -> (usize, f32) {
    // Two accumulators hide the max's latency.
    let (mut a, mut b) = (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_set1_ps(f32::NEG_INFINITY));
    let mut k = 0;
    while k + 32 <= x.len() {
        a = _mm512_max_ps(a, _mm512_loadu_ps(x.as_ptr().add(k)));
        b = _mm512_max_ps(b, _mm512_loadu_ps(x.as_ptr().add(k + 16)));
        k += 32;
    }
    if k + 16 <= x.len() {
        a = _mm512_max_ps(a, _mm512_loadu_ps(x.as_ptr().add(k)));
        k += 16;
    }
    (k, _mm512_reduce_max_ps(_mm512_max_ps(a, b)))
}

/// `x[k] = exp(x[k] - m)` in place; returns the sum (the softmax inner loop).
pub fn exp_sub_sum_f32(x: &mut [f32], m: f32) -> f32 {
    let mut k = 0;
    let mut sum = 0.0f32;
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: AVX-512F present (checked); k + 16 <= len for every vector access.
        unsafe { (k, sum) = exp_sub_sum_avx512(x, m) };
    } else if has_avx2_fma() {
        // SAFETY: features checked; k + 8 <= len for every vector access.
        unsafe {
            let (kk, s) = exp_sub_sum_avx(x, m);
            k = kk;
            sum = s;
        }
    }
    for v in &mut x[k..] {
        *v = (*v - m).exp();
        sum += *v;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_sub_sum_avx512(x: &mut [f32], m: f32) -> (usize, f32) {
    let mv = _mm512_set1_ps(m);
    let mut acc = _mm512_setzero_ps();
    let mut k = 0;
    while k + 16 <= x.len() {
        let e = avx512::exp(_mm512_sub_ps(_mm512_loadu_ps(x.as_ptr().add(k)), mv));
        _mm512_storeu_ps(x.as_mut_ptr().add(k), e);
        acc = _mm512_add_ps(acc, e);
        k += 16;
    }
    (k, _mm512_reduce_add_ps(acc))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum_avx(x: &mut [f32], m: f32) -> (usize, f32) {
    let mv = _mm256_set1_ps(m);
    let mut acc = _mm256_setzero_ps();
    let mut k = 0;
    while k + 8 <= x.len() {
        let e = avx::exp(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(k)), mv));
        _mm256_storeu_ps(x.as_mut_ptr().add(k), e);
        acc = _mm256_add_ps(acc, e);
        k += 8;
    }
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    (k, lanes.iter().sum())
}

/// `out[k] = tanh(x[k])` for f32 slices (vectorised when possible).
pub fn tanh_f32(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    let mut k = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: features checked; k + 8 <= len for every vector access.
        unsafe { k = tanh_avx(x, out) };
    }
    for j in k..x.len() {
        out[j] = x[j].tanh();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tanh_avx(x: &[f32], out: &mut [f32]) -> usize {
    let mut k = 0;
    while k + 8 <= x.len() {
        _mm256_storeu_ps(out.as_mut_ptr().add(k), avx::tanh(_mm256_loadu_ps(x.as_ptr().add(k))));
        k += 8;
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep() -> Vec<f32> {
        let mut v = Vec::new();
        let mut x = -100.0f32;
        while x < 100.0 {
            v.push(x);
            x += 0.0137;
        }
        for e in -40..3 {
            let m = 10f32.powi(e);
            v.extend([m, -m, 1.7 * m, -3.1 * m]);
        }
        v.extend([0.0, -0.0, 0.625, -0.625, 0.62499, 88.0, -88.0, 87.4, -87.4, 200.0, -200.0]);
        v
    }

    #[test]
    fn activations_match_f64() {
        if !has_avx2_fma() {
            return;
        }
        let xs = sweep();
        let mut out = vec![0.0; xs.len()];
        tanh_f32(&xs, &mut out);
        for (&x, &y) in xs.iter().zip(&out) {
            let t = (x as f64).tanh();
            assert!(
                (y as f64 - t).abs() <= 4.0 * f32::EPSILON as f64 * t.abs() + 1e-30,
                "tanh({x}) = {y}, want {t}"
            );
        }
        // sigmoid and exp through the LSTM cell: pre-activations x, c = 0; rows of 8 (AVX2),
        // 16 (AVX-512 where present) and 27 (16 + 8 + a scalar tail).
        for w in [8usize, 16, 27] {
            cell_rows_match_f64(&xs, w);
        }
    }

    #[test]
    fn nan_propagates() {
        let mut x = vec![0.5f32; 40];
        x[3] = f32::NAN;
        x[20] = f32::NAN;
        x[37] = f32::NAN;
        let mut out = vec![0.0; 40];
        tanh_f32(&x, &mut out);
        for (a, b) in x.iter().zip(&out) {
            assert_eq!(a.is_nan(), b.is_nan());
        }
        let mut e = x.clone();
        assert!(exp_sub_sum_f32(&mut e, 0.0).is_nan());
        for (a, b) in x.iter().zip(&e) {
            assert_eq!(a.is_nan(), b.is_nan());
        }
    }

    #[test]
    fn softmax_passes_match_f64() {
        // Lengths around the 16/32-lane loops and their tails; -inf entries (masked keys).
        for n in [0usize, 1, 7, 15, 16, 17, 31, 32, 33, 64, 100] {
            let mut x: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.9).collect();
            if n > 3 {
                x[2] = f32::NEG_INFINITY;
            }
            let want_max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(max_f32(&x), want_max, "max, n={n}");
            if n == 0 {
                continue;
            }
            let want: Vec<f64> = x.iter().map(|&v| (v as f64 - want_max as f64).exp()).collect();
            let sum = exp_sub_sum_f32(&mut x, want_max);
            let want_sum: f64 = want.iter().sum();
            assert!(
                (sum as f64 - want_sum).abs() <= 1e-6 * want_sum,
                "sum, n={n}: {sum} vs {want_sum}"
            );
            for (&g, &w) in x.iter().zip(&want) {
                // x - m is rounded to f32 first: |x - m| < 32 here, so up to ~2e-6 relative.
                assert!((g as f64 - w).abs() <= 4e-6 * w, "exp, n={n}: {g} vs {w}");
            }
        }
    }

    fn cell_rows_match_f64(xs: &[f32], w: usize) {
        for chunk in xs.chunks(w) {
            if chunk.len() < w {
                continue;
            }
            let mut g: Vec<f32> =
                chunk.iter().chain(chunk).chain(chunk).chain(chunk).copied().collect();
            let (mut c, mut h, mut cs, mut y) =
                (vec![0.0; w], vec![0.0; w], vec![0.0; w], vec![0.0; w]);
            let (gi, rest) = g.split_at_mut(w);
            let (gf, rest) = rest.split_at_mut(w);
            let (gg, go) = rest.split_at_mut(w);
            lstm_cell_f32(LstmRow { i: gi, f: gf, g: gg, o: go }, &mut c, &mut h, &mut cs, &mut y);
            for k in 0..w {
                let x = chunk[k] as f64;
                let s = 1.0 / (1.0 + (-x).exp());
                assert!(
                    (g[k] as f64 - s).abs() <= 4.0 * f32::EPSILON as f64 * s + 1e-37,
                    "sigmoid({x}) = {}, want {s}",
                    g[k]
                );
                let cv = s * x.tanh();
                let hv = s * cv.tanh();
                assert!(
                    (y[k] as f64 - hv).abs() <= 1e-6 * hv.abs() + 1e-37,
                    "h({x}) = {}, want {hv}",
                    y[k]
                );
            }
        }
    }
}
