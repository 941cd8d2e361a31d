//! The block layouts: decoding one group of a block into integer codes and their affine
//! coefficients (what the kernels consume), dequantizing rows, and quantizing float rows.
//!
//! Quantizers: Q8_0, Q4_0 and Q4_1 follow llama.cpp's reference quantizers (`ggml-quants.c`,
//! and the `gguf` package's numpy ports) operation for operation, so their bytes are equal.
//! Q4_K and Q6_K use a direct min/max fit per sub-block (llama.cpp searches for better scales
//! iteratively); the bytes are valid blocks of the type, with a larger error than llama.cpp's.

use half::f16;

use super::QType;

#[inline(always)]
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

#[inline(always)]
fn put_f16(b: &mut [u8], i: usize, v: f32) {
    b[i..i + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

/// Q4_K's 6-bit scale and min of sub-block `j` (0..8) from its 12 packed bytes.
#[inline(always)]
pub(super) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Group `g` (32 values) of `block` as integer codes `u` and per-half coefficients: value
/// `i` is `a[i / 16] · u[i] + b[i / 16]`. Q8_0's codes are signed bytes (its `b` is 0); the
/// other types' codes are unsigned.
#[inline(always)]
pub(super) fn group(qt: QType, block: &[u8], g: usize, u: &mut [u8; 32]) -> ([f32; 2], [f32; 2]) {
    match qt {
        QType::Q8_0 => {
            u.copy_from_slice(&block[2..34]);
            let d = f16_at(block, 0);
            ([d; 2], [0.0; 2])
        }
        QType::Q4_0 | QType::Q4_1 => {
            let off = if qt == QType::Q4_0 { 2 } else { 4 };
            for j in 0..16 {
                let q = block[off + j];
                u[j] = q & 0xF;
                u[j + 16] = q >> 4;
            }
            let d = f16_at(block, 0);
            let b = if qt == QType::Q4_0 { -8.0 * d } else { f16_at(block, 2) };
            ([d; 2], [b; 2])
        }
        QType::Q4K => {
            let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
            let qs = &block[16 + 32 * (g / 2)..16 + 32 * (g / 2) + 32];
            let shift = 4 * (g % 2);
            for (o, q) in u.iter_mut().zip(qs) {
                *o = (q >> shift) & 0xF;
            }
            let (sc, m) = scale_min_k4(g, &block[4..16]);
            ([d * sc as f32; 2], [-dmin * m as f32; 2])
        }
        QType::Q6K => {
            let (h, t) = (g / 4, g % 4);
            let ql = &block[64 * h + 32 * (t & 1)..64 * h + 32 * (t & 1) + 32];
            let qh = &block[128 + 32 * h..128 + 32 * h + 32];
            let lo_shift = 4 * (t >> 1);
            for l in 0..32 {
                u[l] = ((ql[l] >> lo_shift) & 0xF) | (((qh[l] >> (2 * t)) & 3) << 4);
            }
            let d = f16_at(block, 208);
            let sc = &block[192..208];
            let a0 = d * (sc[8 * h + 2 * t] as i8) as f32;
            let a1 = d * (sc[8 * h + 2 * t + 1] as i8) as f32;
            ([a0, a1], [-32.0 * a0, -32.0 * a1])
        }
    }
}

/// Dequantizes one row (`row` bytes, a whole number of blocks) into `out`.
pub fn dequantize_row(qt: QType, row: &[u8], out: &mut [f32]) {
    let (bb, bv) = (qt.block_bytes(), qt.block_values());
    debug_assert_eq!(row.len() / bb * bv, out.len());
    let mut u = [0u8; 32];
    for (block, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
        for (g, og) in o.chunks_exact_mut(32).enumerate() {
            let (a, b) = group(qt, block, g, &mut u);
            for (i, v) in og.iter_mut().enumerate() {
                let code = if qt == QType::Q8_0 { u[i] as i8 as f32 } else { u[i] as f32 };
                *v = a[i / 16] * code + b[i / 16];
            }
        }
    }
}

/// C's `roundf`: halves away from zero (Rust's `round` does the same).
#[inline(always)]
fn roundf(x: f32) -> f32 {
    x.round()
}

/// Quantizes one row of floats (`x.len()` a multiple of the block size) into `out`.
pub fn quantize_row(qt: QType, x: &[f32], out: &mut [u8]) {
    let (bb, bv) = (qt.block_bytes(), qt.block_values());
    debug_assert_eq!(x.len() / bv * bb, out.len());
    for (xs, o) in x.chunks_exact(bv).zip(out.chunks_exact_mut(bb)) {
        match qt {
            QType::Q8_0 => quantize_q8_0(xs, o),
            QType::Q4_0 => quantize_q4_0(xs, o),
            QType::Q4_1 => quantize_q4_1(xs, o),
            QType::Q4K => quantize_q4_k(xs, o),
            QType::Q6K => quantize_q6_k(xs, o),
        }
    }
}

fn quantize_q8_0(x: &[f32], o: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(o, 0, d);
    for (i, &v) in x.iter().enumerate() {
        o[2 + i] = roundf(v * id) as i8 as u8;
    }
}

fn quantize_q4_0(x: &[f32], o: &mut [u8]) {
    // The value of largest magnitude, with its sign, maps to -8.
    let mut max = 0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(o, 0, d);
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5).trunc() as i32).clamp(0, 15) as u8;
        let q1 = ((x[j + 16] * id + 8.5).trunc() as i32).clamp(0, 15) as u8;
        o[2 + j] = q0 | (q1 << 4);
    }
}

fn quantize_q4_1(x: &[f32], o: &mut [u8]) {
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(o, 0, d);
    put_f16(o, 2, min);
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5).trunc() as i32).clamp(0, 15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5).trunc() as i32).clamp(0, 15) as u8;
        o[4 + j] = q0 | (q1 << 4);
    }
}

fn quantize_q4_k(x: &[f32], o: &mut [u8]) {
    // Per sub-block of 32: value = scale·q - min with q in 0..15, min ≥ 0.
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, xs) in x.chunks_exact(32).enumerate() {
        let lo = xs.iter().fold(0f32, |m, &v| m.min(v));
        let hi = xs.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        scales[j] = (hi - lo) / 15.0;
        mins[j] = -lo;
    }
    let smax = scales.iter().fold(0f32, |m, &v| m.max(v));
    let mmax = mins.iter().fold(0f32, |m, &v| m.max(v));
    let d = smax / 63.0;
    let dmin = mmax / 63.0;
    let (id, idmin) =
        (if d > 0.0 { 1.0 / d } else { 0.0 }, if dmin > 0.0 { 1.0 / dmin } else { 0.0 });
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        sc[j] = roundf(scales[j] * id).clamp(0.0, 63.0) as u8;
        mn[j] = roundf(mins[j] * idmin).clamp(0.0, 63.0) as u8;
    }
    o.fill(0);
    put_f16(o, 0, d);
    put_f16(o, 2, dmin);
    let s = &mut o[4..16];
    for j in 0..8 {
        if j < 4 {
            s[j] = sc[j];
            s[j + 4] = mn[j];
        } else {
            s[j + 4] = (sc[j] & 0xF) | ((mn[j] & 0xF) << 4);
            s[j - 4] |= (sc[j] >> 4) << 6;
            s[j] |= (mn[j] >> 4) << 6;
        }
    }
    // Codes against the stored (f16-rounded) scales, so dequantization is what was fit.
    let (d, dmin) = (f16_at(o, 0), f16_at(o, 2));
    for j in 0..8 {
        let (scj, mj) = scale_min_k4(j, &o[4..16]);
        let a = d * scj as f32;
        let b = dmin * mj as f32;
        let ia = if a > 0.0 { 1.0 / a } else { 0.0 };
        for l in 0..32 {
            let q = roundf((x[32 * j + l] + b) * ia).clamp(0.0, 15.0) as u8;
            o[16 + 32 * (j / 2) + l] |= q << (4 * (j % 2));
        }
    }
}

fn quantize_q6_k(x: &[f32], o: &mut [u8]) {
    // Per sub-block of 16: value = scale·(q - 32), q in 0..63; the value of largest magnitude
    // maps to -32. The sub-block scales are 8-bit multiples of d.
    let mut scales = [0f32; 16];
    for (j, xs) in x.chunks_exact(16).enumerate() {
        let mut max = 0f32;
        for &v in xs {
            if v.abs() > max.abs() {
                max = v;
            }
        }
        scales[j] = max / -32.0;
    }
    let mut big = 0f32;
    for &s in &scales {
        if s.abs() > big.abs() {
            big = s;
        }
    }
    let d = big / -128.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    o.fill(0);
    put_f16(o, 208, d);
    let d = f16_at(o, 208);
    let mut q = [0u8; 256];
    for j in 0..16 {
        let sc = roundf(scales[j] * id).clamp(-128.0, 127.0) as i8;
        o[192 + j] = sc as u8;
        let a = d * sc as f32;
        let ia = if a != 0.0 { 1.0 / a } else { 0.0 };
        for l in 0..16 {
            q[16 * j + l] = (roundf(x[16 * j + l] * ia) + 32.0).clamp(0.0, 63.0) as u8;
        }
    }
    for h in 0..2 {
        for l in 0..32 {
            let n = 128 * h;
            let (q1, q2, q3, q4) = (q[n + l], q[n + l + 32], q[n + l + 64], q[n + l + 96]);
            o[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            o[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            o[128 + 32 * h + l] =
                (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}
