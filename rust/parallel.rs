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
/// Pools by (process id, thread count): a forked child never uses its parent's entries.
static POOLS: Mutex<Vec<(u32, usize, Arc<ThreadPool>)>> = Mutex::new(Vec::new());

/// The number of hardware threads, at least 1.
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// True in a process forked from the one that first used a pool.
pub fn in_forked_child() -> bool {
    let owner = OWNER_PID.load(Ordering::Acquire);
    owner != 0 && owner != std::process::id()
}

/// Resolves a requested thread count: `None` or 0 means all hardware threads, more than the
/// hardware has is capped to it (more threads than cores only contend); a forked child always
/// gets 1.
pub fn resolve_threads(requested: Option<usize>) -> usize {
    if in_forked_child() {
        return 1;
    }
    match requested {
        Some(n) if n > 0 => n.min(available_threads()),
        _ => available_threads(),
    }
}

fn build(n: usize) -> Option<Arc<ThreadPool>> {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().ok().map(Arc::new)
}

fn pool(num_threads: usize) -> Option<Arc<ThreadPool>> {
    let pid = std::process::id();
    let _ = OWNER_PID.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire);
    // In a forked child the lock may have been held by a parent thread at fork time and never
    // be released: never block on it.
    let Ok(mut pools) = POOLS.try_lock() else {
        return build(num_threads);
    };
    if let Some((_, _, p)) = pools.iter().find(|(owner, n, _)| *owner == pid && *n == num_threads) {
        return Some(Arc::clone(p));
    }
    let p = build(num_threads)?;
    pools.push((pid, num_threads, Arc::clone(&p)));
    Some(p)
}

/// Runs `f` inside a pool of `num_threads` workers (1 in a forked child), so every rayon call
/// inside `f` uses that pool and never rayon's global one.
pub fn install<R: Send>(num_threads: usize, f: impl FnOnce() -> R + Send) -> R {
    let n = if in_forked_child() { 1 } else { num_threads.max(1) };
    match pool(n) {
        Some(p) => p.install(f),
        // The OS refused threads: run on the calling thread rather than fail.
        None => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn install_uses_requested_threads() {
        let n = install(2, rayon::current_num_threads);
        assert_eq!(n, 2);
        assert_eq!(install(1, rayon::current_num_threads), 1);
        let s: u64 = install(2, || (0..1000u64).into_par_iter().sum());
        assert_eq!(s, 999 * 1000 / 2);
    }

    #[test]
    fn resolve_defaults_to_hardware() {
        assert_eq!(resolve_threads(Some(3)), 3.min(available_threads()));
        assert_eq!(resolve_threads(Some(usize::MAX)), available_threads());
        assert_eq!(resolve_threads(None), available_threads());
    }
}
