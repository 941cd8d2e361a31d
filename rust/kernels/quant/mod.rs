//! Matrix products with block-quantized weights in GGUF's exact byte layouts (llama.cpp's
//! `ggml-common.h`): Q8_0, Q4_0, Q4_1 (32 values a block) and the K-quants Q4_K and Q6_K
//! (256-value super-blocks). A weight matrix is `n` rows of `k` values, each row a run of
//! blocks, as a GGUF tensor of shape (n, k) stores it.
//!
//! How a product runs ([`matmul`]): the activation rows are quantized once into 8-bit groups
//! of 32 ([`QuantRows`]: one f32 scale per group, the sums of each half-group), then every
//! weight row is dotted with every activation row group by group. Every type is written as
//! `w = a·u + b` per group of 16 values with an unsigned integer `u` (a nibble, a 6-bit code,
//! or the signed Q8_0 byte), so one integer kernel serves all of them: the group's integer
//! sums `Σ u·q` come from `maddubs`/`madd` (AVX2) or `vpdpbusd` (AVX-512 VNNI), and the
//! group adds `d_x·(a·Σu·q + b·Σq)` in float (the stored activation sums make the offset `b`
//! — Q4_1's minimum, Q4_0's 8, Q6_K's 32 — one multiply per half-group).
//!
//! Written by hand (no crate does GGUF block products): the kernels are the product itself.
//! The integer part of every path is exact and equal across paths ([`group_sums`], tested by
//! forcing each path); the float part differs only in summation order.

mod blocks;
mod dot;
pub mod engine;
mod fgemv;
pub mod packed;

pub use blocks::{dequantize_row, quantize_row};
pub use dot::{group_sums, Isa};

use crate::kernels::team;

/// A GGUF block type that the kernels read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    Q8_0,
    Q4_0,
    Q4_1,
    Q4K,
    Q6K,
}

impl QType {
    pub const ALL: [QType; 5] = [QType::Q8_0, QType::Q4_0, QType::Q4_1, QType::Q4K, QType::Q6K];

    /// GGUF's name of the type ("Q4_K", ...).
    pub fn name(self) -> &'static str {
        match self {
            QType::Q8_0 => "Q8_0",
            QType::Q4_0 => "Q4_0",
            QType::Q4_1 => "Q4_1",
            QType::Q4K => "Q4_K",
            QType::Q6K => "Q6_K",
        }
    }

    /// The type named `name` (case-insensitive, "q4_k" as "Q4_K").
    pub fn from_name(name: &str) -> Option<QType> {
        QType::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// ggml's type id (the GGUF tensor-info field).
    pub fn ggml_id(self) -> u32 {
        match self {
            QType::Q4_0 => 2,
            QType::Q4_1 => 3,
            QType::Q8_0 => 8,
            QType::Q4K => 12,
            QType::Q6K => 14,
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            QType::Q8_0 | QType::Q4_0 | QType::Q4_1 => 32,
            QType::Q4K | QType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q8_0 => 34,
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q4K => 144,
            QType::Q6K => 210,
        }
    }

    /// Bytes of a row of `k` values, or None when `k` is not a whole number of blocks.
    pub fn row_bytes(self, k: usize) -> Option<usize> {
        k.is_multiple_of(self.block_values()).then(|| k / self.block_values() * self.block_bytes())
    }
}

/// Activation rows quantized for the integer kernels: per row of `k` values (a multiple of
/// 32), `k` signed bytes, one scale per group of 32 and the sum of each half-group of 16.
pub struct QuantRows {
    pub m: usize,
    pub k: usize,
    pub qs: Vec<i8>,
    pub scales: Vec<f32>,
    pub sums: Vec<i32>,
    /// Per group, 8 floats: `scale · sum / 4` of each half-group, each 4 times (the SIMD
    /// kernels add the offsets `b` in the same 8 lanes as the products, a quarter per lane).
    pub spread: Vec<f32>,
    /// Per group, `scale · (sum of its 32 codes)`: the factor of a block's offset term.
    pub gsum: Vec<f32>,
}

impl QuantRows {
    /// Quantizes the `m` rows of `x` (row-major, `k` columns): each group of 32 scaled by its
    /// largest magnitude to [-127, 127] (round half away from zero, as llama.cpp's Q8 rows).
    pub fn new(x: &[f32], m: usize, k: usize, threads: usize) -> QuantRows {
        assert!(k.is_multiple_of(32) && x.len() == m * k, "activation shape");
        let groups = k / 32;
        let mut r = QuantRows {
            m,
            k,
            qs: vec![0; m * k],
            scales: vec![0.0; m * groups],
            sums: vec![0; m * groups * 2],
            spread: vec![0.0; m * groups * 8],
            gsum: vec![0.0; m * groups],
        };
        let qs = team::Shared(r.qs.as_mut_ptr());
        let sc = team::Shared(r.scales.as_mut_ptr());
        let su = team::Shared(r.sums.as_mut_ptr());
        let sp = team::Shared(r.spread.as_mut_ptr());
        let gs = team::Shared(r.gsum.as_mut_ptr());
        let rows_per = 16usize;
        let items = m.div_ceil(rows_per);
        let threads = if m * k < 1 << 16 { 1 } else { threads };
        team::for_each(threads, items, |item| {
            let (r0, r1) = (item * rows_per, ((item + 1) * rows_per).min(m));
            for row in r0..r1 {
                // SAFETY: each row's output ranges are disjoint and inside the vectors sized
                // above; rows are handed out once.
                let (q, s, u, p, t) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(qs.ptr().add(row * k), k),
                        std::slice::from_raw_parts_mut(sc.ptr().add(row * groups), groups),
                        std::slice::from_raw_parts_mut(su.ptr().add(row * groups * 2), groups * 2),
                        std::slice::from_raw_parts_mut(sp.ptr().add(row * groups * 8), groups * 8),
                        std::slice::from_raw_parts_mut(gs.ptr().add(row * groups), groups),
                    )
                };
                quantize_activation_row(&x[row * k..(row + 1) * k], q, s, u);
                for g in 0..groups {
                    t[g] = s[g] * (u[2 * g] + u[2 * g + 1]) as f32;
                    for h in 0..2 {
                        p[8 * g + 4 * h..8 * g + 4 * h + 4].fill(s[g] * u[2 * g + h] as f32 * 0.25);
                    }
                }
            }
        });
        r
    }

    fn row(&self, i: usize) -> ActRow<'_> {
        let g = self.k / 32;
        ActRow {
            qs: &self.qs[i * self.k..(i + 1) * self.k],
            scales: &self.scales[i * g..(i + 1) * g],
            sums: &self.sums[i * g * 2..(i + 1) * g * 2],
            spread: &self.spread[i * g * 8..(i + 1) * g * 8],
            gsum: &self.gsum[i * g..(i + 1) * g],
        }
    }
}

/// One quantized activation row.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub scales: &'a [f32],
    pub sums: &'a [i32],
    pub spread: &'a [f32],
    pub gsum: &'a [f32],
}

fn quantize_activation_row(x: &[f32], q: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    for (g, xs) in x.chunks_exact(32).enumerate() {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        scales[g] = d;
        let mut s = [0i32; 2];
        for (i, &v) in xs.iter().enumerate() {
            let r = (v * id).round().clamp(-127.0, 127.0) as i8;
            q[g * 32 + i] = r;
            s[i / 16] += r as i32;
        }
        sums[2 * g] = s[0];
        sums[2 * g + 1] = s[1];
    }
}

/// Checks a product's shapes; the error names what disagrees.
pub fn check(qt: QType, n: usize, k: usize, w_len: usize) -> Result<usize, String> {
    let row = qt.row_bytes(k).ok_or_else(|| {
        format!(
            "{}: the row width {k} is not a multiple of the block size {}",
            qt.name(),
            qt.block_values()
        )
    })?;
    let want = row.checked_mul(n).ok_or_else(|| format!("{n} rows of {row} bytes overflow"))?;
    if w_len != want {
        return Err(format!(
            "{} weights of shape ({n}, {k}) take {want} bytes ({n} rows of {row}), got {w_len}",
            qt.name()
        ));
    }
    Ok(row)
}

/// `y (m, n) = x (m, k) · Wᵀ` for `W` (n rows of `k` values in `qt` blocks, `w`), with the
/// activations quantized to 8 bits per group of 32. Output rows are split across `threads`
/// in chunks; for `m > 1` each unpacked weight group serves up to four activation rows.
///
/// Panics when the lengths disagree with the shapes ([`check`] them first).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    n: usize,
    qt: QType,
    isa: Isa,
    threads: usize,
    y: &mut [f32],
) {
    let row_bytes = check(qt, n, k, w.len()).expect("checked by the caller");
    assert!(x.len() == m * k && y.len() == m * n, "matmul shapes");
    if m == 0 || n == 0 {
        return;
    }
    let acts = QuantRows::new(x, m, k, threads);
    matmul_quantized(&acts, w, n, row_bytes, qt, isa, threads, y);
}

/// [`matmul`] on already-quantized activations.
#[allow(clippy::too_many_arguments)]
pub fn matmul_quantized(
    acts: &QuantRows,
    w: &[u8],
    n: usize,
    row_bytes: usize,
    qt: QType,
    isa: Isa,
    threads: usize,
    y: &mut [f32],
) {
    let m = acts.m;
    // Chunks of output rows: small enough that both threads stay busy to the end, large
    // enough that the counter is touched rarely.
    let chunk = (n / (threads.max(1) * 8)).clamp(4, 64);
    let items = n.div_ceil(chunk);
    let out = team::Shared(y.as_mut_ptr());
    team::for_each(threads, items, |item| {
        let (n0, n1) = (item * chunk, ((item + 1) * chunk).min(n));
        for j in n0..n1 {
            let wrow = &w[j * row_bytes..(j + 1) * row_bytes];
            let mut i = 0;
            while i + 4 <= m {
                let rows = [acts.row(i), acts.row(i + 1), acts.row(i + 2), acts.row(i + 3)];
                let d = dot::dot4(isa, qt, wrow, &rows);
                for (r, v) in d.iter().enumerate() {
                    // SAFETY: (i + r, j) is inside y (m × n); column j belongs to this item only.
                    unsafe { *out.ptr().add((i + r) * n + j) = *v };
                }
                i += 4;
            }
            while i < m {
                let v = dot::dot1(isa, qt, wrow, acts.row(i));
                // SAFETY: as above.
                unsafe { *out.ptr().add(i * n + j) = v };
                i += 1;
            }
        }
    });
}

/// Rows `ids` of the matrix `w` (n rows of `k` values in `qt` blocks) dequantized into `out`
/// (`ids.len()` × `k`): an embedding lookup on a quantized table. Ids must be `< n`.
pub fn gather_rows(w: &[u8], k: usize, qt: QType, ids: &[usize], out: &mut [f32]) {
    let row = qt.row_bytes(k).expect("checked by the caller");
    for (o, &id) in out.chunks_exact_mut(k).zip(ids) {
        dequantize_row(qt, &w[id * row..(id + 1) * row], o);
    }
}

#[cfg(test)]
mod tests;
