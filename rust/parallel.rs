//! Thread pools that are safe under `fork`.
//!
//! rayon's global pool is not usable in a forked child (its worker threads do not exist there,
//! so the first parallel call deadlocks: the trap behind HF tokenizers' `TOKENIZERS_PARALLELISM`
//! warning). ferrolm never uses the global pool. Pools are built on demand, cached per thread
//! count, and owned by the process that built them: in a forked child (a DataLoader worker) the
//! parent's pools are never touched and work runs on the calling thread, one thread per worker,
//! so workers do not oversubscribe the cores either.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use rayon::ThreadPool;

static OWNER_PID: AtomicU32 = AtomicU32::new(0);
static POOLS: Mutex<Vec<(usize, Arc<ThreadPool>)>> = Mutex::new(Vec::new());

/// The number of hardware threads, at least 1.
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// True in a process forked from the one that built the first pool.
pub fn in_forked_child() -> bool {
    let owner = OWNER_PID.load(Ordering::Acquire);
    owner != 0 && owner != std::process::id()
}

/// Resolves a requested thread count: `None` or 0 means all hardware threads; a forked child
/// always gets 1.
pub fn resolve_threads(requested: Option<usize>) -> usize {
    if in_forked_child() {
        return 1;
    }
    match requested {
        Some(n) if n > 0 => n,
        _ => available_threads(),
    }
}

/// Runs `f` inside a pool of `num_threads` workers (or on the calling thread when that is 1 or
/// when this process is a forked child), so `rayon` calls inside `f` use that many threads.
pub fn install<R: Send>(num_threads: usize, f: impl FnOnce() -> R + Send) -> R {
    if num_threads <= 1 || in_forked_child() {
        return f();
    }
    let pool = {
        // A poisoned lock only means another thread panicked while holding it; the Vec is
        // still valid, so recover it.
        let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        OWNER_PID.store(std::process::id(), Ordering::Release);
        match pools.iter().find(|(n, _)| *n == num_threads) {
            Some((_, p)) => Arc::clone(p),
            None => match rayon::ThreadPoolBuilder::new().num_threads(num_threads).build() {
                Ok(p) => {
                    let p = Arc::new(p);
                    pools.push((num_threads, Arc::clone(&p)));
                    p
                }
                // The OS refused threads: run on the calling thread rather than fail.
                Err(_) => {
                    drop(pools);
                    return f();
                }
            },
        }
    };
    pool.install(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn install_uses_requested_threads() {
        let n = install(2, rayon::current_num_threads);
        assert_eq!(n, 2);
        let s: u64 = install(2, || (0..1000u64).into_par_iter().sum());
        assert_eq!(s, 999 * 1000 / 2);
    }

    #[test]
    fn resolve_defaults_to_hardware() {
        assert_eq!(resolve_threads(Some(3)), 3);
        assert_eq!(resolve_threads(None), available_threads());
    }
}
