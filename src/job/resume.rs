//! What a resumed job finds on disk: the ids and figures of the parts
//! already written (the files are the authority after a crash), leftover
//! temporary files, the next part number; and `--restart`.

use crate::output::{read_part, Layout, PartStats};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// The (record id, sample index) pairs the output holds.
#[derive(Debug, Default)]
pub struct Written {
    samples: HashMap<String, Vec<u32>>,
    rows: usize,
}

impl Written {
    /// Rows written.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether nothing is written.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The sample indices written for a record (empty: none).
    pub fn samples(&self, id: &str) -> &[u32] {
        self.samples.get(id).map_or(&[], Vec::as_slice)
    }

    /// Records one row; false when (id, index) was already there.
    fn insert(&mut self, id: &str, index: u32) -> bool {
        let v = self.samples.entry(id.to_string()).or_default();
        if v.contains(&index) {
            return false;
        }
        v.push(index);
        self.rows += 1;
        true
    }
}

/// Figures of the part files on disk (the (id, sample) pairs and per-part
/// stats), read back from the files themselves: the authority after a
/// crash. A part that cannot be read is moved into `_quarantine/` (logged)
/// and its records are not counted as written, so the run regenerates them.
pub fn scan_parts(files: &Layout) -> Result<(Written, Vec<PartStats>)> {
    let dir = files.dir.as_path();
    use arrow::array::AsArray;
    use arrow::datatypes::UInt32Type;
    let mut ids = Written::default();
    let mut stats = Vec::new();
    for p in files.parts()? {
        let batches = match read_part(&p) {
            Ok(b) => b,
            Err(Error::CorruptPart(why)) => {
                let moved = quarantine(dir, &p)?;
                tracing::warn!(
                    part = %p.display(),
                    moved_to = %moved.display(),
                    "unreadable part moved aside; its records are generated again ({why})"
                );
                continue;
            }
            Err(e) => return Err(e),
        };
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
            let wrong = |n: &str, want: &str| {
                Error::Output(format!(
                    "{}: column `{n}` is not {want}: not a part file of this runner",
                    p.display()
                ))
            };
            let string = |n: &str| {
                col(n)?
                    .as_string_opt::<i32>()
                    .cloned()
                    .ok_or_else(|| wrong(n, "a string column"))
            };
            let count = |n: &str| {
                col(n)?
                    .as_primitive_opt::<UInt32Type>()
                    .cloned()
                    .ok_or_else(|| wrong(n, "a uint32 column"))
            };
            let (id, status) = (string("id")?, string("status")?);
            let (pt, ct) = (count("prompt_tokens")?, count("completion_tokens")?);
            // Parts of versions before `generation.n` hold sample 0 only.
            let sample = match b.column_by_name("sample_index") {
                Some(_) => Some(count("sample_index")?),
                None => None,
            };
            for i in 0..b.num_rows() {
                let index = sample.as_ref().map_or(0, |s| s.value(i));
                if !ids.insert(id.value(i), index) {
                    return Err(Error::Output(format!(
                        "{}: record id `{}` sample {index} is written twice in the output",
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
        }
        stats.push(st);
    }
    Ok((ids, stats))
}

/// Moves a part into `dir/_quarantine/` (never over an earlier one).
fn quarantine(dir: &Path, part: &Path) -> Result<std::path::PathBuf> {
    let q = dir.join(super::QUARANTINE);
    std::fs::create_dir_all(&q).map_err(|e| Error::io(&q, e))?;
    let name = part
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut dst = q.join(&name);
    let mut k = 1;
    while dst.exists() {
        dst = q.join(format!("{name}.{k}"));
        k += 1;
    }
    std::fs::rename(part, &dst).map_err(|e| Error::io(part, e))?;
    Ok(dst)
}

/// Removes temporary files a killed writer of this layout left behind
/// (never another shard's: it may be writing them now).
pub fn remove_stale_tmp(files: &Layout) -> Result<usize> {
    let dir = files.dir.as_path();
    let mut n = 0;
    for e in std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
    {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if files.owns_tmp(&name) {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Creates the output directory and checks it takes files.
pub fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::Config(format!(
            "output.path {} cannot be created: {e}",
            dir.display()
        ))
    })?;
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"ok").map_err(|e| {
        Error::Config(format!(
            "output.path {} is not writable: {e}",
            dir.display()
        ))
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Removes the files of a job (or shard) that wrote no part file: its
/// manifest, metrics and lock, then the directory if nothing else is in it
/// (never a file this crate did not write, nor another shard's). Best
/// effort: errors are ignored.
pub fn remove_if_unused(files: &Layout) {
    if !matches!(files.parts(), Ok(p) if p.is_empty()) {
        return;
    }
    for f in [files.manifest(), files.metrics(), files.lock()] {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir(&files.dir);
}

/// Removes a previous run's parts, manifest and metrics (`--restart`; a
/// shard's own files only).
pub fn clear_output(files: &Layout) -> Result<usize> {
    let parts = files.parts()?;
    for p in &parts {
        std::fs::remove_file(p).map_err(|e| Error::io(p, e))?;
    }
    for p in [files.manifest(), files.metrics()] {
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(parts.len())
}
