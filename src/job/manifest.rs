//! `_manifest.json`: the job hash and fingerprint, the parts with their
//! counts, the state; rewritten atomically after every part.

use super::lock::now_unix;
use super::JobState;
use crate::output::{write_atomic, Layout, PartStats, Shard};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub use crate::output::MANIFEST;

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// sha256 of the fingerprint.
    pub job_hash: String,
    /// What makes two jobs the same job (model, generation, input).
    pub fingerprint: BTreeMap<String, String>,
    /// Where the job stands.
    pub state: JobState,
    /// Records in the input.
    pub total_records: usize,
    /// Rows the job writes: one per sample of each record (`generation.n`);
    /// 0 in manifests of versions before samples (then one per record).
    #[serde(default)]
    pub total_rows: usize,
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
    /// The shard this manifest covers (`None`: the whole job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
}

impl Manifest {
    /// Rows written.
    pub fn rows(&self) -> usize {
        self.parts.iter().map(|p| p.rows).sum()
    }

    /// Rows the finished job holds.
    pub fn expected_rows(&self) -> usize {
        match self.total_rows {
            0 => self.total_records,
            n => n,
        }
    }

    /// Sum of a part figure.
    pub fn sum(&self, f: impl Fn(&PartStats) -> usize) -> usize {
        self.parts.iter().map(f).sum()
    }

    /// Reads the layout's manifest (`_manifest.json` of a whole job),
    /// `None` when absent.
    pub fn read(files: &Layout) -> Result<Option<Self>> {
        read_json(&files.manifest(), "manifest")
    }

    /// Writes the layout's manifest atomically (tmp, fsync, rename, fsync dir).
    pub fn write(&mut self, files: &Layout) -> Result<()> {
        self.updated_unix = now_unix();
        write_atomic(
            &files.dir,
            &files.manifest_name(),
            &serde_json::to_vec_pretty(self).expect("manifest serializes"),
        )
    }

    /// What differs from a new fingerprint, as `key: old -> new` lines.
    /// Only keys this manifest records are compared: a key added to the
    /// fingerprint by a later version does not make an older output
    /// another job.
    pub fn changes(&self, new: &BTreeMap<String, String>) -> Vec<String> {
        self.fingerprint
            .iter()
            // Older manifests hold `input.path` as written, relative to a
            // working directory they do not record: only a resolved
            // (absolute) path is compared; the content hash always is.
            .filter(|(k, v)| k.as_str() != "input.path" || Path::new(v.as_str()).is_absolute())
            .filter(|(k, v)| new.get(*k) != Some(*v))
            .map(|(k, v)| {
                let now = new.get(k).map_or("(none)", String::as_str);
                format!("{k}: {v} -> {now}")
            })
            .collect()
    }
}

/// A JSON file of the output directory: `None` when absent, an error naming
/// the file and `what` it is when it cannot be read or parsed.
pub(super) fn read_json<T: serde::de::DeserializeOwned>(p: &Path, what: &str) -> Result<Option<T>> {
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Output(format!("{}: unreadable {what} ({e})", p.display())))
}
