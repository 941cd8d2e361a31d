//! A thread team for one kernel call: the caller plus `n - 1` scoped threads that live for
//! the whole call (all T steps of a recurrent layer), synchronised by a spin barrier.
//!
//! Why not rayon per step: a parallel region per time step costs microseconds of dispatch,
//! about a whole step's work at small batch. Scoped threads are created per call (tens of µs,
//! amortised over the sequence) and so are safe under fork.
//!
//! When torch has loaded GNU OpenMP (`libgomp.so.1`, as PyPI's torch does), the team is
//! torch's own OpenMP team instead (`GOMP_parallel` looked up at run time): after each parallel
//! region libgomp's idle threads spin for milliseconds, so on a 2-core machine a separate team
//! started right after a torch op finds the other core taken by torch's spinner; running on
//! torch's own threads avoids that without slowing torch's small regions (docs/kernels.md).

use std::sync::atomic::{AtomicUsize, Ordering};

/// A reusable barrier for a fixed number of threads that spins, then yields.
pub struct SpinBarrier {
    n: usize,
    count: AtomicUsize,
    generation: AtomicUsize,
}

impl SpinBarrier {
    fn new(n: usize) -> Self {
        SpinBarrier { n, count: AtomicUsize::new(0), generation: AtomicUsize::new(0) }
    }

    /// Blocks until all `n` threads have called `wait` (for this generation).
    #[inline]
    pub fn wait(&self) {
        if self.n <= 1 {
            return;
        }
        let gen = self.generation.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.count.store(0, Ordering::Relaxed);
            self.generation.store(gen.wrapping_add(1), Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == gen {
            if spins < 2_000 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Runs `f(thread_index, barrier)` on `n` threads (the caller is thread 0) and returns when
/// all have finished.
pub fn run<F: Fn(usize, &SpinBarrier) + Sync>(n: usize, f: F) {
    let bar = SpinBarrier::new(n.max(1));
    if n <= 1 {
        f(0, &bar);
        return;
    }
    #[cfg(target_os = "linux")]
    if omp::run(n, &f, &bar) {
        return;
    }
    let home = current_cpu();
    std::thread::scope(|s| {
        for tid in 1..n {
            let (f, bar) = (&f, &bar);
            s.spawn(move || {
                avoid_cpu(home);
                f(tid, bar)
            });
        }
        f(0, &bar);
    });
}

/// Calls `f(i)` for every `i` in `0..items` on a team of up to `threads` threads (OpenMP's
/// when torch has loaded it, see the module notes), items handed out one at a time so uneven
/// items (causal attention rows) balance. One thread in a forked child.
pub fn for_each<F: Fn(usize) + Sync>(threads: usize, items: usize, f: F) {
    let cap =
        if crate::parallel::in_forked_child() { 1 } else { crate::parallel::available_threads() };
    let n = threads.min(items).min(cap).max(1);
    let next = AtomicUsize::new(0);
    run(n, |_, _| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= items {
            break;
        }
        f(i);
    });
}

#[cfg(target_os = "linux")]
mod omp {
    //! The team on an already-loaded GNU OpenMP runtime (never loads one itself).
    use super::SpinBarrier;
    use std::ffi::c_void;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::OnceLock;

    type Parallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32);
    type Query = unsafe extern "C" fn() -> i32;

    struct Omp {
        parallel: Parallel,
        thread_num: Query,
        num_threads: Query,
    }

    fn lookup() -> Option<&'static Omp> {
        static FOUND: OnceLock<Omp> = OnceLock::new();
        if let Some(o) = FOUND.get() {
            return Some(o);
        }
        if std::env::var_os("FERROLM_NO_OPENMP").is_some() {
            return None;
        }
        // SAFETY: RTLD_NOLOAD only returns a library that is already loaded (it never runs a
        // new library's initialisers); the handle is kept for the process's life. The symbols
        // have these C signatures in every libgomp since GCC 4.9.
        unsafe {
            let h = libc::dlopen(c"libgomp.so.1".as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY);
            if h.is_null() {
                return None; // not loaded (yet): look again next call
            }
            let p = libc::dlsym(h, c"GOMP_parallel".as_ptr());
            let t = libc::dlsym(h, c"omp_get_thread_num".as_ptr());
            let n = libc::dlsym(h, c"omp_get_num_threads".as_ptr());
            if p.is_null() || t.is_null() || n.is_null() {
                return None;
            }
            let o = Omp {
                parallel: std::mem::transmute::<*mut c_void, Parallel>(p),
                thread_num: std::mem::transmute::<*mut c_void, Query>(t),
                num_threads: std::mem::transmute::<*mut c_void, Query>(n),
            };
            Some(FOUND.get_or_init(|| o))
        }
    }

    struct Ctx<'a, F> {
        f: &'a F,
        bar: &'a SpinBarrier,
        omp: &'a Omp,
        n: usize,
        ran: AtomicUsize,
        panicked: AtomicBool,
    }

    extern "C" fn trampoline<F: Fn(usize, &SpinBarrier) + Sync>(data: *mut c_void) {
        // SAFETY: `data` is the `Ctx` that `run` keeps alive until GOMP_parallel returns.
        let ctx = unsafe { &*(data as *const Ctx<'_, F>) };
        // SAFETY: plain queries of the running OpenMP team.
        let (tid, size) = unsafe { ((ctx.omp.thread_num)(), (ctx.omp.num_threads)()) };
        if size as usize != ctx.n {
            return; // a smaller team than asked (nested region, thread limit): nobody runs
        }
        ctx.ran.fetch_add(1, Ordering::Relaxed);
        if catch_unwind(AssertUnwindSafe(|| (ctx.f)(tid as usize, ctx.bar))).is_err() {
            ctx.panicked.store(true, Ordering::Relaxed);
        }
    }

    /// Runs the team on OpenMP's threads; false when there is no usable OpenMP (the caller
    /// then starts its own threads).
    pub(super) fn run<F: Fn(usize, &SpinBarrier) + Sync>(
        n: usize,
        f: &F,
        bar: &SpinBarrier,
    ) -> bool {
        let Some(omp) = lookup() else { return false };
        let ctx =
            Ctx { f, bar, omp, n, ran: AtomicUsize::new(0), panicked: AtomicBool::new(false) };
        // SAFETY: the trampoline matches the callback type and `ctx` outlives the call, which
        // returns only after every team thread has finished.
        unsafe {
            (omp.parallel)(trampoline::<F>, &ctx as *const Ctx<'_, F> as *mut c_void, n as u32, 0)
        };
        if ctx.panicked.load(Ordering::Relaxed) {
            panic!("a kernel thread panicked");
        }
        ctx.ran.load(Ordering::Relaxed) == n
    }
}

/// The CPU the calling thread runs on, if the OS says.
fn current_cpu() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sched_getcpu has no preconditions.
        let c = unsafe { libc::sched_getcpu() };
        if c >= 0 {
            return Some(c as usize);
        }
    }
    None
}

/// Keeps this (team) thread off `cpu`, the caller's: a new thread often starts on its
/// creator's CPU and, with spin barriers, two team threads sharing one CPU run a step at a
/// time slice's pace until the scheduler migrates one (measured: a 7 ms LSTM call took 20-25 ms
/// right after other single-threaded work). The restriction ends with the thread.
fn avoid_cpu(cpu: Option<usize>) {
    #[cfg(target_os = "linux")]
    if let Some(cpu) = cpu {
        // SAFETY: the set is zero-initialised and only CPU_SET within its capacity; the call
        // affects only this thread (pid 0), which exits at the end of the team.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return;
            }
            let mut others = 0;
            for c in 0..libc::CPU_SETSIZE as usize {
                if c != cpu && libc::CPU_ISSET(c, &set) {
                    others += 1;
                }
            }
            if others == 0 {
                return;
            }
            libc::CPU_CLR(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
}

/// The `[start, end)` share of `total` items for thread `tid` of `n`, in multiples of `align`
/// (the last share takes the remainder).
pub fn share(total: usize, tid: usize, n: usize, align: usize) -> (usize, usize) {
    let units = total.div_ceil(align);
    let per = units / n;
    let extra = units % n;
    let start = (tid * per + tid.min(extra)) * align;
    let end = ((tid + 1) * per + (tid + 1).min(extra)) * align;
    (start.min(total), end.min(total))
}

/// A raw pointer that threads of one team share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub struct Shared<T>(pub *mut T);

// SAFETY: a Shared is only used inside `run`, where every thread writes a disjoint region
// between barriers and the barrier's Acquire/Release orders the phases.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so closures capture the whole `Shared`, which is Sync).
    #[inline(always)]
    pub fn ptr(&self) -> *mut T {
        self.0
    }

    /// A mutable view of `[start, start + len)`.
    ///
    /// # Safety
    /// The range must lie inside the buffer, and no other thread may access it concurrently.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        for total in [0usize, 1, 7, 16, 100, 1024] {
            for n in 1..4 {
                let mut covered = 0;
                let mut prev_end = 0;
                for t in 0..n {
                    let (s, e) = share(total, t, n, 8);
                    assert_eq!(s, prev_end);
                    assert!(s % 8 == 0 || s == total);
                    covered += e - s;
                    prev_end = e;
                }
                assert_eq!(covered, total);
            }
        }
    }

    #[test]
    fn barrier_orders_phases() {
        let data = [0usize; 2];
        let p = Shared(data.as_ptr() as *mut usize);
        let sums = std::sync::Mutex::new(Vec::new());
        run(2, |tid, bar| {
            for step in 0..1000 {
                // SAFETY: each thread writes only its own element, then reads both after the
                // barrier; a second barrier keeps the next write after the read.
                unsafe { p.slice(tid, 1)[0] = step };
                bar.wait();
                let both = unsafe { p.slice(0, 2).to_vec() };
                assert_eq!(both, vec![step, step]);
                bar.wait();
            }
            sums.lock().unwrap().push(tid);
        });
        assert_eq!(sums.lock().unwrap().len(), 2);
    }
}
