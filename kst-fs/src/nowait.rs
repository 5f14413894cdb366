//! Look-ups served on the calling (async) thread when the kernel holds everything they read
//! in its caches, instead of a hand-off to Tokio's blocking pool for each one.
//!
//! A read may only run on an async worker if it cannot wait for the disk. Linux says so
//! itself: `openat2` with `RESOLVE_CACHED` fails with `EAGAIN` unless every path component is
//! in the dentry cache (so the inode is in memory), and `preadv2` with `RWF_NOWAIT` fails with
//! `EAGAIN` unless the pages are in the page cache. [`attempt`] runs a read-only operation
//! with every file read done so; when any read would wait (or the file is missing, or anything
//! else is unusual), the attempt is dropped and the caller runs the operation on the blocking
//! pool as before, where the same reads may wait. The answer is the same either way: only
//! where it is computed differs. A kernel without these flags (before 5.12, or another OS)
//! always takes the blocking pool.

/// Largest file read on the async thread; larger ones (a long history) go to the blocking pool.
const MAX_BYTES: u64 = 1 << 20;

#[cfg(target_os = "linux")]
mod imp {
    use std::cell::Cell;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};

    use rustix::fs::{CWD, Mode, OFlags, ResolveFlags};
    use rustix::io::{Errno, ReadWriteFlags};

    thread_local! {
        /// Set while [`attempt`] runs on this thread: reads must not wait.
        static ACTIVE: Cell<bool> = const { Cell::new(false) };
        /// Set when a read inside [`attempt`] would have waited (or failed).
        static MISSED: Cell<bool> = const { Cell::new(false) };
    }

    /// The kernel lacks `RESOLVE_CACHED` or `RWF_NOWAIT` (for this file system): stop trying.
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

    /// Resets the thread's flags however `op` ends (a panic included).
    struct Active;

    impl Drop for Active {
        fn drop(&mut self) {
            ACTIVE.set(false);
        }
    }

    pub(crate) fn attempt<T>(op: impl FnOnce() -> T) -> Option<T> {
        if UNSUPPORTED.load(Ordering::Relaxed) || ACTIVE.get() {
            return None;
        }
        MISSED.set(false);
        ACTIVE.set(true);
        let guard = Active;
        let out = op();
        drop(guard);
        (!MISSED.get()).then_some(out)
    }

    pub(crate) fn active() -> bool {
        ACTIVE.get()
    }

    pub(crate) fn read_cached(path: &Path) -> Option<Vec<u8>> {
        let out = read(path);
        if out.is_none() {
            MISSED.set(true);
        }
        out
    }

    fn unsupported(e: Errno) -> bool {
        matches!(
            e,
            Errno::NOSYS | Errno::INVAL | Errno::OPNOTSUPP | Errno::PERM
        )
    }

    fn read(path: &Path) -> Option<Vec<u8>> {
        let fd = match rustix::fs::openat2(
            CWD,
            path,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
            ResolveFlags::CACHED,
        ) {
            Ok(fd) => fd,
            Err(e) => {
                if unsupported(e) {
                    UNSUPPORTED.store(true, Ordering::Relaxed);
                }
                return None;
            }
        };
        let size = u64::try_from(rustix::fs::fstat(&fd).ok()?.st_size).ok()?;
        if size > super::MAX_BYTES {
            return None;
        }
        let mut buf = vec![0u8; usize::try_from(size).ok()?];
        let mut at = 0;
        while at < buf.len() {
            match rustix::io::preadv2(
                &fd,
                &mut [std::io::IoSliceMut::new(&mut buf[at..])],
                at as u64,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => break,
                Ok(n) => at += n,
                Err(e) => {
                    if unsupported(e) {
                        UNSUPPORTED.store(true, Ordering::Relaxed);
                    }
                    return None;
                }
            }
        }
        buf.truncate(at);
        Some(buf)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::path::Path;

    pub(crate) fn attempt<T>(_op: impl FnOnce() -> T) -> Option<T> {
        None
    }

    pub(crate) fn active() -> bool {
        false
    }

    pub(crate) fn read_cached(_path: &Path) -> Option<Vec<u8>> {
        None
    }
}

/// Runs `op` here with every file read cache-only ([`read_cached`]); `None` when one of its
/// reads would have waited for the disk (or found no file), so that the caller runs `op` on
/// the blocking pool instead. Only for operations that read and never write.
pub(crate) use imp::attempt;

/// Whether this thread is inside [`attempt`] (reads must go through [`read_cached`]).
pub(crate) use imp::active;

/// The whole of the file at `path` if it can be read without waiting for the disk; `None`
/// otherwise (then the [`attempt`] it is part of is dropped). A missing file is `None` too:
/// whether "missing" is an answer is for the blocking path to decide.
pub(crate) use imp::read_cached;

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::fd::AsFd as _;

    #[test]
    fn a_cached_file_is_read_here_and_a_missing_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello").unwrap();
        let got = attempt(|| read_cached(&path));
        assert_eq!(got, Some(Some(b"hello".to_vec())), "just written: cached");
        assert!(!active(), "the flag is reset after the attempt");
        let missing = dir.path().join("missing");
        assert_eq!(
            attempt(|| read_cached(&missing)),
            None,
            "a missing file goes to the blocking path"
        );
        assert_eq!(
            attempt(|| (read_cached(&path), read_cached(&missing))),
            None,
            "one miss drops the whole attempt"
        );
    }

    #[test]
    fn a_file_not_in_the_page_cache_is_not_read_here() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cold");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 64 * 1024]).unwrap();
        f.sync_all().unwrap();
        // Clean pages can be dropped from the page cache: then a read must wait for the disk.
        rustix::fs::fadvise(f.as_fd(), 0, None, rustix::fs::Advice::DontNeed).unwrap();
        drop(f);
        match attempt(|| read_cached(&path)) {
            None => {}
            // tmpfs (a test directory in memory) keeps every page: nothing to wait for.
            Some(Some(bytes)) => assert_eq!(bytes.len(), 64 * 1024),
            Some(None) => panic!("a miss must drop the attempt"),
        }
        let warm = std::fs::read(&path).unwrap();
        assert_eq!(
            attempt(|| read_cached(&path)),
            Some(Some(warm)),
            "read once, the file is cached again"
        );
    }

    #[test]
    fn attempts_do_not_nest_and_panics_reset_the_flag() {
        assert_eq!(attempt(|| attempt(|| 1)), Some(None));
        let r = std::panic::catch_unwind(|| attempt(|| panic!("boom")));
        assert!(r.is_err());
        assert!(!active());
        assert_eq!(attempt(|| 2), Some(2));
    }
}
