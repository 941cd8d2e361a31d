//! Float32 rows for the fused decode step: `out[j] = w_j · x` for a run of rows of a
//! row-major float32 matrix, four rows at a time so each load of `x` serves four rows.
//!
//! Why by hand: the step's float products stream the weights once per token, and the generic
//! `decode::dot` is compiled for the baseline x86-64 (SSE2); here AVX-512 or AVX2 with FMA
//! is chosen at run time (the quantized kernels' [`Isa`]), the scalar path being that `dot`.

use super::Isa;
use crate::kernels::decode::dot;

/// `out[j - rows.0] = w[j] · x` for `j` in `rows` (`w` holds rows of `x.len()` values).
pub fn rows(isa: Isa, w: &[f32], x: &[f32], rows: (usize, usize), out: &mut [f32]) {
    let k = x.len();
    assert!(rows.1 * k <= w.len() && out.len() == rows.1 - rows.0, "float rows shapes");
    let mut j = rows.0;
    #[cfg(target_arch = "x86_64")]
    while j + 4 <= rows.1 && isa != Isa::Scalar {
        let r = |i: usize| &w[(j + i) * k..(j + i + 1) * k];
        let four = [r(0), r(1), r(2), r(3)];
        // SAFETY: `isa` is available (from `Isa::detect` or checked); every row has k values.
        let v = unsafe {
            if isa == Isa::Avx512Vnni {
                avx512::dot4(four, x)
            } else {
                avx2::dot4(four, x)
            }
        };
        out[j - rows.0..j - rows.0 + 4].copy_from_slice(&v);
        j += 4;
    }
    while j < rows.1 {
        out[j - rows.0] = dot(&w[j * k..(j + 1) * k], x);
        j += 1;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn dot4(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        let k = x.len();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 16 <= k {
            let xv = _mm512_loadu_ps(x.as_ptr().add(i));
            for r in 0..4 {
                // Four rows are four streams: each asks for its weights 4 KiB ahead (a hint
                // that never faults; see packed::PREFETCH).
                let ahead = (w[r].as_ptr().add(i) as *const i8).wrapping_add(4096);
                _mm_prefetch::<_MM_HINT_T1>(ahead);
                acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w[r].as_ptr().add(i)), xv, acc[r]);
            }
            i += 16;
        }
        let mut out = [0f32; 4];
        for r in 0..4 {
            let mut s = _mm512_reduce_add_ps(acc[r]);
            for t in i..k {
                s += w[r][t] * x[t];
            }
            out[r] = s;
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        let k = x.len();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 8 <= k {
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            for r in 0..4 {
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r].as_ptr().add(i)), xv, acc[r]);
            }
            i += 8;
        }
        let mut out = [0f32; 4];
        for r in 0..4 {
            let v = acc[r];
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let mut s = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
            for t in i..k {
                s += w[r][t] * x[t];
            }
            out[r] = s;
        }
        out
    }
}
