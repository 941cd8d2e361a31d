//! Fused CPU kernels: recurrent layers (LSTM, GRU), forward and backward through time.
//!
//! Kernels are generic over [`Float`] (f32 for speed, f64 so gradients can be checked with
//! `torch.autograd.gradcheck`). Large matrix products go to the `gemm` crate (runtime
//! AVX2/FMA dispatch, MKL-class speed on this machine); what is fused by hand is the per-step
//! work that no library provides: gate nonlinearities and state updates around the recurrent
//! product.

pub mod attention;
pub mod decode;
pub mod dropout;
pub mod rnn;
pub mod simd;
pub mod smallmm;
pub mod team;

/// Buffers at least this large ask the kernel for transparent huge pages.
const HUGE_MIN_BYTES: usize = 4 << 20;

/// A zeroed buffer of `n` elements whose pages are touched now, by the calling thread.
///
/// Why: a fresh large buffer is a fresh mapping, and first-touch page faults dominated the
/// LSTM forward at B=64, T=128, H=256: 17 ms to fault in its 32 MiB gate buffer (4 KiB pages,
/// ~2 µs each on this VM) against 28 ms for the whole input projection. Large buffers are
/// therefore marked `MADV_HUGEPAGE` before the first touch (2 MiB pages: 512x fewer faults;
/// a no-op where transparent huge pages are off). Touching on the calling thread keeps two
/// team threads from faulting into one fresh mapping together (a 7 ms call took 20-25 ms).
pub fn zeroed<T: Copy + Default>(n: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    let bytes = n * std::mem::size_of::<T>();
    #[cfg(target_os = "linux")]
    if bytes >= HUGE_MIN_BYTES {
        const HUGE: usize = 2 << 20;
        let start = v.as_mut_ptr() as usize;
        let (a, b) = (start.div_ceil(HUGE) * HUGE, (start + bytes) / HUGE * HUGE);
        if b > a {
            // SAFETY: [a, b) lies inside this vector's allocation, which we own; the advice
            // changes only how the kernel backs the pages, not their contents or validity.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    v.resize(n, T::default());
    v
}

use gemm::Parallelism;

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
    fn lstm_cell(row: simd::LstmRow<'_, Self>, c: &mut [Self], h: &mut [Self], cs_out: &mut [Self], y_out: &mut [Self]) {
        lstm_cell_scalar(row, c, h, cs_out, y_out)
    }

    /// GRU cell over a range of units of one row (see [`simd::GruRow`]).
    fn gru_cell(row: simd::GruRow<'_, Self>, h: &mut [Self], hn_out: &mut [Self], y_out: &mut [Self]) {
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
pub fn lstm_cell_scalar<T: Float>(row: simd::LstmRow<'_, T>, c: &mut [T], h: &mut [T], cs_out: &mut [T], y_out: &mut [T]) {
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
pub fn gru_cell_scalar<T: Float>(row: simd::GruRow<'_, T>, h: &mut [T], hn_out: &mut [T], y_out: &mut [T]) {
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
    fn lstm_cell(row: simd::LstmRow<'_, Self>, c: &mut [Self], h: &mut [Self], cs_out: &mut [Self], y_out: &mut [Self]) {
        simd::lstm_cell_f32(row, c, h, cs_out, y_out)
    }
    fn gru_cell(row: simd::GruRow<'_, Self>, h: &mut [Self], hn_out: &mut [Self], y_out: &mut [Self]) {
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

/// A strided matrix view (element strides).
#[derive(Clone, Copy)]
pub struct Mat<T> {
    pub ptr: *const T,
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a Mat is a read-only view of a slice of `T: Sync` data that outlives its use
// (callers build it from borrowed slices for the duration of a kernel call).
unsafe impl<T: Sync> Send for Mat<T> {}
unsafe impl<T: Sync> Sync for Mat<T> {}

impl<T> Mat<T> {
    /// A row-major view of `s` as rows × cols.
    pub fn rm(s: &[T], rows: usize, cols: usize) -> Self {
        assert!(s.len() >= rows * cols, "matrix view out of bounds");
        Mat { ptr: s.as_ptr(), rows, cols, rs: cols as isize, cs: 1 }
    }
    /// The transpose view.
    pub fn t(self) -> Self {
        Mat { ptr: self.ptr, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
}

/// Work below this many multiply-adds runs on one thread (thread hand-off costs more).
const PAR_MIN_FLOPS: usize = 1 << 20;

/// `dst[m×n] (row-major, row stride ldd) = (accumulate ? dst : 0) + a[m×k] · b[k×n]`.
pub fn matmul<T: Float>(dst: &mut [T], ldd: usize, a: Mat<T>, b: Mat<T>, accumulate: bool, threads: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldd >= n && dst.len() >= (m - 1) * ldd + n, "destination out of bounds");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ldd..r * ldd + n].fill(T::ZERO);
            }
        }
        return;
    }
    let par = if threads > 1 && m * n * k >= PAR_MIN_FLOPS { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the views were built from slices at least as large as their extents (Mat::rm
    // checks), the destination bounds are checked above, and `dst` is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m, n, k,
            dst.as_mut_ptr(), 1, ldd as isize,
            accumulate,
            a.ptr, a.cs, a.rs,
            b.ptr, b.cs, b.rs,
            T::ONE, T::ONE,
            false, false, false,
            par,
        );
    }
}
