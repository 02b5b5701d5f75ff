//! `runner submit`, `runner validate` and `runner status`: arguments in,
//! the library's job lifecycle (`crate::job`) called, results printed.

use crate::config::JobSpec;
use crate::job::{self, JobStatus};
use crate::model::HubSettings;
use crate::output::Layout;
use crate::Error;
use std::path::Path;
use std::sync::Arc;

/// Runs a job (or sweep) with a progress bar on a terminal, else a
/// progress log line every `progress_every`.
pub fn submit(
    spec: &JobSpec,
    hub: &HubSettings,
    restart: bool,
    progress_every: std::time::Duration,
) -> anyhow::Result<()> {
    let progress = Arc::new(super::progress::Progress::new(progress_every));
    Ok(job::submit(spec, hub, restart, progress)?)
}

/// An interrupted run's error, with the command that resumes it: this
/// process's own arguments, `--set` flags included, shell-quoted.
pub fn with_resume_hint(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<Error>() {
        Ok(Error::Interrupted(msg)) => {
            let args: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
            Error::Interrupted(format!(
                "{msg}; resume with `runner {}` (the same job continues where it stopped)",
                args.join(" ")
            ))
            .into()
        }
        Ok(other) => other.into(),
        Err(e) => e,
    }
}

/// A word as a POSIX shell reads it back.
fn shell_quote(a: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./=:,@%+".contains(c);
    if !a.is_empty() && a.chars().all(plain) {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// `runner status OUTPUT_DIR`: the manifest's figures and whether the job
/// is running, finished, interrupted or dead.
pub fn status(dir: &Path) -> anyhow::Result<()> {
    if let Some(info) = crate::report::SweepInfo::read(dir)? {
        return sweep_status(dir, &info);
    }
    if let Some(shards) = job::shards::overview(dir)? {
        return shards_status(dir, &shards);
    }
    let st = JobStatus::read(&Layout::plain(dir))?;
    let m = &st.manifest;
    let rows = m.rows();
    let comp = m.sum(|p| p.completion_tokens);
    println!("output      {}", dir.display());
    println!("job         {}", m.job_file);
    println!("state       {}", st.state_line());
    let total = m.expected_rows();
    let samples = match total == m.total_records {
        true => String::new(),
        false => format!(" (rows of {} records' samples)", m.total_records),
    };
    println!(
        "records     {rows} of {total} written ({:.1}%), {} left{samples}",
        100.0 * rows as f64 / total.max(1) as f64,
        total.saturating_sub(rows)
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
        "parts       {}, updated {} s ago, {}",
        m.parts.len(),
        st.updated_s_ago,
        match st.damaged.len() {
            0 => "every part read back".to_string(),
            n => format!("{n} damaged"),
        }
    );
    match st.damage_error(dir) {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// `runner status OUT` of a sharded job: one line per shard (done,
/// running, dead, interrupted or missing) and the totals of those started.
fn shards_status(dir: &Path, shards: &[job::shards::ShardState]) -> anyhow::Result<()> {
    let count = shards.len();
    let of = |w: &str| shards.iter().filter(|s| s.word() == w).count();
    println!("output      {}", dir.display());
    println!(
        "shards      {count}: {} done, {} running, {} dead, {} interrupted, {} missing",
        of("done"),
        of("running"),
        of("dead"),
        of("interrupted"),
        of("missing")
    );
    let (mut rows, mut total, mut damage) = (0, 0, None);
    for s in shards {
        let Some(st) = &s.status else {
            println!("shard {}: missing (never started)", s.shard);
            continue;
        };
        rows += st.manifest.rows();
        total += st.manifest.expected_rows();
        println!("shard {}: {}", s.shard, st.line());
        damage = damage.or(st.damage_error(dir));
    }
    let missing = of("missing");
    println!(
        "records     {rows} of {total} written{}",
        match missing {
            0 => String::new(),
            n => format!(" (not counting the {n} missing shard(s))"),
        }
    );
    match damage {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// `runner status SWEEP_DIR`: one line per variant.
fn sweep_status(dir: &Path, info: &crate::report::SweepInfo) -> anyhow::Result<()> {
    println!(
        "sweep       {} ({} variants)",
        dir.display(),
        info.variants.len()
    );
    let mut damage = None;
    for v in &info.variants {
        let vdir = crate::report::variant_dir(dir, v);
        if !vdir.join(job::MANIFEST).is_file() {
            println!("variant={v}: not started");
            continue;
        }
        let st = JobStatus::read(&Layout::plain(&vdir))?;
        println!("variant={v}: {}", st.line());
        damage = damage.or(st.damage_error(&vdir));
    }
    match damage {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Resolves and checks everything cheap: model metadata (when local or
/// cached), input file and columns, output directory; prints the job.
pub fn validate(spec: &JobSpec, hub: &HubSettings) -> anyhow::Result<()> {
    if let Some(dir) = &spec.model.local_dir {
        let (cfg, quant) = crate::model::read_meta(dir)?;
        let ck = crate::model::Checkpoint::open(dir)?;
        crate::model::check_checkpoint(&ck, &cfg, quant.as_ref())?;
        // The tokenizer and the chat template, as the job loads them.
        crate::prompt::Prompter::load(dir, &cfg.eos_token_ids)?;
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
    let total = crate::job::prescan(spec)?;
    tracing::info!(
        records = total.records,
        rows = total.rows,
        "input ok (ids unique)"
    );
    if let Some(s) = spec.shard {
        println!(
            "shard {s}: {} records, {} rows of the input",
            total.records, total.rows
        );
    }
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
