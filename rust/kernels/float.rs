//! The [`Float`] trait the kernels are generic over (f32 for speed, f64 for gradient checks),
//! and the scalar LSTM / GRU cells that are its generic path and the f32 SIMD code's tail.

use super::simd;

/// The float types the kernels run in.
pub trait Float:
    Copy
    + Default
    + Send
    + Sync
    + PartialOrd
    + 'static
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    /// LSTM cell over a range of units of one row (see [`simd::LstmRow`]).
    fn lstm_cell(
        row: simd::LstmRow<'_, Self>,
        c: &mut [Self],
        h: &mut [Self],
        cs_out: &mut [Self],
        y_out: &mut [Self],
    ) {
        lstm_cell_scalar(row, c, h, cs_out, y_out)
    }

    /// GRU cell over a range of units of one row (see [`simd::GruRow`]).
    fn gru_cell(
        row: simd::GruRow<'_, Self>,
        h: &mut [Self],
        hn_out: &mut [Self],
        y_out: &mut [Self],
    ) {
        gru_cell_scalar(row, h, hn_out, y_out)
    }

    /// `x = exp(x - m)` in place; returns the sum.
    fn exp_sub_sum(x: &mut [Self], m: Self) -> Self {
        let mut sum = Self::ZERO;
        for v in x.iter_mut() {
            *v = (*v - m).exp();
            sum += *v;
        }
        sum
    }

    /// The largest element; -inf when empty (NaNs skipped: the exp after it propagates them).
    fn max_slice(x: &[Self]) -> Self {
        let mut m = Self::from_f64(f64::NEG_INFINITY);
        for &v in x {
            if v > m {
                m = v;
            }
        }
        m
    }

    /// `out = tanh(x)` elementwise.
    fn tanh_slice(x: &[Self], out: &mut [Self]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v.tanh();
        }
    }

    /// The logistic sigmoid, accurate in both tails: exp(-|x|) never overflows.
    #[inline(always)]
    fn sigmoid(self) -> Self {
        if self < Self::ZERO {
            let e = self.exp();
            e / (Self::ONE + e)
        } else {
            Self::ONE / (Self::ONE + (-self).exp())
        }
    }
}

/// The LSTM cell, one unit at a time: the generic path, and the tail the f32 SIMD code leaves.
pub fn lstm_cell_scalar<T: Float>(
    row: simd::LstmRow<'_, T>,
    c: &mut [T],
    h: &mut [T],
    cs_out: &mut [T],
    y_out: &mut [T],
) {
    for k in 0..c.len() {
        let i = row.i[k].sigmoid();
        let f = row.f[k].sigmoid();
        let gg = row.g[k].tanh();
        let o = row.o[k].sigmoid();
        let cv = f * c[k] + i * gg;
        let hv = o * cv.tanh();
        row.i[k] = i;
        row.f[k] = f;
        row.g[k] = gg;
        row.o[k] = o;
        c[k] = cv;
        h[k] = hv;
        cs_out[k] = cv;
        y_out[k] = hv;
    }
}

/// The GRU cell, one unit at a time (generic path and f32 SIMD tail).
pub fn gru_cell_scalar<T: Float>(
    row: simd::GruRow<'_, T>,
    h: &mut [T],
    hn_out: &mut [T],
    y_out: &mut [T],
) {
    for k in 0..h.len() {
        let r = (row.xr[k] + row.hr[k]).sigmoid();
        let z = (row.xz[k] + row.hz[k]).sigmoid();
        let n = (row.xn[k] + r * row.hn[k]).tanh();
        let hv = (T::ONE - z) * n + z * h[k];
        row.xr[k] = r;
        row.xz[k] = z;
        row.xn[k] = n;
        hn_out[k] = row.hn[k];
        h[k] = hv;
        y_out[k] = hv;
    }
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn lstm_cell(
        row: simd::LstmRow<'_, Self>,
        c: &mut [Self],
        h: &mut [Self],
        cs_out: &mut [Self],
        y_out: &mut [Self],
    ) {
        simd::lstm_cell_f32(row, c, h, cs_out, y_out)
    }
    fn gru_cell(
        row: simd::GruRow<'_, Self>,
        h: &mut [Self],
        hn_out: &mut [Self],
        y_out: &mut [Self],
    ) {
        simd::gru_cell_f32(row, h, hn_out, y_out)
    }
    fn tanh_slice(x: &[Self], out: &mut [Self]) {
        simd::tanh_f32(x, out)
    }
    fn exp_sub_sum(x: &mut [Self], m: Self) -> Self {
        simd::exp_sub_sum_f32(x, m)
    }
    fn max_slice(x: &[Self]) -> Self {
        simd::max_f32(x)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}
