//! A job's lifecycle around the engine: the output's lock, the job's
//! fingerprint, the manifest, the resume scan, signals and the metrics file;
//! sweeps are built on it. The CLI parses, calls [`submit`] and prints.
//!
//! Submit is resumable: the output directory holds Parquet parts written
//! atomically, `_manifest.json` (job hash, parts, counts) rewritten
//! atomically after each part, `_metrics.json`, and `.lock`. A second submit
//! of the same job skips the ids already written; a changed job is refused
//! unless `restart`.

mod export;
mod fingerprint;
mod lock;
mod manifest;
mod merge;
mod metrics;
mod resume;
pub mod shards;
mod signals;
mod status;
pub mod sweep;

pub use export::openai_batch as export_openai_batch;
pub use fingerprint::{file_hash, fingerprint, job_hash, prescan};
pub use lock::{host_name, now_unix, LockInfo, OutputLock, LOCK};
pub use manifest::{Manifest, MANIFEST};
pub use merge::merge;
pub use metrics::{LastRun, Metrics, METRICS};
pub use resume::{clear_output, remove_stale_tmp, scan_parts};
pub use signals::INTERRUPTED_EXIT;
pub use status::{JobStatus, Liveness};

use crate::config::JobSpec;
use crate::engine::{Fleet, JobSummary};
use crate::model::HubSettings;
use crate::output::{Layout, ParquetSink, SinkSettings};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Where resume moves part files it cannot read (inside the output
/// directory; a `*.parquet` glob over the output does not reach it).
pub const QUARANTINE: &str = "_quarantine";

/// Where a job stands, as its manifest records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// A run is writing it (or died doing so: see [`Liveness`]).
    Running,
    /// Every record is written.
    Finished,
    /// Stopped by a signal; resumable.
    Interrupted,
}

impl JobState {
    /// The state as written in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Finished => "finished",
            JobState::Interrupted => "interrupted",
        }
    }
}

/// What a run reports as it goes (the CLI's progress bar or log lines).
pub trait Progress: Send + Sync {
    /// The run starts with `remaining` records to write.
    fn start(&self, remaining: u64);
    /// A row was written with this many generated tokens.
    fn row(&self, completion_tokens: u64);
    /// The run ended.
    fn finish(&self);
}

/// Runs a job, or each variant of a sweep job, end to end, resuming into
/// an output that holds part of it.
pub fn submit(
    spec: &JobSpec,
    hub: &HubSettings,
    restart: bool,
    progress: Arc<dyn Progress>,
) -> Result<()> {
    match &spec.sweep {
        None => run_one(spec, hub, restart, progress),
        Some(sw) => sweep::run(spec, sw, hub, restart, progress),
    }
}

/// What the output already holds, once the job's identity is checked.
struct Prepared {
    manifest: Manifest,
    done: resume::Written,
}

/// Runs one model's job (a plain job, or one sweep variant). An output
/// directory this run created is removed again when the run fails before
/// writing any part (a job that fails its checks leaves nothing behind).
pub fn run_one(
    spec: &JobSpec,
    hub: &HubSettings,
    restart: bool,
    progress: Arc<dyn Progress>,
) -> Result<()> {
    let created = !spec.output.path.exists();
    let result = run_checked(spec, hub, restart, progress);
    if result.is_err() && created {
        resume::remove_if_unused(&Layout::new(&spec.output.path, spec.shard));
    }
    result
}

fn run_checked(
    spec: &JobSpec,
    hub: &HubSettings,
    restart: bool,
    progress: Arc<dyn Progress>,
) -> Result<()> {
    let files = Layout::new(&spec.output.path, spec.shard);
    // Job-level checks first, before any model work.
    resume::check_writable(&files.dir)?;
    let _lock = OutputLock::acquire(&files)?;
    let Some(prep) = prepare(spec, &files, restart)? else {
        return Ok(()); // already complete
    };
    let stop = signals::stop_flag()?;
    let load_start = Instant::now();
    let devices = crate::engine::job_devices(&spec.engine)?;
    let (mut fleet, mut meta) = Fleet::load(spec, hub, &devices)?;
    let load_s = load_start.elapsed().as_secs_f64();
    fleet.set_stop_flag(stop);
    let model = fleet
        .engines()
        .next()
        .expect("a fleet has an engine")
        .model();
    tracing::info!(
        model = %spec.model.id,
        quant = %model.quant().map_or("none".into(), |q| q.short_name()),
        devices = %devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","),
        shard = %spec.shard.map_or("-".into(), |s| s.to_string()),
        load_s,
        job_id = %meta.job_id,
        "model loaded"
    );
    let mut input = crate::input::open(&spec.input, &spec.generation)?;
    meta.passthrough = input.passthrough_schema();
    meta.constrained |= input.has_schema_column();
    let first_part = files.next_part_index()?;
    let mut sink = ParquetSink::resume(&files, meta, SinkSettings::of(&spec.output), first_part)?;
    let remaining = prep
        .manifest
        .expected_rows()
        .saturating_sub(prep.done.rows());
    progress.start(remaining as u64);
    let p = Arc::clone(&progress);
    sink.on_row(Box::new(move |row| p.row(row.completion_tokens as u64)));
    let shared = Arc::new(Mutex::new(prep.manifest));
    sink.on_part(part_hook(Arc::clone(&shared), &files));
    let done = prep.done;
    let defaults = &spec.generation;
    let shard = spec.shard;
    let mut todo = std::iter::from_fn(move || loop {
        match input.next()? {
            Ok(mut r) => {
                if shard.is_some_and(|s| !s.holds(&r.id)) {
                    continue;
                }
                r.written_samples = done.samples(&r.id).to_vec();
                if !r.pending_samples(defaults).is_empty() {
                    return Some(Ok(r));
                }
            }
            other => return Some(other),
        }
    });
    let ran = fleet.run(
        &mut todo,
        &spec.generation.system_prompt,
        defaults,
        &mut sink,
    )?;
    progress.finish();
    let man = shared.lock().expect("manifest lock").clone();
    finish(spec, &files, man, &ran, load_s)
}

/// Checks the job against what the output holds (refusing a different
/// job unless `restart`), clears it on `restart`, and writes the running
/// manifest. `None`: every record is already written.
fn prepare(spec: &JobSpec, files: &Layout, restart: bool) -> Result<Option<Prepared>> {
    // The duplicate-id prescan and the input's sha256 (in the fingerprint)
    // each read the whole input: side by side.
    let (total, fp) = std::thread::scope(|s| {
        let fp = s.spawn(|| fingerprint(spec));
        let total = prescan(spec);
        let fp = fp.join().expect("the fingerprint thread does not panic");
        (total, fp)
    });
    let (total, fp) = (total?, fp?);
    // Held until this run's manifest is written (dropped with `prepare`).
    let _split = shards::split_guard(&files.dir)?;
    let old = Manifest::read(files)?;
    check_same_job(files, old.as_ref(), &fp, restart)?;
    shards::check_neighbours(files, &fp, restart)?;
    if restart {
        let n = clear_output(files)?;
        if n > 0 {
            tracing::warn!(parts = n, "--restart: discarded the previous output");
        }
    }
    let stale = remove_stale_tmp(files)?;
    if stale > 0 {
        tracing::info!(
            files = stale,
            "removed temporary files of an interrupted write"
        );
    }
    let (done, parts) = scan_parts(files)?;
    let mut manifest = Manifest {
        job_hash: job_hash(&fp),
        fingerprint: fp,
        state: JobState::Running,
        total_records: total.records,
        total_rows: total.rows,
        parts,
        pid: std::process::id(),
        host: host_name(),
        job_file: spec.job_file.display().to_string(),
        updated_unix: 0,
        wall_s: old.filter(|_| !restart).map_or(0.0, |m| m.wall_s),
        shard: files.shard,
    };
    if !restart && done.rows() >= total.rows && (!done.is_empty() || total.rows == 0) {
        manifest.state = JobState::Finished;
        manifest.write(files)?;
        tracing::info!(records = total.records, rows = total.rows, output = %files.describe(), "already complete: nothing to run");
        return Ok(None);
    }
    manifest.write(files)?;
    if !done.is_empty() {
        tracing::info!(
            written = done.rows(),
            remaining = total.rows.saturating_sub(done.rows()),
            "resuming: records already in the output are skipped"
        );
    }
    Ok(Some(Prepared { manifest, done }))
}

/// Refuses an output that holds another job's rows (or rows of no
/// resumable job), unless `restart`.
fn check_same_job(
    files: &Layout,
    old: Option<&Manifest>,
    fp: &BTreeMap<String, String>,
    restart: bool,
) -> Result<()> {
    if restart {
        return Ok(());
    }
    match old {
        Some(m) => {
            let changed = m.changes(fp);
            if changed.is_empty() {
                return Ok(());
            }
            Err(Error::DifferentJob(format!(
                "output {} holds {} rows of a different job; changed: {}. Resume needs the same job; pass --restart to discard those rows and start over",
                files.describe(),
                m.rows(),
                changed.join("; ")
            )))
        }
        None => {
            let on_disk = files.parts()?;
            if on_disk.is_empty() {
                return Ok(());
            }
            Err(Error::DifferentJob(format!(
                "output {} holds {} part file(s) but no {}: not written by a resumable job; pass --restart to discard them or choose another output.path",
                files.describe(),
                on_disk.len(),
                files.manifest_name()
            )))
        }
    }
}

/// After each part is in place: the manifest and metrics files follow.
fn part_hook(shared: Arc<Mutex<Manifest>>, files: &Layout) -> crate::output::PartHook {
    let (out, run_start) = (files.clone(), Instant::now());
    Box::new(move |part| {
        let mut m = shared.lock().expect("manifest lock");
        m.parts.push(part);
        let mut snap = m.clone();
        snap.wall_s = m.wall_s + run_start.elapsed().as_secs_f64();
        snap.write(&out)?;
        Metrics::new(&snap, None).write(&out)
    })
}

/// Marks the manifest finished or interrupted, writes the metrics, logs
/// the summary; an interrupted run is an error that says how to resume, and
/// a run in which a device failed is a device error (exit code 4) that
/// says whether every record was still written.
fn finish(
    spec: &JobSpec,
    files: &Layout,
    mut man: Manifest,
    ran: &crate::engine::FleetSummary,
    load_s: f64,
) -> Result<()> {
    let sum = &ran.summary;
    man.wall_s += sum.wall_s;
    let complete = man.rows() >= man.expected_rows();
    man.state = match (sum.interrupted, ran.failed.is_empty() || complete) {
        (true, _) => JobState::Interrupted,
        (false, true) => JobState::Finished,
        // A device failed and records are left: `dead` until resubmitted.
        (false, false) => JobState::Running,
    };
    man.write(files)?;
    Metrics::new(&man, Some((sum, load_s))).write(files)?;
    log_summary(&man, sum, files);
    if sum.interrupted {
        // The CLI adds how to resume (the command as it was given).
        return Err(Error::Interrupted(format!(
            "stopped by a signal: {} of {} records of {} are in {}",
            man.rows(),
            man.total_records,
            spec.job_file.display(),
            files.describe(),
        )));
    }
    match ran.device_error(complete) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn log_summary(m: &Manifest, s: &JobSummary, files: &Layout) {
    tracing::info!(
        records = m.rows(),
        of = m.total_records,
        ok = m.sum(|p| p.ok),
        errors = m.sum(|p| p.errors),
        prompt_tokens = m.sum(|p| p.prompt_tokens),
        completion_tokens = m.sum(|p| p.completion_tokens),
        this_run_records = s.records,
        prefix_hit_tokens = s.prefix_hit_tokens,
        preemptions = s.preemptions,
        wall_s = format!("{:.2}", s.wall_s),
        output_tok_s = format!("{:.1}", s.completion_tokens as f64 / s.wall_s.max(1e-9)),
        "job {}, output in {}",
        m.state.as_str(),
        files.describe()
    );
}
