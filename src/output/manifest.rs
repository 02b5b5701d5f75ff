//! The output directory's durable state: `_manifest.json` (job hash and
//! fingerprint, parts, counts; rewritten atomically after every part),
//! `metrics.json`, and the `.lock` that keeps one job per output.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Name of the manifest file in the output directory.
pub const MANIFEST: &str = "_manifest.json";
/// Name of the metrics file in the output directory.
pub const METRICS: &str = "_metrics.json";
/// Name of the lock file in the output directory.
pub const LOCK: &str = ".lock";

/// Figures of one part file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PartStats {
    /// File name inside the output directory.
    pub file: String,
    /// Rows.
    pub rows: usize,
    /// Rows with status ok.
    pub ok: usize,
    /// Rows with status error.
    pub errors: usize,
    /// Prompt tokens of its rows.
    pub prompt_tokens: usize,
    /// Generated tokens of its rows.
    pub completion_tokens: usize,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// sha256 of the fingerprint.
    pub job_hash: String,
    /// What makes two jobs the same job (model, generation, input).
    pub fingerprint: BTreeMap<String, String>,
    /// running | finished | interrupted.
    pub state: String,
    /// Records in the input.
    pub total_records: usize,
    /// Part files written so far, in order.
    pub parts: Vec<PartStats>,
    /// Process that last ran the job.
    pub pid: u32,
    /// Its host.
    pub host: String,
    /// The job file.
    pub job_file: String,
    /// Seconds since the epoch of the last update.
    pub updated_unix: u64,
    /// Generation wall time over all runs so far.
    pub wall_s: f64,
}

impl Manifest {
    /// Rows written.
    pub fn rows(&self) -> usize {
        self.parts.iter().map(|p| p.rows).sum()
    }

    /// Sum of a part figure.
    pub fn sum(&self, f: impl Fn(&PartStats) -> usize) -> usize {
        self.parts.iter().map(f).sum()
    }

    /// Reads `dir/manifest.json`, `None` when absent.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(MANIFEST);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Output(format!("{}: unreadable manifest ({e})", p.display())))
    }

    /// Writes `dir/manifest.json` atomically (tmp, fsync, rename, fsync dir).
    pub fn write(&mut self, dir: &Path) -> Result<()> {
        self.updated_unix = now_unix();
        write_atomic(
            dir,
            MANIFEST,
            &serde_json::to_vec_pretty(self).expect("manifest serializes"),
        )
    }

    /// What differs from another fingerprint, as `key: old -> new` lines.
    pub fn changes(&self, new: &BTreeMap<String, String>) -> Vec<String> {
        let keys: std::collections::BTreeSet<&String> =
            self.fingerprint.keys().chain(new.keys()).collect();
        keys.into_iter()
            .filter(|k| self.fingerprint.get(*k) != new.get(*k))
            .map(|k| {
                let show = |v: Option<&String>| v.map_or("(none)".to_string(), |s| s.clone());
                format!(
                    "{k}: {} -> {}",
                    show(self.fingerprint.get(k)),
                    show(new.get(k))
                )
            })
            .collect()
    }
}

/// sha256 hex of a fingerprint's canonical JSON.
pub fn job_hash(fp: &BTreeMap<String, String>) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(fp).expect("map serializes"),
    ))
}

/// sha256 hex of a file's bytes.
pub fn file_hash(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes `dir/name` through a temporary file, fsyncs it, renames it into
/// place and fsyncs the directory: readers see the old or the new file.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(name);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

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

/// Whether a process with this pid exists on this host.
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The lock of an output directory, released on drop.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
}

/// What a lock file says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockInfo {
    /// Holder's pid.
    pub pid: u32,
    /// Holder's host.
    pub host: String,
    /// When it was taken (seconds since the epoch).
    pub since_unix: u64,
}

impl LockInfo {
    /// Whether the holder is known dead (same host, no such pid).
    pub fn is_stale(&self) -> bool {
        self.host == host_name() && !pid_alive(self.pid)
    }
}

impl OutputLock {
    /// Takes `dir/.lock`; a stale lock (dead pid on this host) is taken
    /// over, a live one is refused naming its holder.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK);
        let me = LockInfo {
            pid: std::process::id(),
            host: host_name(),
            since_unix: now_unix(),
        };
        for _ in 0..3 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(&serde_json::to_vec(&me).expect("lock serializes"))
                        .map_err(|e| Error::io(&path, e))?;
                    f.sync_all().map_err(|e| Error::io(&path, e))?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let held = Self::read(dir);
                    match held {
                        Some(h) if !h.is_stale() => {
                            return Err(Error::Output(format!(
                                "output {} is locked by pid {} on host {} (since {} s ago): another `runner submit` is writing it; wait for it, or delete {} if that process is gone",
                                dir.display(),
                                h.pid,
                                h.host,
                                now_unix().saturating_sub(h.since_unix),
                                path.display()
                            )))
                        }
                        Some(h) => tracing::warn!(
                            pid = h.pid,
                            host = %h.host,
                            "taking over a stale lock of a dead process"
                        ),
                        None => tracing::warn!("replacing an unreadable lock file"),
                    }
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::Output(format!(
            "could not take the lock {}",
            path.display()
        )))
    }

    /// The lock holder of `dir`, if any.
    pub fn read(dir: &Path) -> Option<LockInfo> {
        let text = std::fs::read_to_string(dir.join(LOCK)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Figures of the part files on disk (ids and per-part stats), read back
/// from the files themselves: the authority after a crash.
pub fn scan_parts(dir: &Path) -> Result<(HashSet<String>, Vec<PartStats>)> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::UInt32Type;
    let mut ids = HashSet::new();
    let mut stats = Vec::new();
    for p in super::parquet::existing_parts(dir)? {
        let batches = super::parquet::read_part(&p)?;
        let mut st = PartStats {
            file: p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string(),
            ..Default::default()
        };
        for b in batches {
            let col = |n: &str| {
                b.column_by_name(n)
                    .ok_or_else(|| Error::Output(format!("{}: no `{n}` column", p.display())))
            };
            let id = col("id")?.as_string::<i32>().clone();
            let status = col("status")?.as_string::<i32>().clone();
            let pt = col("prompt_tokens")?.as_primitive::<UInt32Type>().clone();
            let ct = col("completion_tokens")?
                .as_primitive::<UInt32Type>()
                .clone();
            for i in 0..b.num_rows() {
                if !ids.insert(id.value(i).to_string()) {
                    return Err(Error::Output(format!(
                        "{}: record id `{}` is written twice in the output",
                        dir.display(),
                        id.value(i)
                    )));
                }
                st.rows += 1;
                if status.value(i) == "ok" {
                    st.ok += 1;
                } else {
                    st.errors += 1;
                }
                st.prompt_tokens += pt.value(i) as usize;
                st.completion_tokens += ct.value(i) as usize;
            }
            let _ = id.len();
        }
        stats.push(st);
    }
    Ok((ids, stats))
}

/// Removes temporary files a killed writer left behind.
pub fn remove_stale_tmp(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
    {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
            n += 1;
        }
    }
    Ok(n)
}
