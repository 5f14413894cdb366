//! The bound on blocking file work: at most [`MAX_BLOCKING`] operations of the key store
//! ([`crate::FsStore`]) run on Tokio's blocking thread pool at once, process-wide; the others
//! wait their turn in FIFO order (a fair semaphore), without a thread. The key directory
//! (`FsDirectoryStore`, feature `transparency`) has a lane of its own beside it
//! ([`MAX_DIRECTORY_BLOCKING`], [`Lane`]), so one process's file work is at most
//! [`MAX_BLOCKING`] + [`MAX_DIRECTORY_BLOCKING`] threads. (The directory's background
//! checkpoint, a `syncfs` every 64 epochs, runs on a thread of its own, at most one per
//! domain at a time.)
//!
//! Without it, a flood of look-ups whose files are not in the page cache (each one a
//! `spawn_blocking`) grows the blocking pool to hundreds of threads (Tokio's default limit is
//! 512), each with its stack: RSS, not throughput, since two cores and one disk do not read
//! faster with more threads. Look-ups whose files are cached do not come here at all
//! ([`crate::nowait`]).
//!
//! The permit moves into the blocking closure: a caller that stops waiting (a timeout) does
//! not free it while its file work still runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use kst_core::{Error, Result};
use tokio::sync::Semaphore;

use crate::error::COMPONENT;

/// Most file operations of the store running on the blocking pool at once, per process.
pub const MAX_BLOCKING: usize = 16;

/// The permits: [`MAX_BLOCKING`] of them, handed out first come, first served.
static PERMITS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(MAX_BLOCKING)));

/// Most file operations of the key directory (feature `transparency`) running on the
/// blocking pool at once, per process, beside the key store's [`MAX_BLOCKING`]. Each
/// domain's directory thread asks for one or two operations at a time (two reads at once
/// before an epoch; a commit may go on writing the epoch's files after answering), so this
/// is room for several domains' writers at once.
pub const MAX_DIRECTORY_BLOCKING: usize = 8;

/// The key directory's permits: [`MAX_DIRECTORY_BLOCKING`] of them, first come, first served.
static DIRECTORY_PERMITS: LazyLock<Arc<Semaphore>> =
    LazyLock::new(|| Arc::new(Semaphore::new(MAX_DIRECTORY_BLOCKING)));

/// Whose permits a blocking operation takes.
///
/// The key directory has a lane of its own: its writer is one thread per domain that builds
/// one epoch at a time, and every publication waits for the epoch that records it. Queued
/// behind the publications' own file work (a key written and flushed to disk holds a permit
/// for the whole flush), each of the writer's reads and its commit waited for up to
/// [`MAX_BLOCKING`] flushes: the epoch grew longer, and every publication waited longer
/// for it (docs/BENCHMARKS.md, "The fs directory's lane").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// The key store's work ([`crate::FsStore`]): [`MAX_BLOCKING`] permits.
    Store,
    /// The key directory's work (`FsDirectoryStore`): [`MAX_DIRECTORY_BLOCKING`] permits.
    #[cfg_attr(not(feature = "transparency"), allow(dead_code))]
    Directory,
}

impl Lane {
    fn permits(self) -> &'static Arc<Semaphore> {
        match self {
            Lane::Store => &PERMITS,
            Lane::Directory => &DIRECTORY_PERMITS,
        }
    }

    /// The lane's operations running now and the most there ever were.
    fn counts(self) -> &'static [AtomicUsize; 2] {
        static STORE: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
        static DIRECTORY: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
        match self {
            Lane::Store => &STORE,
            Lane::Directory => &DIRECTORY,
        }
    }

    /// How many of this lane's operations run now (for tests: [`blocking_in_flight`] counts
    /// both lanes, so a test of one lane cannot use it beside tests of the other).
    #[cfg(test)]
    pub(crate) fn in_flight(self) -> usize {
        self.counts()[0].load(Ordering::Relaxed)
    }

    /// The most of this lane's operations that ever ran at once in this process (for tests).
    #[cfg(test)]
    pub(crate) fn peak(self) -> usize {
        self.counts()[1].load(Ordering::Relaxed)
    }
}

/// Operations running now, and the most there ever were (for tests and metrics).
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// How many file operations of the store and its key directory run on the blocking pool
/// right now (at most [`MAX_BLOCKING`] + [`MAX_DIRECTORY_BLOCKING`]).
pub fn blocking_in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Relaxed)
}

/// The most file operations that ever ran on the blocking pool at once in this process.
pub fn blocking_peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Counts one running operation of its lane while it lives.
struct Running(Lane);

impl Running {
    fn start(lane: Lane) -> Running {
        let now = IN_FLIGHT.fetch_add(1, Ordering::Relaxed) + 1;
        PEAK.fetch_max(now, Ordering::Relaxed);
        let [in_flight, peak] = lane.counts();
        let now = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        peak.fetch_max(now, Ordering::Relaxed);
        Running(lane)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
        self.0.counts()[0].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs blocking file work off the async threads, once a permit is free (FIFO). A panic in it
/// is resumed in the caller.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    bounded(Lane::Store, f)
        .await
        .map_err(|why| Error::unavailable(COMPONENT, why))?
}

/// [`blocking`] for work with errors of its own (the key directory's): the work's result, or
/// why it did not run (the queue closed, the task cancelled: temporary).
pub(crate) async fn bounded<T, F>(lane: Lane, f: F) -> std::result::Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    bounded_answering(lane, move |answer: Answer<T>| {
        let _ = answer.send(f());
    })
    .await
}

/// Where work run by [`bounded_answering`] sends its result.
pub(crate) type Answer<T> = tokio::sync::oneshot::Sender<T>;

/// [`bounded`] for work that answers its caller before it ends: `f` sends the result through
/// the [`Answer`] it is given and may go on working afterwards, on the same blocking thread
/// and still holding the permit (the fs key directory's commit answers once its journal
/// frame is durable and then writes the epoch's files, holding the domain's lock). The work
/// after the answer never needs another blocking thread or permit, so it cannot wait behind
/// work that itself waits for it. Returns once the answer is sent; a panic before it is
/// resumed in the caller; work that ends without sending is an error.
pub(crate) async fn bounded_answering<T, F>(lane: Lane, f: F) -> std::result::Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(Answer<T>) + Send + 'static,
{
    let permit = Arc::clone(lane.permits())
        .acquire_owned()
        .await
        .map_err(|e| format!("the file operation queue is closed: {e}"))?;
    let (answer, answered) = tokio::sync::oneshot::channel();
    let run = move || {
        let _permit = permit;
        let _running = Running::start(lane);
        f(answer)
    };
    let work = tokio::task::spawn_blocking(run);
    match answered.await {
        // The work goes on if it has more to do, with its permit, on its thread.
        Ok(r) => Ok(r),
        // The answer was dropped unsent: the work ended, or panicked (resumed here).
        Err(_) => match work.await {
            Ok(()) => Err("the file operation ended without an answer".into()),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(format!("file operation cancelled: {e}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// 100 operations of 20 ms at once: never more than MAX_BLOCKING run, and the bound is
    /// reached (they do run side by side), and each one's result comes back. (Counted in the
    /// key store's lane: the directory's tests run beside this one.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_max_blocking_run_at_once() {
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                tokio::spawn(blocking(move || {
                    let now = Lane::Store.in_flight();
                    assert!(now <= MAX_BLOCKING, "{now} in flight");
                    std::thread::sleep(Duration::from_millis(20));
                    Ok(i)
                }))
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), i);
        }
        assert_eq!(Lane::Store.peak(), MAX_BLOCKING);
        assert!(blocking_peak() <= MAX_BLOCKING + MAX_DIRECTORY_BLOCKING);
    }

    /// Work that answers early: its caller has the answer while the work still runs, and
    /// the work keeps its permit until it ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_early_answer_returns_while_the_work_goes_on_with_its_permit() {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (ended, mut has_ended) = tokio::sync::oneshot::channel::<()>();
        let answer = bounded_answering(Lane::Store, move |answer: Answer<u32>| {
            answer.send(7).unwrap();
            wait.recv().unwrap();
            ended.send(()).unwrap();
        })
        .await
        .unwrap();
        assert_eq!(answer, 7);
        let still_running = has_ended.try_recv().is_err();
        let held = PERMITS.available_permits() < MAX_BLOCKING;
        release.send(()).unwrap();
        assert!(still_running, "the caller waited for the whole work");
        assert!(held, "the work gave its permit back before it ended");
        has_ended.await.unwrap();
    }

    /// A panic before the answer reaches the caller; work that never answers is an error.
    #[tokio::test]
    async fn a_panic_before_the_answer_is_the_callers() {
        let panicked = tokio::spawn(bounded_answering(Lane::Store, |_: Answer<u32>| {
            panic!("boom")
        }))
        .await
        .unwrap_err();
        assert!(panicked.is_panic());
        let silent = bounded_answering(Lane::Store, |answer: Answer<u32>| drop(answer)).await;
        assert!(silent.unwrap_err().contains("without an answer"));
    }
}
