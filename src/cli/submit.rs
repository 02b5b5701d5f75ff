//! `runner submit`, `runner validate` and `runner status`: arguments in,
//! the library's job lifecycle (`crate::job`) called, results printed.

use crate::config::JobSpec;
use crate::job::{self, JobStatus};
use crate::model::HubSettings;
use crate::Error;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Runs a job (or sweep) with a progress bar on a terminal.
pub fn submit(spec: &JobSpec, hub: &HubSettings, restart: bool) -> anyhow::Result<()> {
    Ok(job::submit(
        spec,
        hub,
        restart,
        Arc::new(Progress::default()),
    )?)
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

/// A progress bar on a terminal, else a log line every 10 seconds.
#[derive(Default)]
struct Progress {
    bar: Mutex<Option<indicatif::ProgressBar>>,
    state: Mutex<Option<(u64, u64, Instant, Instant)>>, // rows, tokens, start, last log
    total: AtomicU64,
}

impl job::Progress for Progress {
    fn start(&self, total: u64) {
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
        *self.bar.lock().expect("progress lock") = bar;
        *self.state.lock().expect("progress lock") = Some((0, 0, now, now));
        self.total.store(total, Ordering::Relaxed);
    }

    fn row(&self, tokens: u64) {
        let mut guard = self.state.lock().expect("progress lock");
        let Some(s) = guard.as_mut() else { return };
        let total = self.total.load(Ordering::Relaxed);
        s.0 += 1;
        s.1 += tokens;
        let el = s.2.elapsed().as_secs_f64().max(1e-9);
        let tok_s = s.1 as f64 / el;
        match &*self.bar.lock().expect("progress lock") {
            Some(b) => {
                b.inc(1);
                b.set_message(format!("{tok_s:.0} tok/s"));
            }
            None if s.3.elapsed().as_secs() >= 10 => {
                s.3 = Instant::now();
                let eta = (total.saturating_sub(s.0)) as f64 * el / s.0 as f64;
                tracing::info!(
                    records = s.0,
                    of = total,
                    tok_s = format!("{tok_s:.0}"),
                    eta_s = format!("{eta:.0}"),
                    "progress"
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().expect("progress lock").take() {
            b.finish_and_clear();
        }
    }
}

/// `runner status OUTPUT_DIR`: the manifest's figures and whether the job
/// is running, finished, interrupted or dead.
pub fn status(dir: &Path) -> anyhow::Result<()> {
    let st = JobStatus::read(dir)?;
    let m = &st.manifest;
    let rows = m.rows();
    let comp = m.sum(|p| p.completion_tokens);
    println!("output      {}", dir.display());
    println!("job         {}", m.job_file);
    println!("state       {}", st.state_line());
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
        st.updated_s_ago
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
    let records = crate::job::prescan(spec)?;
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
