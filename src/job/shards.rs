//! The shards of one job in one output directory: the check that keeps them
//! one job split one way, `--shard auto` from the scheduler's environment,
//! and their overview for `runner status` and `runner merge`.

use super::manifest::Manifest;
use super::status::{JobStatus, Liveness};
use super::JobState;
use crate::output::{shards_in, Layout, Shard};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The name of the file whose lock serialises the split check: a run holds
/// it from before it reads its neighbours' manifests until it has written
/// its own, so two runs of different splits started at the same instant
/// cannot both see an empty directory.
pub const SPLIT_LOCK: &str = ".split.lock";

/// Takes the directory's split lock, waiting for another run's check to
/// finish (it is held for the check and the manifest write only); released
/// when the returned file is dropped. The file itself stays (a zero-byte
/// `.split.lock`), so that waiting runs lock the same file.
pub fn split_guard(dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(SPLIT_LOCK);
    let file = super::lock::open_lock_file(&path)?;
    file.lock().map_err(|e| Error::io(&path, e))?;
    Ok(file)
}

/// Refuses to write `files` beside manifests of another split of the job
/// (another shard count, or the whole job unsharded), always, and beside a
/// shard of a different job unless `restart` (each shard clears only its
/// own files).
pub fn check_neighbours(
    files: &Layout,
    fp: &BTreeMap<String, String>,
    restart: bool,
) -> Result<()> {
    let dir = &files.dir;
    let mut others: Vec<Layout> = shards_in(dir)?
        .into_iter()
        .map(|s| Layout::new(dir, Some(s)))
        .collect();
    others.push(Layout::plain(dir));
    let split =
        |s: Option<Shard>| s.map_or("unsharded".to_string(), |s| format!("{} shards", s.count));
    for o in others.iter().filter(|o| *o != files) {
        let Some(m) = Manifest::read(o)? else {
            continue;
        };
        if o.shard.map(|s| s.count) != files.shard.map(|s| s.count) {
            return Err(Error::DifferentJob(format!(
                "output {} holds this job's output written {} ({}), and this run is {}: one output directory takes one split; use another output.path or remove the other files",
                dir.display(),
                split(o.shard),
                o.manifest().display(),
                split(files.shard)
            )));
        }
        let changed = m.changes(fp);
        if !changed.is_empty() && !restart {
            return Err(Error::DifferentJob(format!(
                "output {} holds shard {} of a different job; changed: {}. All shards of one output run the same job; pass --restart to each shard to start over",
                dir.display(),
                o.shard.map_or("-".into(), |s| s.to_string()),
                changed.join("; ")
            )));
        }
    }
    Ok(())
}

/// Where the environment says a scheduler's task stands.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// `--shard auto`: a Slurm array task (`SLURM_ARRAY_TASK_ID`) or a
/// Kubernetes Indexed Job's pod (`JOB_COMPLETION_INDEX`). With a `count`
/// (`--shard-count`, else `output.shard_count`) the task id or index is
/// the shard index as it is (so a retry array such as `--array=3,5` keeps
/// its shards); without one, Slurm's shard is `SLURM_ARRAY_TASK_ID -
/// SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT` (arrays may start at
/// 1). Returns the shard and where it came from.
pub fn shard_from_env(env: Env<'_>, count: Option<usize>) -> Result<(Shard, String)> {
    let num = |k: &str| -> Result<Option<usize>> {
        env(k)
            .map(|v| {
                v.trim().parse::<usize>().map_err(|_| {
                    Error::Config(format!(
                        "--shard auto: {k} is `{v}`, expected a whole number"
                    ))
                })
            })
            .transpose()
    };
    if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
        let (index, n, from) = match count {
            Some(n) => (id, n, format!("SLURM_ARRAY_TASK_ID={id}, shard count {n}")),
            None => {
                let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
                let n = num("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                    Error::Config("--shard auto: SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT; give --shard-count".into())
                })?;
                let from = format!("SLURM_ARRAY_TASK_ID={id} - SLURM_ARRAY_TASK_MIN={min} of SLURM_ARRAY_TASK_COUNT={n}");
                (id.saturating_sub(min), n, from)
            }
        };
        let s = Shard::new(index, n).map_err(|e| {
            Error::Config(format!(
                "--shard auto ({from}): {e}; the array must be contiguous (--array=0-{}), or give --shard-count with task ids 0..N-1",
                n.saturating_sub(1)
            ))
        })?;
        return Ok((s, from));
    }
    if let Some(i) = num("JOB_COMPLETION_INDEX")? {
        let n = count.ok_or_else(|| {
            Error::Config("--shard auto: JOB_COMPLETION_INDEX is set but the shard count is not: give --shard-count N or output.shard_count (the Job's `completions`)".into())
        })?;
        let s = Shard::new(i, n)
            .map_err(|e| Error::Config(format!("--shard auto (JOB_COMPLETION_INDEX {i}): {e}")))?;
        return Ok((s, format!("JOB_COMPLETION_INDEX={i}, count {n}")));
    }
    Err(Error::Config(
        "--shard auto: neither SLURM_ARRAY_TASK_ID (a Slurm array task) nor JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) is set; give --shard I/N".into(),
    ))
}

/// One shard of a sharded output, as on disk.
#[derive(Debug)]
pub struct ShardState {
    /// Which.
    pub shard: Shard,
    /// Its status; `None`: never started (no manifest).
    pub status: Option<JobStatus>,
}

impl ShardState {
    /// `done`, `running`, `dead`, `interrupted` or `missing`.
    pub fn word(&self) -> &'static str {
        match self.status.as_ref().map(|s| &s.liveness) {
            None => "missing",
            Some(Liveness::Running(_)) => "running",
            Some(Liveness::Dead) => "dead",
            Some(Liveness::Ended(JobState::Finished)) => "done",
            Some(Liveness::Ended(_)) => "interrupted",
        }
    }
}

/// Every shard of the output in `dir` (`None`: not a sharded output).
pub fn overview(dir: &Path) -> Result<Option<Vec<ShardState>>> {
    let found = shards_in(dir)?;
    let Some(first) = found.first() else {
        return Ok(None);
    };
    let count = first.count;
    if let Some(other) = found.iter().find(|s| s.count != count) {
        return Err(Error::Output(format!(
            "{} holds shards of {count} and of {}: two splits of the job in one directory",
            dir.display(),
            other.count
        )));
    }
    (0..count)
        .map(|i| {
            let shard = Shard::new(i, count)?;
            let files = Layout::new(dir, Some(shard));
            let status = match files.manifest().is_file() {
                true => Some(JobStatus::read(&files)?),
                false => None,
            };
            Ok(ShardState { shard, status })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Refuses to merge a sharded output while a shard has not started, or
/// when its shards hold different jobs (some restarted with a changed
/// job), naming the shards.
pub fn require_mergeable(dir: &Path, shards: &[ShardState]) -> Result<()> {
    let missing: Vec<String> = shards
        .iter()
        .filter(|s| s.status.is_none())
        .map(|s| s.shard.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(Error::Output(format!(
            "{}: shard(s) {} of {} missing (never started): run `runner submit JOB --shard I/N` for each, then merge",
            dir.display(),
            missing.join(", "),
            shards.len()
        )));
    }
    let hash = |s: &ShardState| s.status.as_ref().map(|st| st.manifest.job_hash.clone());
    let first = shards.first().and_then(hash);
    if let Some(other) = shards.iter().find(|s| hash(s) != first) {
        return Err(Error::DifferentJob(format!(
            "{}: shard {} holds a different job than shard {} (a shard was restarted with a changed job); resubmit every shard with the same job before merging",
            dir.display(),
            other.shard,
            shards[0].shard
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn shard_auto_reads_slurm_and_kubernetes() {
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            shard_from_env(&slurm, None).unwrap().0,
            Shard::new(2, 4).unwrap()
        );
        let k8s = env(&[("JOB_COMPLETION_INDEX", "5")]);
        assert_eq!(
            shard_from_env(&k8s, Some(8)).unwrap().0,
            Shard::new(5, 8).unwrap()
        );
        let e = shard_from_env(&k8s, None).unwrap_err().to_string();
        assert!(e.contains("--shard-count"), "{e}");
        let e = shard_from_env(&env(&[]), Some(2)).unwrap_err().to_string();
        assert!(
            e.contains("SLURM_ARRAY_TASK_ID") && e.contains("JOB_COMPLETION_INDEX"),
            "{e}"
        );
        let gap = env(&[
            ("SLURM_ARRAY_TASK_ID", "9"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        let e = shard_from_env(&gap, None).unwrap_err().to_string();
        assert!(e.contains("contiguous"), "{e}");
    }

    #[test]
    fn the_split_check_of_a_second_run_waits_for_the_first() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let first = split_guard(dir.path()).unwrap();
        let got = std::sync::Arc::new(AtomicBool::new(false));
        let second = {
            let (got, path) = (got.clone(), dir.path().to_path_buf());
            std::thread::spawn(move || {
                let g = split_guard(&path).unwrap();
                got.store(true, Ordering::SeqCst);
                drop(g);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !got.load(Ordering::SeqCst),
            "taken while the first run held it"
        );
        drop(first);
        second.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        assert!(dir.path().join(SPLIT_LOCK).is_file());
    }
}
