//! Zeroed buffers for the kernels' large outputs and scratch: pages touched up front by the
//! calling thread, and backed by transparent huge pages when the buffer is large.

/// Buffers at least this large ask the kernel for transparent huge pages.
const HUGE_MIN_BYTES: usize = 4 << 20;

/// A zeroed buffer of `n` elements whose pages are touched now, by the calling thread.
///
/// Why: first-touch page faults of a fresh large buffer cost as much as the product that fills
/// it (4 KiB pages), so large buffers are marked `MADV_HUGEPAGE` first (a no-op where
/// transparent huge pages are off), and touching them here keeps two team threads from
/// faulting into one fresh mapping together.
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
