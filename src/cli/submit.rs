//! `runner submit`, `runner validate` and `runner status`.
//!
//! Submit is resumable: the output directory holds Parquet parts written
//! atomically, a `manifest.json` (job hash, parts, counts) rewritten
//! atomically after each part, `metrics.json`, and a `.lock`. A second
//! submit of the same job skips the ids already written; a changed job is
//! refused unless `--restart`.

use crate::config::JobSpec;
use crate::engine::{Engine, JobSummary};
use crate::model::HubSettings;
use crate::output::manifest::{self, LockInfo, MANIFEST, METRICS};
use crate::output::{Manifest, OutputLock, ParquetSink};
use crate::Error;
use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Exit code of a run stopped by a signal.
pub const INTERRUPTED_EXIT: i32 = 130;

/// What identifies a job for resume: model, generation, input content and
/// output schema (not engine settings, which do not change results' meaning).
pub fn fingerprint(spec: &JobSpec) -> crate::Result<BTreeMap<String, String>> {
    let mut fp = BTreeMap::new();
    let m = &spec.model;
    fp.insert("model.id".into(), m.id.clone());
    fp.insert("model.revision".into(), m.revision.clone());
    fp.insert("model.dtype".into(), format!("{:?}", m.dtype));
    fp.insert("model.load_format".into(), format!("{:?}", m.load_format));
    fp.insert("model.dummy_quant".into(), format!("{:?}", m.dummy_quant));
    let g = serde_json::to_value(&spec.generation).expect("generation serializes");
    if let serde_json::Value::Object(o) = g {
        for (k, v) in o {
            fp.insert(format!("generation.{k}"), v.to_string());
        }
    }
    let i = &spec.input;
    fp.insert("input.path".into(), i.path.display().to_string());
    fp.insert("input.format".into(), format!("{:?}", i.format));
    fp.insert(
        "input.columns".into(),
        format!(
            "id={} prompt={} messages={} system={}",
            i.id_column, i.prompt_column, i.messages_column, i.system_column
        ),
    );
    fp.insert("input.sha256".into(), manifest::file_hash(&i.path)?);
    fp.insert(
        "output.include_token_ids".into(),
        spec.output.include_token_ids.to_string(),
    );
    Ok(fp)
}

/// Reads every record id once: duplicate ids are a job-level error, found
/// before any model work. Returns the number of records.
fn prescan(spec: &JobSpec) -> crate::Result<usize> {
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut n = 0;
    for rec in crate::input::open(&spec.input, &spec.generation)? {
        let rec = rec?;
        if let Some(first) = seen.insert(rec.id.clone(), rec.row) {
            return Err(Error::Input(format!(
                "input {} has duplicate record id `{}` (rows {first} and {}); ids must be unique for resume to skip written records",
                spec.input.path.display(),
                rec.id,
                rec.row
            )));
        }
        n += 1;
    }
    Ok(n)
}

/// Creates the output directory and checks it takes files.
fn check_writable(dir: &Path) -> crate::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::Output(format!(
            "output.path {} cannot be created: {e}",
            dir.display()
        ))
    })?;
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"ok").map_err(|e| {
        Error::Output(format!(
            "output.path {} is not writable: {e}",
            dir.display()
        ))
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Removes a previous run's parts, manifest and metrics (`--restart`).
fn clear_output(dir: &Path) -> crate::Result<usize> {
    let parts = crate::output::existing_parts(dir)?;
    for p in &parts {
        std::fs::remove_file(p).map_err(|e| Error::io(p, e))?;
    }
    for f in [MANIFEST, METRICS] {
        let p = dir.join(f);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(parts.len())
}

fn next_part_index(dir: &Path) -> crate::Result<usize> {
    Ok(crate::output::existing_parts(dir)?
        .iter()
        .filter_map(|p| {
            let n = p.file_name()?.to_str()?;
            n.strip_prefix("part-")?.get(..5)?.parse::<usize>().ok()
        })
        .max()
        .map_or(0, |m| m + 1))
}

/// Runs a job, or each variant of a sweep job, end to end, resuming into an
/// output that holds part of it.
pub fn submit(spec: &JobSpec, hub: &HubSettings, restart: bool) -> anyhow::Result<()> {
    match &spec.sweep {
        None => run_one(spec, hub, restart),
        Some(sw) => super::sweep::run(spec, sw, hub, restart),
    }
}

/// Runs one model's job (a plain job, or one sweep variant).
pub fn run_one(spec: &JobSpec, hub: &HubSettings, restart: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let out = spec.output.path.clone();
    // Job-level checks first, before any model work.
    check_writable(&out)?;
    let _lock = OutputLock::acquire(&out)?;
    // The duplicate-id prescan and the input's sha256 (in the fingerprint)
    // each read the whole input: side by side.
    let (total, fp) = std::thread::scope(|s| {
        let fp = s.spawn(|| fingerprint(spec));
        let total = prescan(spec);
        (
            total,
            fp.join().expect("the fingerprint thread does not panic"),
        )
    });
    let (total, fp) = (total?, fp?);
    let hash = manifest::job_hash(&fp);
    let old = Manifest::read(&out)?;
    let on_disk = crate::output::existing_parts(&out)?;
    match &old {
        Some(m) if m.job_hash != hash && !restart => {
            return Err(Error::Output(format!(
                "output {} holds {} rows of a different job; changed: {}. Resume needs the same job; pass --restart to discard those rows and start over",
                out.display(),
                m.rows(),
                m.changes(&fp).join("; ")
            ))
            .into())
        }
        None if !on_disk.is_empty() && !restart => {
            return Err(Error::Output(format!(
                "output {} holds {} part file(s) but no {MANIFEST}: not written by a resumable job; pass --restart to discard them or choose another output.path",
                out.display(),
                on_disk.len()
            ))
            .into())
        }
        _ => {}
    }
    if restart {
        let n = clear_output(&out)?;
        if n > 0 {
            tracing::warn!(parts = n, "--restart: discarded the previous output");
        }
    }
    let stale = manifest::remove_stale_tmp(&out)?;
    if stale > 0 {
        tracing::info!(
            files = stale,
            "removed temporary files of an interrupted write"
        );
    }
    let (done, parts) = manifest::scan_parts(&out)?;
    let prev_wall = match &old {
        Some(m) if !restart => m.wall_s,
        _ => 0.0,
    };
    let mut man = Manifest {
        job_hash: hash,
        fingerprint: fp,
        state: "running".into(),
        total_records: total,
        parts,
        pid: std::process::id(),
        host: manifest::host_name(),
        job_file: spec.job_file.display().to_string(),
        updated_unix: 0,
        wall_s: prev_wall,
    };
    if !restart && !done.is_empty() && done.len() >= total {
        man.state = "finished".into();
        man.write(&out)?;
        tracing::info!(records = total, output = %out.display(), "already complete: nothing to run");
        return Ok(());
    }
    man.write(&out)?;
    if !done.is_empty() {
        tracing::info!(
            written = done.len(),
            remaining = total.saturating_sub(done.len()),
            "resuming: records already in the output are skipped"
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal exits at once; parts and manifest are always
        // consistent on disk (atomic renames).
        signal_hook::flag::register_conditional_shutdown(sig, INTERRUPTED_EXIT, Arc::clone(&stop))?;
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }

    let load_start = Instant::now();
    let (mut engine, meta) = Engine::load(spec, hub)?;
    let load_s = load_start.elapsed().as_secs_f64();
    engine.set_stop_flag(Arc::clone(&stop));
    tracing::info!(
        model = %spec.model.id,
        quant = %engine.model().quant().map_or("none".into(), |q| q.short_name()),
        load_s = t0.elapsed().as_secs_f64(),
        job_id = %meta.job_id,
        "model loaded"
    );
    let mut sink = ParquetSink::resume(
        &out,
        meta,
        spec.output.include_token_ids,
        spec.output.flush_every,
        next_part_index(&out)?,
    )?;
    let remaining = total.saturating_sub(done.len());
    let progress = Progress::new(remaining as u64);
    let p2 = progress.clone();
    sink.on_row(Box::new(move |row| p2.row(row.completion_tokens as u64)));
    let shared = Arc::new(Mutex::new(man));
    let (s2, out2, run_start) = (Arc::clone(&shared), out.clone(), Instant::now());
    sink.on_part(Box::new(move |part| {
        let mut m = s2.lock().expect("manifest lock");
        m.parts.push(part);
        let wall = m.wall_s + run_start.elapsed().as_secs_f64();
        let mut snap = m.clone();
        snap.wall_s = wall;
        snap.write(&out2)?;
        write_metrics(&out2, &snap, None, load_s)
    }));
    let mut input = crate::input::open(&spec.input, &spec.generation)?;
    let mut todo = std::iter::from_fn(move || loop {
        match input.next()? {
            Ok(r) if done.contains(&r.id) => continue,
            other => return Some(other),
        }
    });
    let sum = engine.run(&mut todo, &spec.generation.system_prompt, &mut sink)?;
    progress.finish();
    let mut man = shared.lock().expect("manifest lock").clone();
    man.wall_s += sum.wall_s;
    man.state = if sum.interrupted {
        "interrupted"
    } else {
        "finished"
    }
    .into();
    man.write(&out)?;
    write_metrics(&out, &man, Some(&sum), load_s)?;
    log_summary(&man, &sum, &out);
    if sum.interrupted {
        return Err(Error::Interrupted(format!(
            "stopped by a signal: {} of {} records are in {}; resume with `runner submit {}` (the same job continues where it stopped)",
            man.rows(),
            man.total_records,
            out.display(),
            spec.job_file.display()
        ))
        .into());
    }
    Ok(())
}

fn write_metrics(
    dir: &Path,
    m: &Manifest,
    run: Option<&JobSummary>,
    load_s: f64,
) -> crate::Result<()> {
    let completion = m.sum(|p| p.completion_tokens);
    let mut v = serde_json::json!({
        "state": m.state,
        "total_records": m.total_records,
        "records_written": m.rows(),
        "ok": m.sum(|p| p.ok),
        "errors": m.sum(|p| p.errors),
        "prompt_tokens": m.sum(|p| p.prompt_tokens),
        "completion_tokens": completion,
        "parts": m.parts.len(),
        "wall_s": m.wall_s,
        "output_tok_s": completion as f64 / m.wall_s.max(1e-9),
        "updated_unix": m.updated_unix,
    });
    if let Some(s) = run {
        v["last_run"] = serde_json::json!({
            "records": s.records, "ok": s.ok, "errors": s.errors,
            "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "steps": s.steps, "wall_s": s.wall_s, "prefix_hit_tokens": s.prefix_hit_tokens,
            "preemptions": s.preemptions, "interrupted": s.interrupted,
            "peak_device_bytes": s.peak_device_bytes, "load_s": load_s,
        });
    }
    manifest::write_atomic(dir, METRICS, &serde_json::to_vec_pretty(&v).expect("json"))
}

fn log_summary(m: &Manifest, s: &JobSummary, out: &Path) {
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
        m.state,
        out.display()
    );
}

/// A progress bar on a terminal, else a log line every 10 seconds.
#[derive(Clone)]
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    state: Arc<Mutex<(u64, u64, Instant, Instant)>>, // rows, tokens, start, last log
    total: u64,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} records  {msg}  eta {eta}",
                )
                .expect("valid template"),
            );
            b
        });
        let now = Instant::now();
        Self {
            bar,
            state: Arc::new(Mutex::new((0, 0, now, now))),
            total,
        }
    }

    fn row(&self, tokens: u64) {
        let mut s = self.state.lock().expect("progress lock");
        s.0 += 1;
        s.1 += tokens;
        let el = s.2.elapsed().as_secs_f64().max(1e-9);
        let tok_s = s.1 as f64 / el;
        match &self.bar {
            Some(b) => {
                b.inc(1);
                b.set_message(format!("{tok_s:.0} tok/s"));
            }
            None if s.3.elapsed().as_secs() >= 10 => {
                s.3 = Instant::now();
                let eta = (self.total.saturating_sub(s.0)) as f64 * el / s.0 as f64;
                tracing::info!(
                    records = s.0,
                    of = self.total,
                    tok_s = format!("{tok_s:.0}"),
                    eta_s = format!("{eta:.0}"),
                    "progress"
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// `runner status OUTPUT_DIR`: the manifest's figures and whether the job
/// is running, finished, interrupted or dead.
pub fn status(dir: &Path) -> anyhow::Result<()> {
    let m = Manifest::read(dir)?.ok_or_else(|| {
        Error::Output(format!(
            "{} has no {MANIFEST}: not the output of a runner job",
            dir.display()
        ))
    })?;
    let lock: Option<LockInfo> = OutputLock::read(dir);
    let state = match (&lock, m.state.as_str()) {
        (Some(l), _) if !l.is_stale() => format!("running (pid {} on {})", l.pid, l.host),
        (Some(l), _) => format!(
            "dead (pid {} on {} is gone; resubmit to resume)",
            l.pid, l.host
        ),
        (None, "running") => "dead (stopped without finishing; resubmit to resume)".into(),
        (None, s) => s.to_string(),
    };
    let rows = m.rows();
    let comp = m.sum(|p| p.completion_tokens);
    println!("output      {}", dir.display());
    println!("job         {}", m.job_file);
    println!("state       {state}");
    println!(
        "records     {rows} of {} written ({:.1}%), {} left",
        m.total_records,
        100.0 * rows as f64 / m.total_records.max(1) as f64,
        m.total_records.saturating_sub(rows)
    );
    println!("ok/errors   {} / {}", m.sum(|p| p.ok), m.sum(|p| p.errors));
    println!(
        "tokens      {} prompt, {comp} completion",
        m.sum(|p| p.prompt_tokens)
    );
    println!(
        "throughput  {:.1} completion tok/s over {:.1} s of generation",
        comp as f64 / m.wall_s.max(1e-9),
        m.wall_s
    );
    println!(
        "parts       {}, updated {} s ago",
        m.parts.len(),
        manifest::now_unix().saturating_sub(m.updated_unix)
    );
    Ok(())
}

/// Resolves and checks everything cheap: model metadata (when local or
/// cached), input file and columns, output directory; prints the job.
pub fn validate(spec: &JobSpec, hub: &HubSettings) -> anyhow::Result<()> {
    if let Some(dir) = &spec.model.local_dir {
        let (cfg, quant) = crate::model::read_meta(dir)?;
        let ck = crate::model::Checkpoint::open(dir)?;
        crate::model::check_checkpoint(&ck, &cfg, quant.as_ref())?;
        tracing::info!(
            layers = cfg.num_hidden_layers,
            hidden = cfg.hidden_size,
            quant = %quant.map_or("none".into(), |q| q.short_name()),
            "model directory ok (every tensor's shape and dtype checked)"
        );
    } else {
        tracing::info!(
            offline = hub.offline,
            "model {} revision {} comes from the hub cache (not checked by validate)",
            spec.model.id,
            spec.model.revision
        );
    }
    let records = prescan(spec)?;
    tracing::info!(records, "input ok (ids unique)");
    let out = &spec.output.path;
    if out.exists() && !out.is_dir() {
        return Err(Error::Output(format!(
            "output.path {} exists and is not a directory",
            out.display()
        ))
        .into());
    }
    println!("{}", serde_json::to_string_pretty(spec)?);
    Ok(())
}
