//! Durable file writes: a temporary file beside the target, fsync, rename, directory fsync.
//!
//! A reader sees the old file or the complete new one, never a part, and once a write returns
//! `Ok` it survives a crash: the data is synced before the rename, and the directory after it.
//! A write that fails (or an [`AtomicFile`] dropped before [`AtomicFile::commit`]) removes its
//! temporary file, so it leaves nothing behind.
//!
//! [`write_atomic`] writes a byte slice; [`AtomicFile`] is the same for a writer that streams
//! (an export). Writers that put many files into one directory at once can share its fsync
//! with [`AtomicFile::commit_shared`] (a [`GroupCommit`]).
//!
//! Files are created with mode 0600 and directories with 0700 (Unix).

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::GroupCommit;

/// Prefix of the temporary files [`AtomicFile::create`] makes: readers of a directory that is
/// written to should skip names that start with it.
pub const TEMP_PREFIX: &str = ".tmp-";

/// A step of a durable write failed. The message names the step and the path, e.g.
/// `fsync directory /var/lib/kst/keys/ab: Input/output error`.
#[derive(Debug)]
pub struct DurableError {
    /// What was being done: `create`, `write`, `fsync`, `rename into place`,
    /// `fsync directory`, `create directory`.
    pub step: &'static str,
    /// The file or directory it was done on.
    pub path: PathBuf,
    /// The error of the operating system.
    pub source: io::Error,
}

impl DurableError {
    fn new(step: &'static str, path: &Path, source: io::Error) -> Self {
        DurableError {
            step,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl fmt::Display for DurableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.step, self.path.display(), self.source)
    }
}

impl std::error::Error for DurableError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl From<DurableError> for io::Error {
    fn from(e: DurableError) -> io::Error {
        io::Error::new(e.source.kind(), e.to_string())
    }
}

/// Replaces `path` with `bytes`, atomically and durably (see the [module docs](self)).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DurableError> {
    let mut file = AtomicFile::create(path)?;
    file.write_bytes(bytes)?;
    file.commit()
}

/// A file being written under a temporary name, put in place by [`commit`](Self::commit).
/// Dropped without a commit, it removes the temporary file.
#[derive(Debug)]
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    /// Starts writing `target` through a temporary file `.tmp-<random>` in its directory.
    pub fn create(target: impl Into<PathBuf>) -> Result<Self, DurableError> {
        let target = target.into();
        let temp = dir_of(&target).join(format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>()));
        Self::create_with_temp(target, temp)
    }

    /// Starts writing `target` through the temporary file `temp` (in the same directory),
    /// replacing what a crashed writer may have left there. For callers that hold a lock over
    /// `temp` and want a name they can recognize.
    pub fn create_with_temp(
        target: impl Into<PathBuf>,
        temp: impl Into<PathBuf>,
    ) -> Result<Self, DurableError> {
        let (target, temp) = (target.into(), temp.into());
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options
            .open(&temp)
            .map_err(|e| DurableError::new("create", &temp, e))?;
        Ok(AtomicFile {
            target,
            temp,
            file: Some(file),
        })
    }

    /// The path the file will have once committed.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Writes all of `bytes`, naming the step in the error.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), DurableError> {
        self.write_all(bytes)
            .map_err(|e| DurableError::new("write", &self.temp, e))
    }

    /// Syncs the data, renames the file into place and syncs the directory. On an error the
    /// temporary file is removed; if the rename happened, the target may or may not survive a
    /// crash, so the write must be treated as failed (and may be retried).
    pub fn commit(self) -> Result<(), DurableError> {
        self.commit_with(sync_dir)
    }

    /// [`commit`](Self::commit), with the directory fsync shared with concurrent writers in the
    /// same directory: returns once a directory fsync that started after the rename succeeded.
    pub fn commit_shared(self, dir_sync: &GroupCommit) -> Result<(), DurableError> {
        self.commit_with(|dir| dir_sync.commit(|| sync_dir(dir)))
    }

    fn commit_with(
        mut self,
        sync: impl FnOnce(&Path) -> Result<(), DurableError>,
    ) -> Result<(), DurableError> {
        if let Some(file) = self.file.take() {
            file.sync_all()
                .map_err(|e| DurableError::new("fsync", &self.temp, e))?;
        }
        fs::rename(&self.temp, &self.target)
            .map_err(|e| DurableError::new("rename into place", &self.temp, e))?;
        // Renamed: nothing left to remove on drop.
        self.temp = PathBuf::new();
        sync(dir_of(&self.target))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.file.as_mut() {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("the file is already committed")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), Write::flush)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        self.file.take();
        if !self.temp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Makes changes to the entries of `dir` (renames, removals, new files) durable.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DurableError::new("fsync directory", dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Creates `dir` (and its parents) if it is missing, and syncs its parent so that the new
/// entry survives a crash.
pub fn create_dir(dir: &Path) -> Result<(), DurableError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| DurableError::new("create directory", dir, e))?;
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// The directory `path` is in (`.` for a bare file name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_and_replaces_leaving_only_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two, longer");
        assert_eq!(names(dir.path()), ["a.json"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    /// The directory is synced after the rename: when the sync runs, the target already holds
    /// all of the new bytes and the temporary file is gone.
    #[test]
    fn the_directory_is_synced_after_the_complete_file_is_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        let synced = Cell::new(None);
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_bytes(b"complete").unwrap();
        f.commit_with(|d| {
            synced.set(Some((
                d.to_path_buf(),
                fs::read(&path).unwrap(),
                names(dir.path()),
            )));
            sync_dir(d)
        })
        .unwrap();
        let (d, bytes, seen) = synced.take().expect("the directory was not synced");
        assert_eq!(d, dir.path());
        assert_eq!(bytes, b"complete");
        assert_eq!(seen, ["a.json"]);
    }

    #[test]
    fn a_failed_directory_sync_fails_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        let f = AtomicFile::create(&path).unwrap();
        let e = f
            .commit_with(|d| {
                Err(DurableError::new(
                    "fsync directory",
                    d,
                    io::Error::other("disk on fire"),
                ))
            })
            .unwrap_err();
        assert_eq!(e.step, "fsync directory");
        assert!(e.to_string().contains("disk on fire"), "{e}");
    }

    #[test]
    fn a_shared_commit_runs_the_group_flush() {
        let dir = tempfile::tempdir().unwrap();
        let group = GroupCommit::new();
        for n in 0..3 {
            let mut f = AtomicFile::create(dir.path().join(format!("{n}.eml"))).unwrap();
            f.write_bytes(b"x").unwrap();
            f.commit_shared(&group).unwrap();
        }
        assert_eq!(group.flushes(), 3);
        assert_eq!(names(dir.path()), ["0.eml", "1.eml", "2.eml"]);
    }

    #[test]
    fn a_failed_write_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        // The rename fails: the target is a directory that is not empty.
        let target = dir.path().join("taken");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), b"").unwrap();
        let e = write_atomic(&target, b"half").unwrap_err();
        assert_eq!(e.step, "rename into place");
        assert!(e.to_string().contains(TEMP_PREFIX), "{e}");
        assert_eq!(names(dir.path()), ["taken"]);

        // The old content stays when a streamed write is abandoned halfway.
        let path = dir.path().join("a.json");
        write_atomic(&path, b"old").unwrap();
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_bytes(b"new but unfin").unwrap();
        drop(f);
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["a.json", "taken"]);
    }

    #[test]
    fn a_missing_directory_is_a_create_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_atomic(&dir.path().join("no/such/a.json"), b"x").unwrap_err();
        assert_eq!(e.step, "create");
        assert_eq!(e.source.kind(), io::ErrorKind::NotFound);
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_fixed_temporary_name_left_by_a_crash_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (path, temp) = (dir.path().join("h.json"), dir.path().join("h.json.tmp"));
        fs::write(&temp, b"left over by a crashed writer, long").unwrap();
        let mut f = AtomicFile::create_with_temp(&path, &temp).unwrap();
        f.write_bytes(b"fresh").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"fresh");
        assert_eq!(names(dir.path()), ["h.json"]);
    }

    #[test]
    fn create_dir_makes_parents_once() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b");
        create_dir(&deep).unwrap();
        create_dir(&deep).unwrap();
        assert!(deep.is_dir());
        let e = create_dir(Path::new("/dev/null/x")).unwrap_err();
        assert_eq!(e.step, "create directory");
    }
}
