//! Float32 rows for the fused decode step: `out[i][j] = w_j · x_i` for a run of rows `j` of a
//! row-major float32 matrix and the step's `m` input rows `i` (one per sequence of the batch).
//!
//! Why by hand: the step's float products stream the weights once per token, and the generic
//! `decode::dot` is compiled for the baseline x86-64 (SSE2); here AVX-512 or AVX2 with FMA
//! is chosen at run time (the quantized kernels' [`Isa`]), the scalar path being that `dot`.
//! Four weight rows are taken at a time, so each load of an input row serves four weight rows;
//! with several input rows (batched decoding) each load of a weight row serves four input rows
//! (AVX-512; two with AVX2's 16 registers) while the four weight rows sit in L1. Every (i, j)
//! pair keeps its own accumulator, summed in the same order whatever `m` is, so a row's logits
//! do not depend on the batch it decodes in.

use super::Isa;
use crate::kernels::decode::dot;

/// Calls `put(i, j, w[j] · x[i])` for every input row `i < m` of `x` (m rows of `k` values)
/// and every weight row `j` in `rows` (`w` holds rows of `k` values).
pub fn block<F: FnMut(usize, usize, f32)>(
    isa: Isa,
    w: &[f32],
    x: &[f32],
    m: usize,
    rows: (usize, usize),
    mut put: F,
) {
    assert!(m > 0 && x.len().is_multiple_of(m), "float rows: x holds m rows");
    let k = x.len() / m;
    assert!(rows.0 <= rows.1 && rows.1 * k <= w.len(), "float rows shapes");
    let xr = |i: usize| &x[i * k..(i + 1) * k];
    let mut j = rows.0;
    #[cfg(target_arch = "x86_64")]
    while j + 4 <= rows.1 && isa != Isa::Scalar {
        let r = |t: usize| &w[(j + t) * k..(j + t + 1) * k];
        let four = [r(0), r(1), r(2), r(3)];
        let mut i = 0;
        // SAFETY (every call below): `isa` is available (from `Isa::detect` or checked by the
        // caller); every weight and input row holds k values.
        if isa == Isa::Avx512Vnni {
            while i + 4 <= m {
                let v =
                    unsafe { avx512::dot4xm::<4>(four, [xr(i), xr(i + 1), xr(i + 2), xr(i + 3)]) };
                put_tile(&mut put, &v, i, j);
                i += 4;
            }
        } else {
            while i + 2 <= m {
                let v = unsafe { avx2::dot4xm::<2>(four, [xr(i), xr(i + 1)]) };
                put_tile(&mut put, &v, i, j);
                i += 2;
            }
        }
        while i < m {
            let v = unsafe {
                if isa == Isa::Avx512Vnni {
                    avx512::dot4xm::<1>(four, [xr(i)])
                } else {
                    avx2::dot4xm::<1>(four, [xr(i)])
                }
            };
            put_tile(&mut put, &v, i, j);
            i += 1;
        }
        j += 4;
    }
    while j < rows.1 {
        let wj = &w[j * k..(j + 1) * k];
        for i in 0..m {
            put(i, j, dot(wj, xr(i)));
        }
        j += 1;
    }
}

/// Hands a tile of `M` input rows × 4 weight rows (`v[a][t]` = input row `i + a` · weight row
/// `j + t`) to `put`.
#[cfg(target_arch = "x86_64")]
fn put_tile<F: FnMut(usize, usize, f32), const M: usize>(
    put: &mut F,
    v: &[[f32; 4]; M],
    i: usize,
    j: usize,
) {
    for (a, va) in v.iter().enumerate() {
        for (t, &s) in va.iter().enumerate() {
            put(i + a, j + t, s);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `out[a][r] = w[r] · x[a]`: 4 × M accumulators (M ≤ 4 keeps them and the loads in the 32
    /// registers).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn dot4xm<const M: usize>(w: [&[f32]; 4], x: [&[f32]; M]) -> [[f32; 4]; M] {
        let k = x[0].len();
        let mut acc = [[_mm512_setzero_ps(); 4]; M];
        let mut i = 0;
        while i + 16 <= k {
            let mut wv = [_mm512_setzero_ps(); 4];
            for r in 0..4 {
                // Four rows are four streams: each asks for its weights 4 KiB ahead (a hint
                // that never faults; see packed::PREFETCH).
                let ahead = (w[r].as_ptr().add(i) as *const i8).wrapping_add(4096);
                _mm_prefetch::<_MM_HINT_T1>(ahead);
                wv[r] = _mm512_loadu_ps(w[r].as_ptr().add(i));
            }
            for a in 0..M {
                let xv = _mm512_loadu_ps(x[a].as_ptr().add(i));
                for r in 0..4 {
                    acc[a][r] = _mm512_fmadd_ps(wv[r], xv, acc[a][r]);
                }
            }
            i += 16;
        }
        let mut out = [[0f32; 4]; M];
        for a in 0..M {
            for r in 0..4 {
                let mut s = _mm512_reduce_add_ps(acc[a][r]);
                for t in i..k {
                    s += w[r][t] * x[a][t];
                }
                out[a][r] = s;
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `out[a][r] = w[r] · x[a]`: 4 × M accumulators (M ≤ 2 keeps them and the loads in the 16
    /// registers).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4xm<const M: usize>(w: [&[f32]; 4], x: [&[f32]; M]) -> [[f32; 4]; M] {
        let k = x[0].len();
        let mut acc = [[_mm256_setzero_ps(); 4]; M];
        let mut i = 0;
        while i + 8 <= k {
            let mut wv = [_mm256_setzero_ps(); 4];
            for r in 0..4 {
                wv[r] = _mm256_loadu_ps(w[r].as_ptr().add(i));
            }
            for a in 0..M {
                let xv = _mm256_loadu_ps(x[a].as_ptr().add(i));
                for r in 0..4 {
                    acc[a][r] = _mm256_fmadd_ps(wv[r], xv, acc[a][r]);
                }
            }
            i += 8;
        }
        let mut out = [[0f32; 4]; M];
        for a in 0..M {
            for r in 0..4 {
                let v = acc[a][r];
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let mut s = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
                for t in i..k {
                    s += w[r][t] * x[a][t];
                }
                out[a][r] = s;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Lcg;

    /// Every path against float64 dot products, for batch sizes around the kernels' tiles and
    /// widths with and without a tail; and a row's values are the same bits at every batch size.
    #[test]
    fn block_matches_float64_on_every_path_and_batch() {
        let paths = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|i| i.available());
        for isa in paths {
            for &(n, k) in &[(13usize, 576usize), (9, 37), (4, 16), (7, 1)] {
                let mut rng = Lcg(n as u64 * 1000 + k as u64);
                let w: Vec<f32> = rng.uniform(n * k).iter().map(|&v| v as f32).collect();
                let x: Vec<f32> = rng.uniform(9 * k).iter().map(|&v| v as f32).collect();
                let mut single = vec![0f32; 9 * n];
                for i in 0..9 {
                    block(isa, &w, &x[i * k..(i + 1) * k], 1, (1, n), |_, j, v| {
                        single[i * n + j] = v
                    });
                }
                for m in [1usize, 2, 3, 4, 5, 8, 9] {
                    let rows = (1, n); // a thread's share need not start at 0 (single used the same)
                    let mut out = vec![f32::NAN; m * n];
                    let mut seen = 0;
                    block(isa, &w, &x[..m * k], m, rows, |i, j, v| {
                        out[i * n + j] = v;
                        seen += 1;
                    });
                    assert_eq!(seen, m * (n - 1), "{isa:?} m={m} n={n} k={k}");
                    for i in 0..m {
                        assert!(out[i * n].is_nan(), "row 0 is outside rows");
                        for j in 1..n {
                            let want: f64 =
                                (0..k).map(|t| w[j * k + t] as f64 * x[i * k + t] as f64).sum();
                            let got = out[i * n + j];
                            assert!(
                                (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{isa:?} m={m} ({i},{j})"
                            );
                            assert_eq!(
                                got.to_bits(),
                                single[i * n + j].to_bits(),
                                "{isa:?} m={m} batch-dependent"
                            );
                        }
                    }
                }
            }
        }
    }
}
