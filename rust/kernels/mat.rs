//! Strided matrix views and the general matrix product on the `gemm` crate: the f64 path's
//! products, and in f32 only the recurrent step product once more rows are active than the
//! packed kernel ([`super::smallmm`]) takes.

use gemm::Parallelism;

use super::Float;

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
pub fn matmul<T: Float>(
    dst: &mut [T],
    ldd: usize,
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    threads: usize,
) {
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
    let par = if threads > 1 && m * n * k >= PAR_MIN_FLOPS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the views were built from slices at least as large as their extents (Mat::rm
    // checks), the destination bounds are checked above, and `dst` is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    }
}
