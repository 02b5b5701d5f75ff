//! Where a job's output stands, for `runner status`: the manifest's
//! figures, and whether a live process holds the lock.

use super::lock::{now_unix, LockInfo, OutputLock};
use super::manifest::Manifest;
use super::JobState;
use crate::output::Layout;
use crate::{Error, Result};
use std::path::Path;

/// Whether anything is running the job now.
#[derive(Debug, Clone, PartialEq)]
pub enum Liveness {
    /// A live process holds the output's lock.
    Running(LockInfo),
    /// The manifest says running but nothing holds the lock: its writer
    /// died (resubmit to resume).
    Dead,
    /// Finished or interrupted, as the manifest says.
    Ended(JobState),
}

/// The status of one job output.
#[derive(Debug, Clone)]
pub struct JobStatus {
    /// The manifest as on disk.
    pub manifest: Manifest,
    /// Running, dead or ended.
    pub liveness: Liveness,
    /// Seconds since the manifest was written.
    pub updated_s_ago: u64,
    /// Parts the manifest lists that are missing, unreadable or hold
    /// another row count, each with what is wrong.
    pub damaged: Vec<String>,
}

impl JobStatus {
    /// Reads the status of the job (or shard) whose files are `files`.
    pub fn read(files: &Layout) -> Result<Self> {
        let manifest = Manifest::read(files)?.ok_or_else(|| {
            Error::Output(format!(
                "{} has no {}: not the output of a runner job",
                files.dir.display(),
                files.manifest_name()
            ))
        })?;
        let dir = files.dir.as_path();
        let liveness = match (OutputLock::holder(files), manifest.state) {
            (Some(holder), _) => Liveness::Running(holder),
            (None, JobState::Running) => Liveness::Dead,
            (None, s) => Liveness::Ended(s),
        };
        Ok(Self {
            updated_s_ago: now_unix().saturating_sub(manifest.updated_unix),
            damaged: check_parts(dir, &manifest),
            manifest,
            liveness,
        })
    }

    /// The error to exit with when a part is damaged.
    pub fn damage_error(&self, dir: &Path) -> Option<Error> {
        (!self.damaged.is_empty()).then(|| {
            Error::CorruptPart(format!(
                "{}: {}; resubmit the job (`runner submit JOB`) to move damaged parts to {}/ and regenerate their records",
                dir.display(),
                self.damaged.join("; "),
                super::QUARANTINE
            ))
        })
    }

    /// One line: the state, rows written of those expected, parts, damage
    /// (`runner status` of a sweep's variant or a job's shard).
    pub fn line(&self) -> String {
        let m = &self.manifest;
        format!(
            "{}, {} of {} records, {} parts{}",
            self.state_line(),
            m.rows(),
            m.expected_rows(),
            m.parts.len(),
            match self.damaged.len() {
                0 => String::new(),
                n => format!(", {n} damaged"),
            }
        )
    }

    /// The state in words.
    pub fn state_line(&self) -> String {
        match &self.liveness {
            Liveness::Running(l) => format!("running (pid {} on {})", l.pid, l.host),
            Liveness::Dead => "dead (stopped without finishing; resubmit to resume)".into(),
            Liveness::Ended(s) => s.as_str().to_string(),
        }
    }
}

/// Reads back every part the manifest lists: what is missing, unreadable
/// or holds another number of rows than recorded.
fn check_parts(dir: &Path, m: &Manifest) -> Vec<String> {
    let mut bad = Vec::new();
    for part in &m.parts {
        let p = dir.join(&part.file);
        if !p.is_file() {
            bad.push(format!("{} is missing", part.file));
            continue;
        }
        match crate::output::read_part(&p) {
            Ok(batches) => {
                let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
                if rows != part.rows {
                    bad.push(format!(
                        "{} holds {rows} rows, the manifest says {}",
                        part.file, part.rows
                    ));
                }
            }
            Err(e) => bad.push(e.to_string()),
        }
    }
    bad
}
