//! Scaled-dot-product attention, forward and backward, CPU (f32 / f64).
//!
//! The scores of each block of 64 query rows are one matrix product (the query block scaled
//! first) against only the keys that block can see (causal limit, padded suffix); each row is
//! then softmaxed in place in two vector passes (max, then exp and sum; padded keys inside the
//! visible range set to -inf, keys past the row's causal limit zeroed) and left unnormalised:
//! the output row is divided by the sum after the product by V (Dv values instead of Tk). The
//! backward recomputes the probabilities from the saved log-sum-exp (five products per block,
//! FlashAttention-2's formulation). Work is parallel over (batch, head) for the forward and
//! (batch, kv head) for the backward, each task's query blocks dealt into parts when there are
//! too few tasks for the threads (batch 1); backward parts keep their own dK/dV, summed after.
//! Memory per task is one `64 x Tk` score block (two in the backward). Whole-key-range blocks
//! rather than a tiled online softmax keep the packed kernel at its full rate and softmax each
//! row once: the measurements are in docs/kernels.md.
//!
//! Semantics: q `(B, Hq, Tq, D)`, k `(B, Hk, Tk, D)`, v `(B, Hk, Tk, Dv)`, `Hk` divides `Hq`
//! (grouped-query attention: q head h reads kv head `h / (Hq / Hk)`); the causal mask is
//! aligned to the end (query i sees keys `j <= i + Tk - Tq`, the KV-cache convention); a key
//! marked in `key_padding` (B, Tk) is ignored; a row with no visible key outputs zeros and has
//! log-sum-exp -inf (its gradients are zero).

use std::any::TypeId;

use super::team::{self, Shared};

use super::smallmm::{self, Lhs, Packed};
use super::{matmul, zeroed, Float, Mat};
use crate::{Error, Result};

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub b: usize,
    pub hq: usize,
    pub hk: usize,
    pub tq: usize,
    pub tk: usize,
    pub d: usize,
    pub dv: usize,
}

impl Shape {
    fn check<T>(&self, q: &[T], k: &[T], v: &[T], pad: Option<&[bool]>) -> Result<()> {
        if self.hk == 0 || !self.hq.is_multiple_of(self.hk) {
            return Err(Error::value(format!(
                "kv heads ({}) must divide query heads ({})",
                self.hk, self.hq
            )));
        }
        if self.d == 0 || self.dv == 0 {
            return Err(Error::value(format!(
                "head dims must be positive, got {} (q, k) and {} (v)",
                self.d, self.dv
            )));
        }
        let want = [
            ("q", q.len(), self.b * self.hq * self.tq * self.d),
            ("k", k.len(), self.b * self.hk * self.tk * self.d),
            ("v", v.len(), self.b * self.hk * self.tk * self.dv),
        ];
        for (name, got, want) in want {
            if got != want {
                return Err(Error::value(format!("{name} has {got} elements, expected {want}")));
            }
        }
        if let Some(p) = pad {
            if p.len() != self.b * self.tk {
                return Err(Error::value(format!(
                    "key_padding_mask has {} elements, expected {}",
                    p.len(),
                    self.b * self.tk
                )));
            }
        }
        Ok(())
    }
}

/// One past the last key query row `i` sees (the causal limit, capped at `lim`, the keys its
/// block computed).
#[inline]
fn row_limit(i: usize, sh: &Shape, causal: bool, lim: usize) -> usize {
    let c = if causal { (i + 1 + sh.tk).saturating_sub(sh.tq) } else { sh.tk };
    c.min(lim)
}

/// The padded keys before the last unpadded one ("holes"): the padded suffix is never
/// computed (see [`key_limit`]), so only these need masking inside a row.
fn holes(pad: Option<&[bool]>, plim: usize) -> Vec<usize> {
    pad.map_or_else(Vec::new, |p| (0..plim).filter(|&j| p[j]).collect())
}

/// Softmax of one (already scaled) score row over its first `lr` keys, in place, with the
/// holes masked and keys `lr..` zeroed. Returns `(max, sum)`; `None` when no key is visible
/// (the row is all zeros then). The row is left unnormalised (`exp(s - max)`): the caller
/// divides the output row by `sum` instead (Dv values rather than Tk).
#[inline]
fn softmax_row<T: Float>(row: &mut [T], lr: usize, holes: &[usize], neg_inf: T) -> Option<(T, T)> {
    for &j in holes.iter().take_while(|&&j| j < lr) {
        row[j] = neg_inf;
    }
    let mut m = T::max_slice(&row[..lr]);
    if m == neg_inf {
        // No visible key, unless NaN scores (skipped by the max) hide one: those propagate.
        match row[..lr].iter().find(|x| x.to_f64().is_nan()) {
            Some(&nan) => m = nan,
            None => {
                row.fill(T::ZERO);
                return None;
            }
        }
    }
    let sum = T::exp_sub_sum(&mut row[..lr], m);
    row[lr..].fill(T::ZERO);
    Some((m, sum))
}

/// `dst = src * scale` (a query block, scaled once so the scores come out scaled).
#[inline]
fn scaled_copy<T: Float>(dst: &mut [T], src: &[T], scale: T) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = x * scale;
    }
}

fn ln<T: Float>(x: T) -> T {
    // Once per row, so f64 is fine.
    T::from_f64(x.to_f64().ln())
}

/// Query rows per block. Each block multiplies only by the keys some row of it can see (the
/// causal limit of its last row, and the last unpadded key), so causal attention does about
/// half the work of full attention and a padded suffix costs nothing.
const QB: usize = 64;

/// Row stride of a score block: Tk rounded up to 16 floats plus 16, so that rows are not a
/// multiple of 4 KiB apart (else the rows a tile of `dV += Pᵀ dO` reads down a column share
/// one L1 set: 75 ms instead of 57 at causal T=1024, see docs/kernels.md).
fn score_stride(tk: usize) -> usize {
    tk.div_ceil(16) * 16 + 16
}

/// One past the last key any query of `[i0, i1)` may see.
#[inline]
fn key_limit(i1: usize, sh: &Shape, causal: bool, pad_limit: usize) -> usize {
    let c = if causal { (i1 + sh.tk).saturating_sub(sh.tq).min(sh.tk) } else { sh.tk };
    c.min(pad_limit)
}

/// One past the last key that is not padding.
fn pad_limit(pad: Option<&[bool]>, tk: usize) -> usize {
    match pad {
        Some(p) => p.iter().rposition(|&x| !x).map_or(0, |i| i + 1),
        None => tk,
    }
}

/// The right-hand side of a per-block product, `B (K x N)` from any view. In f32 it is packed
/// once per head into 16-column panels and multiplied by the AVX-512/AVX2 packed kernel, each
/// query block reading only the panels (columns) and rows (inner dimension) it can see (the
/// `gemm` crate re-packs per block: see docs/kernels.md). Otherwise the general GEMM.
enum Rhs<'a, T> {
    Packed(Packed),
    Plain(Mat<T>, std::marker::PhantomData<&'a T>),
}

impl<'a, T: Float> Rhs<'a, T> {
    fn new(b: Mat<T>) -> Self {
        if TypeId::of::<T>() == TypeId::of::<f32>() {
            // T is f32 (checked): the view's elements are f32.
            Rhs::Packed(Packed::new(Mat {
                ptr: b.ptr as *const f32,
                rows: b.rows,
                cols: b.cols,
                rs: b.rs,
                cs: b.cs,
            }))
        } else {
            Rhs::Plain(b, std::marker::PhantomData)
        }
    }

    /// `dst (row stride ldd) = a (row stride lda, nb rows) · B[:inner, :cols]`.
    fn mm(&self, dst: &mut [T], ldd: usize, lhs: Lhs<'_, T>, inner: usize, cols: usize) {
        let Lhs { a, lda, m: nb } = lhs;
        match self {
            Rhs::Packed(p) => {
                assert!(
                    nb == 0
                        || (dst.len() >= (nb - 1) * ldd + p.cols()
                            && ldd >= p.cols()
                            && a.len() >= (nb - 1) * lda + inner)
                );
                // SAFETY: T is f32 (a Packed exists only then); bounds checked above.
                unsafe {
                    smallmm::mm_raw_k(
                        dst.as_mut_ptr() as *mut f32,
                        ldd,
                        lhs.f32(),
                        p,
                        false,
                        (0, cols.div_ceil(16)),
                        (0, inner),
                    );
                }
            }
            Rhs::Plain(b, _) => {
                assert!(nb == 0 || a.len() >= (nb - 1) * lda + inner);
                let am = Mat { ptr: a.as_ptr(), rows: nb, cols: inner, rs: lda as isize, cs: 1 };
                let bm = Mat { ptr: b.ptr, rows: inner, cols, rs: b.rs, cs: b.cs };
                matmul(dst, ldd, am, bm, false, 1);
            }
        }
    }
}

/// `dst[m x n] += aᵀ · b` for `a (kb x m)` (`lhs`: row stride `lda`, `m` columns used) and
/// `b (kb x n)` row-major: the backward's `dV += Pᵀ dO` and `dK += dSᵀ Q` over one query block
/// (kb = its rows). In f32 through the packed kernel reading `a` transposed in place (2.3x the
/// `gemm` crate per product, which would copy the transpose); else the general GEMM.
fn mm_tn<T: Float>(dst: &mut [T], ldd: usize, lhs: Lhs<'_, T>, kb: usize, b: &[T], n: usize) {
    let Lhs { a, lda, m } = lhs;
    if m == 0 || kb == 0 {
        return;
    }
    assert!(
        dst.len() >= (m - 1) * ldd + n
            && ldd >= n
            && a.len() >= (kb - 1) * lda + m
            && lda >= m
            && b.len() >= kb * n
    );
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32 (checked); bounds asserted above; `dst` is exclusively borrowed.
        unsafe {
            let b32 = std::slice::from_raw_parts(b.as_ptr() as *const f32, kb * n);
            let packed = Packed::new(Mat::rm(b32, kb, n));
            let lhs = Lhs { a, lda, m }.f32();
            smallmm::mm_raw_t(dst.as_mut_ptr() as *mut f32, ldd, lhs, &packed, true);
        }
    } else {
        let am = Mat { ptr: a.as_ptr(), rows: kb, cols: m, rs: lda as isize, cs: 1 };
        matmul(&mut dst[..(m - 1) * ldd + n], ldd, am.t(), Mat::rm(&b[..kb * n], kb, n), true, 1);
    }
}

/// How many parts a head's query blocks are dealt into (block `i` to part `i % parts`, which
/// balances the causal triangle), so that a small batch still gives every thread work: one
/// part when the (batch, head) tasks alone give each thread two or more.
fn parts(tasks: usize, blocks: usize, threads: usize) -> usize {
    let threads = threads.clamp(1, crate::parallel::available_threads().max(1));
    if threads == 1 || tasks >= 2 * threads {
        1
    } else {
        (2 * threads).div_ceil(tasks.max(1)).min(blocks).max(1)
    }
}

/// One attention call: `q`, `k`, `v` of `shape` (see the module doc), whether the mask is
/// `causal`, the optional `key_padding` (B, Tk; true for keys to ignore), the score `scale`
/// and the most `threads` to use.
#[derive(Clone, Copy)]
pub struct AttentionArgs<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub shape: Shape,
    pub causal: bool,
    pub key_padding: Option<&'a [bool]>,
    pub scale: T,
    pub threads: usize,
}

/// Forward: returns `o (B, Hq, Tq, Dv)` and `lse (B, Hq, Tq)`.
pub fn forward<T: Float>(args: &AttentionArgs<'_, T>) -> Result<(Vec<T>, Vec<T>)> {
    let AttentionArgs { q, k, v, shape: sh, causal, key_padding, scale, threads } = *args;
    sh.check(q, k, v, key_padding)?;
    let group = sh.hq / sh.hk;
    let neg_inf = T::from_f64(f64::NEG_INFINITY);
    let mut o: Vec<T> = zeroed(sh.b * sh.hq * sh.tq * sh.dv);
    let mut lse = vec![neg_inf; sh.b * sh.hq * sh.tq];
    let (op, lp) = (Shared(o.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    let blocks = sh.tq.div_ceil(QB);
    let np = parts(sh.b * sh.hq, blocks, threads);
    team::for_each(threads, if sh.tq == 0 { 0 } else { sh.b * sh.hq * np }, |item| {
        let (bh, part) = (item / np, item % np);
        let (b, h) = (bh / sh.hq, bh % sh.hq);
        let kvh = b * sh.hk + h / group;
        let qh = &q[bh * sh.tq * sh.d..(bh + 1) * sh.tq * sh.d];
        let kh = &k[kvh * sh.tk * sh.d..(kvh + 1) * sh.tk * sh.d];
        let vh = &v[kvh * sh.tk * sh.dv..(kvh + 1) * sh.tk * sh.dv];
        let pad = key_padding.map(|p| &p[b * sh.tk..(b + 1) * sh.tk]);
        let plim = pad_limit(pad, sh.tk);
        // Packed once per head: Kᵀ (scores) and V (output).
        let kt = Rhs::new(Mat::rm(kh, sh.tk, sh.d).t());
        let vv = Rhs::new(Mat::rm(vh, sh.tk, sh.dv));
        let ld = score_stride(sh.tk);
        let hole = holes(pad, plim);
        let mut s = vec![T::ZERO; QB.min(sh.tq) * ld];
        let mut qs = vec![T::ZERO; QB.min(sh.tq) * sh.d];
        let mut inv = [T::ZERO; QB];
        for i0 in (part * QB..sh.tq).step_by(np * QB) {
            let i1 = (i0 + QB).min(sh.tq);
            let (nb, lim) = (i1 - i0, key_limit(i1, &sh, causal, plim));
            if lim == 0 {
                continue; // every row sees no key: zeros, lse -inf
            }
            // SAFETY: this item alone handles query block [i0, i1) of head bh: it alone writes
            // those rows of `o` and `lse`, which lie inside the buffers (sizes fixed above).
            let (orows, lb) = unsafe {
                (op.slice((bh * sh.tq + i0) * sh.dv, nb * sh.dv), lp.slice(bh * sh.tq + i0, nb))
            };
            let sb = &mut s[..nb * ld];
            scaled_copy(&mut qs[..nb * sh.d], &qh[i0 * sh.d..i1 * sh.d], scale);
            kt.mm(sb, ld, Lhs { a: &qs[..nb * sh.d], lda: sh.d, m: nb }, sh.d, lim);
            for r in 0..nb {
                let row = &mut sb[r * ld..r * ld + lim];
                inv[r] = match softmax_row(row, row_limit(i0 + r, &sh, causal, lim), &hole, neg_inf)
                {
                    Some((m, sum)) => {
                        lb[r] = m + ln(sum);
                        T::ONE / sum
                    }
                    None => T::ZERO, // lse stays -inf, output row 0
                };
            }
            vv.mm(orows, sh.dv, Lhs { a: sb, lda: ld, m: nb }, lim, sh.dv);
            for (orow, &iv) in orows.chunks_exact_mut(sh.dv).zip(&inv) {
                for x in orow {
                    *x = *x * iv;
                }
            }
        }
    });
    Ok((o, lse))
}

/// Backward: returns `(dq, dk, dv)` given the forward's `o` and `lse` and the output's
/// gradient `d_o`.
pub fn backward<T: Float>(
    args: &AttentionArgs<'_, T>,
    o: &[T],
    lse: &[T],
    d_o: &[T],
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let AttentionArgs { q, k, v, shape: sh, causal, key_padding, scale, threads } = *args;
    sh.check(q, k, v, key_padding)?;
    let n_o = sh.b * sh.hq * sh.tq * sh.dv;
    if o.len() != n_o || d_o.len() != n_o || lse.len() != sh.b * sh.hq * sh.tq {
        return Err(Error::value(
            "saved output, its gradient or the log-sum-exp has the wrong size",
        ));
    }
    let group = sh.hq / sh.hk;
    let neg_inf = T::from_f64(f64::NEG_INFINITY);
    let mut dq: Vec<T> = zeroed(q.len());
    let mut dk: Vec<T> = zeroed(k.len());
    let mut dv: Vec<T> = zeroed(v.len());
    let (qsz, ksz, vsz) = (sh.tq * sh.d, sh.tk * sh.d, sh.tk * sh.dv);
    if qsz == 0 || ksz == 0 {
        return Ok((dq, dk, dv));
    }
    // One task per (batch, kv head) and part of its query blocks: it owns dq of its blocks'
    // rows for the whole query group, and dk/dv of its kv head (part 0 in the outputs, part
    // p > 0 in scratch slice p - 1, summed in after: small batches use every thread).
    let np = parts(sh.b * sh.hk, sh.tq.div_ceil(QB), threads);
    let mut dk_more: Vec<T> = if np > 1 { zeroed((np - 1) * k.len()) } else { Vec::new() };
    let mut dv_more: Vec<T> = if np > 1 { zeroed((np - 1) * v.len()) } else { Vec::new() };
    let (dqp, dkp, dvp) =
        (Shared(dq.as_mut_ptr()), Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr()));
    let (dkm, dvm) = (Shared(dk_more.as_mut_ptr()), Shared(dv_more.as_mut_ptr()));
    team::for_each(threads, sh.b * sh.hk * np, |item| {
        let (bkv, part) = (item / np, item % np);
        // SAFETY: item (bkv, part) alone writes its kv head's dk/dv slice of its part
        // (the outputs for part 0, scratch slice part - 1 otherwise); all inside the buffers
        // (sized from the checked shape and np).
        let (dkh, dvh) = unsafe {
            if part == 0 {
                (dkp.slice(bkv * ksz, ksz), dvp.slice(bkv * vsz, vsz))
            } else {
                (
                    dkm.slice((part - 1) * k.len() + bkv * ksz, ksz),
                    dvm.slice((part - 1) * v.len() + bkv * vsz, vsz),
                )
            }
        };
        let b = bkv / sh.hk;
        let kh = &k[bkv * ksz..(bkv + 1) * ksz];
        let vh = &v[bkv * vsz..(bkv + 1) * vsz];
        let pad = key_padding.map(|p| &p[b * sh.tk..(b + 1) * sh.tk]);
        let plim = pad_limit(pad, sh.tk);
        let ld = score_stride(sh.tk);
        // Packed once per (batch, kv head): Kᵀ (scores), Vᵀ (dP) and K (dQ).
        let kt = Rhs::new(Mat::rm(kh, sh.tk, sh.d).t());
        let vt = Rhs::new(Mat::rm(vh, sh.tk, sh.dv).t());
        let kk = Rhs::new(Mat::rm(kh, sh.tk, sh.d));
        let mut p = vec![T::ZERO; QB.min(sh.tq) * ld];
        let mut dp = vec![T::ZERO; QB.min(sh.tq) * ld];
        let mut qs = vec![T::ZERO; QB.min(sh.tq) * sh.d];
        let hole = holes(pad, plim);
        for g in 0..group {
            let bh = bkv * group + g;
            let qh = &q[bh * qsz..(bh + 1) * qsz];
            let oh = &o[bh * sh.tq * sh.dv..(bh + 1) * sh.tq * sh.dv];
            let doh = &d_o[bh * sh.tq * sh.dv..(bh + 1) * sh.tq * sh.dv];
            let lh = &lse[bh * sh.tq..(bh + 1) * sh.tq];
            for i0 in (part * QB..sh.tq).step_by(np * QB) {
                let i1 = (i0 + QB).min(sh.tq);
                let (nb, lim) = (i1 - i0, key_limit(i1, &sh, causal, plim));
                if lim == 0 {
                    continue; // no key seen: all gradients of these rows are 0
                }
                let (qb, dob, ob) = (
                    &qh[i0 * sh.d..i1 * sh.d],
                    &doh[i0 * sh.dv..i1 * sh.dv],
                    &oh[i0 * sh.dv..i1 * sh.dv],
                );
                // P = exp(S * scale - lse), 0 on masked keys and fully masked rows.
                let pb = &mut p[..nb * ld];
                scaled_copy(&mut qs[..nb * sh.d], qb, scale);
                kt.mm(pb, ld, Lhs { a: &qs[..nb * sh.d], lda: sh.d, m: nb }, sh.d, lim);
                for r in 0..nb {
                    let row = &mut pb[r * ld..r * ld + lim];
                    let (l, lr) = (lh[i0 + r], row_limit(i0 + r, &sh, causal, lim));
                    if !(l > neg_inf) || lr == 0 {
                        row.fill(T::ZERO);
                        continue;
                    }
                    for &j in hole.iter().take_while(|&&j| j < lr) {
                        row[j] = neg_inf;
                    }
                    T::exp_sub_sum(&mut row[..lr], l);
                    row[lr..].fill(T::ZERO);
                }
                // dV += Pᵀ dO
                mm_tn(
                    &mut dvh[..lim * sh.dv],
                    sh.dv,
                    Lhs { a: pb, lda: ld, m: lim },
                    nb,
                    dob,
                    sh.dv,
                );
                // dP = dO Vᵀ; dS = P ∘ (dP − rowsum(dO ∘ O)) * scale
                let dpb = &mut dp[..nb * ld];
                vt.mm(dpb, ld, Lhs { a: dob, lda: sh.dv, m: nb }, sh.dv, lim);
                for r in 0..nb {
                    let mut dsum = T::ZERO;
                    for c in 0..sh.dv {
                        dsum += dob[r * sh.dv + c] * ob[r * sh.dv + c];
                    }
                    let (pr, dr) = (&pb[r * ld..r * ld + lim], &mut dpb[r * ld..r * ld + lim]);
                    for (d, &pv) in dr.iter_mut().zip(pr) {
                        *d = pv * (*d - dsum) * scale;
                    }
                }
                // dQ = dS K ; dK += dSᵀ Q
                // SAFETY: this item alone handles query block [i0, i1) of head bh, so it
                // alone writes those rows of dq (inside the buffer: the shape is checked).
                let dqb = unsafe { dqp.slice(bh * qsz + i0 * sh.d, nb * sh.d) };
                kk.mm(dqb, sh.d, Lhs { a: dpb, lda: ld, m: nb }, lim, sh.d);
                mm_tn(&mut dkh[..lim * sh.d], sh.d, Lhs { a: dpb, lda: ld, m: lim }, nb, qb, sh.d);
            }
        }
    });
    for (acc, more) in [(&mut dk, &dk_more), (&mut dv, &dv_more)] {
        for part in more.chunks_exact(acc.len().max(1)) {
            for (a, &m) in acc.iter_mut().zip(part) {
                *a += m;
            }
        }
    }
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_block_parts_match_one_thread() {
        // One (batch, kv head) task over 3 query blocks: 2 threads deal them into parts (the
        // backward sums dK/dV parts); the results equal one thread's.
        let sh = Shape { b: 1, hq: 2, hk: 1, tq: 150, tk: 150, d: 8, dv: 8 };
        let mut rng = crate::testutil::Lcg(5);
        let mut r = |n: usize| rng.uniform(n);
        let (q, k, v, g) = (r(2 * 150 * 8), r(150 * 8), r(150 * 8), r(2 * 150 * 8));
        assert!(parts(1, 3, 2) > 1 || crate::parallel::available_threads() < 2);
        for causal in [false, true] {
            let a1 = AttentionArgs {
                q: &q,
                k: &k,
                v: &v,
                shape: sh,
                causal,
                key_padding: None,
                scale: 0.3,
                threads: 1,
            };
            let a2 = AttentionArgs { threads: 2, ..a1 };
            let (o1, l1) = forward(&a1).unwrap();
            let (o2, l2) = forward(&a2).unwrap();
            let g1 = backward(&a1, &o1, &l1, &g).unwrap();
            let g2 = backward(&a2, &o2, &l2, &g).unwrap();
            let close = |a: &[f64], b: &[f64]| {
                a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-12 * (1.0 + x.abs()))
            };
            assert!(close(&o1, &o2) && close(&l1, &l2));
            assert!(
                close(&g1.0, &g2.0) && close(&g1.1, &g2.1) && close(&g1.2, &g2.2),
                "causal={causal}"
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let sh = Shape { b: 2, hq: 4, hk: 2, tq: 3, tk: 5, d: 4, dv: 3 };
        let mut rng = crate::testutil::Lcg(11);
        let mut r = |n: usize| rng.uniform(n);
        let q = r(2 * 4 * 3 * 4);
        let k = r(2 * 2 * 5 * 4);
        let v = r(2 * 2 * 5 * 3);
        let g = r(2 * 4 * 3 * 3);
        let mut pad = vec![false; 10];
        pad[4] = true;
        pad[5] = true;
        pad[6] = true;
        pad[7] = true;
        pad[8] = true; // batch 1 sees only key 4 (causal rows 0..1 then see nothing)
        for causal in [false, true] {
            let args = AttentionArgs {
                q: &q,
                k: &k,
                v: &v,
                shape: sh,
                causal,
                key_padding: Some(&pad),
                scale: 0.7,
                threads: 2,
            };
            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                let (o, _) = forward(&AttentionArgs { q, k, v, ..args }).unwrap();
                o.iter().zip(&g).map(|(a, b)| a * b).sum()
            };
            let (o, lse) = forward(&args).unwrap();
            let (dq, dk, dv) = backward(&args, &o, &lse, &g).unwrap();
            for (which, (x, grad)) in [(&q, &dq), (&k, &dk), (&v, &dv)].into_iter().enumerate() {
                for idx in 0..x.len() {
                    let mut xp = x.clone();
                    xp[idx] += 1e-6;
                    let mut xm = x.clone();
                    xm[idx] -= 1e-6;
                    let (fp, fm) = match which {
                        0 => (loss(&xp, &k, &v), loss(&xm, &k, &v)),
                        1 => (loss(&q, &xp, &v), loss(&q, &xm, &v)),
                        _ => (loss(&q, &k, &xp), loss(&q, &k, &xm)),
                    };
                    let num = (fp - fm) / 2e-6;
                    assert!(
                        (num - grad[idx]).abs() < 1e-7,
                        "causal={causal} arg {which}[{idx}]: {num} vs {}",
                        grad[idx]
                    );
                }
            }
        }
    }
}
