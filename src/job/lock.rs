//! The `.lock` that keeps one writer per output directory: an OS file lock
//! (released by the kernel when the process dies, however it dies), with
//! the holder's pid and host written inside for the messages.

use crate::output::Layout;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

pub use crate::output::LOCK;

/// Seconds since the epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// This machine's host name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The lock of an output directory; released (and its file removed) on drop.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: File,
}

/// What a lock file says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Holder's pid.
    pub pid: u32,
    /// Holder's host.
    pub host: String,
    /// When it was taken (seconds since the epoch).
    pub since_unix: u64,
}

impl OutputLock {
    /// Takes the layout's lock (`.lock` of a whole job). A file nobody
    /// holds locked (its writer died) is taken over; a held one is refused
    /// naming its holder.
    pub fn acquire(files: &Layout) -> Result<Self> {
        let (dir, path) = (files.describe(), files.lock());
        for _ in 0..3 {
            let mut file = open_lock_file(&path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(held_error(&dir, &path, &mut file)),
                Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
            // The previous holder removes the file while it still holds the
            // lock: a lock on a removed file is no lock, take it again.
            if !same_file(&file, &path) {
                continue;
            }
            if let Some(old) = read_info(&mut file) {
                tracing::warn!(
                    pid = old.pid,
                    host = %old.host,
                    "taking over a stale lock: its writer is gone (nothing holds it)"
                );
            }
            write_info(&mut file).map_err(|e| Error::io(&path, e))?;
            return Ok(Self { path, file });
        }
        Err(Error::Output(format!(
            "could not take the lock {}",
            path.display()
        )))
    }

    /// The holder of the layout's lock, if a live process holds it.
    pub fn holder(files: &Layout) -> Option<LockInfo> {
        let mut file = File::open(files.lock()).ok()?;
        match file.try_lock_shared() {
            Ok(()) => None, // nobody holds it
            Err(_) => read_info(&mut file),
        }
    }
}

/// Opens (creating, never truncating) a file that is locked, not written
/// through: the output's `.lock`, the split check's `.split.lock`.
pub(super) fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so that nobody locks a file that is
        // about to disappear (see `acquire`).
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

fn held_error(dir: &str, path: &Path, file: &mut File) -> Error {
    match read_info(file) {
        Some(h) => Error::Busy(format!(
            "output {dir} is locked by pid {} on host {} (since {} s ago): another `runner submit` is writing it; wait for it to finish or stop it",
            h.pid,
            h.host,
            now_unix().saturating_sub(h.since_unix),
        )),
        None => Error::Busy(format!(
            "output {dir} is locked ({} is held by another process): another `runner submit` is writing it",
            path.display()
        )),
    }
}

fn read_info(file: &mut File) -> Option<LockInfo> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_info(file: &mut File) -> std::io::Result<()> {
    let me = LockInfo {
        pid: std::process::id(),
        host: host_name(),
        since_unix: now_unix(),
    };
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(&serde_json::to_vec(&me).expect("lock serializes"))?;
    file.sync_all()
}

/// Whether the open file is still the one at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
