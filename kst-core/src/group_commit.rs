//! Group commit: many threads that each need the same durable flush (an `fsync` of a
//! directory after a rename) share one flush instead of queueing one each.
//!
//! A caller makes its change first (writes and renames its file), then calls
//! [`GroupCommit::commit`]. It returns `Ok` only once a flush that *started after* the call
//! has succeeded, so the caller's change is covered. While one flush runs, the callers that
//! arrive wait; when it ends, one of them starts the next flush for all of them. With C
//! concurrent writers the flush runs about once per round instead of C times, and no caller
//! is told "durable" early.
//!
//! A failed flush covers nobody: its caller gets the error, and the callers waiting behind it
//! run a flush of their own (and get their own outcome).
//!
//! The flush is passed in, so this module does no I/O itself; it blocks on a condition
//! variable, so call it from a blocking thread (`tokio::task::spawn_blocking`), never on an
//! async worker.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Coalesces concurrent calls of one idempotent flush. See the [module docs](self).
#[derive(Debug, Default)]
pub struct GroupCommit {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Tickets handed out: one per call.
    requested: u64,
    /// Every ticket up to this one is covered by a successful flush.
    completed: u64,
    /// A flush is running.
    flushing: bool,
    /// Flushes run, for tests and metrics.
    flushes: u64,
}

impl GroupCommit {
    /// A group commit with nothing pending.
    pub fn new() -> Self {
        GroupCommit::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns once a successful `flush` that started after this call covers the caller's
    /// change; runs `flush` itself when no flush is running. Returns the error of a `flush` it
    /// ran that failed.
    pub fn commit<E>(&self, flush: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let mut state = self.lock();
        state.requested += 1;
        let ticket = state.requested;
        while state.flushing {
            state = self
                .done
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            if state.completed >= ticket {
                return Ok(());
            }
        }
        // No flush runs: lead one covering every ticket handed out so far (ours included).
        // A flush that ran before us cannot have covered us (it started before our ticket).
        state.flushing = true;
        let covers = state.requested;
        drop(state);
        let result = flush();
        let mut state = self.lock();
        state.flushing = false;
        state.flushes += 1;
        if result.is_ok() {
            state.completed = state.completed.max(covers);
        }
        drop(state);
        self.done.notify_all();
        result
    }

    /// How many flushes have run (successful or not).
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[test]
    fn a_lone_caller_runs_its_own_flush() {
        let g = GroupCommit::new();
        let mut ran = 0;
        g.commit(|| {
            ran += 1;
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(ran, 1);
        assert_eq!(g.flushes(), 1);
    }

    /// Every caller's change is made before it calls; a flush snapshots the "disk" (the
    /// counter of changes made). No caller may return before a flush saw its change.
    #[test]
    fn concurrent_callers_share_flushes_and_each_is_covered() {
        let g = Arc::new(GroupCommit::new());
        let changes = Arc::new(AtomicU64::new(0));
        let durable = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (g, changes, durable) = (g.clone(), changes.clone(), durable.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let mine = changes.fetch_add(1, Ordering::SeqCst) + 1;
                        g.commit(|| {
                            let seen = changes.load(Ordering::SeqCst);
                            std::thread::sleep(Duration::from_micros(300));
                            durable.fetch_max(seen, Ordering::SeqCst);
                            Ok::<(), ()>(())
                        })
                        .unwrap();
                        // Changes are numbered in order, so a flush that saw `mine` or a later
                        // one covers it.
                        assert!(durable.load(Ordering::SeqCst) >= mine);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(changes.load(Ordering::SeqCst), 800);
        assert!(g.flushes() < 800, "no sharing: {} flushes", g.flushes());
    }

    #[test]
    fn a_failed_flush_covers_nobody() {
        let g = Arc::new(GroupCommit::new());
        assert_eq!(g.commit(|| Err("disk on fire")), Err("disk on fire"));
        // The next caller is not covered by the failed flush: it runs its own.
        let mut ran = false;
        g.commit(|| {
            ran = true;
            Ok::<(), &str>(())
        })
        .unwrap();
        assert!(ran);
        assert_eq!(g.flushes(), 2);
    }

    #[test]
    fn waiters_behind_a_failed_flush_run_their_own() {
        let g = Arc::new(GroupCommit::new());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let leader = {
            let g = g.clone();
            std::thread::spawn(move || {
                g.commit(|| {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    Err("failed")
                })
            })
        };
        started_rx.recv().unwrap();
        let follower = {
            let g = g.clone();
            std::thread::spawn(move || g.commit(|| Ok::<(), &str>(())))
        };
        // Let the follower queue up behind the running flush, then fail it.
        std::thread::sleep(Duration::from_millis(50));
        release_tx.send(()).unwrap();
        assert_eq!(leader.join().unwrap(), Err("failed"));
        assert_eq!(follower.join().unwrap(), Ok(()));
        assert_eq!(g.flushes(), 2);
    }
}
