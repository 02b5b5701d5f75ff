//! Sweep jobs: the same prompts through every model variant, one after
//! another on one device (weights freed between them), each a resumable
//! sub-job in `OUTPUT/variant=<name>/`, then the report.

use super::Progress;
use crate::config::{Device, JobSpec, SweepSpec};
use crate::model::HubSettings;
use crate::report::{self, SweepInfo, SWEEP};
use crate::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Runs every variant (finished ones are skipped without loading weights),
/// then writes `report.md` / `report.parquet`.
pub fn run(
    spec: &JobSpec,
    sw: &SweepSpec,
    hub: &HubSettings,
    restart: bool,
    progress: Arc<dyn Progress>,
) -> Result<()> {
    let out = spec.output.path.clone();
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let info = SweepInfo {
        variants: sw.variants.iter().map(|v| v.name.clone()).collect(),
        baseline: sw.baseline.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&info).expect("sweep info serializes");
    crate::output::write_atomic(&out, SWEEP, &bytes)?;
    let variant_spec = |i: usize, device: Option<Device>| {
        let v = &sw.variants[i];
        let mut vs = spec.clone();
        vs.sweep = None;
        vs.model.id = v.id.clone();
        vs.model.revision = v.revision.clone();
        vs.model.local_dir = v.local_dir.clone();
        vs.output.path = report::variant_dir(&out, &v.name);
        // Agreement with the baseline compares greedy tokens.
        vs.output.include_token_ids = true;
        if let Some(d) = device {
            vs.engine.device = d;
        }
        tracing::info!(variant = %v.name, n = i + 1, of = sw.variants.len(), device = ?vs.engine.device, "sweep variant");
        vs
    };
    let devices = if sw.all_gpus {
        crate::engine::visible_gpus()?
    } else {
        sw.devices.clone()
    };
    if devices.len() <= 1 {
        for i in 0..sw.variants.len() {
            let vs = variant_spec(i, devices.first().copied());
            super::run_one(&vs, hub, restart, Arc::clone(&progress))?;
        }
    } else {
        // One worker per device takes the next variant until none is left.
        let next = AtomicUsize::new(0);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let workers: Vec<_> = devices
                .iter()
                .map(|&d| {
                    let (next, variant_spec) = (&next, &variant_spec);
                    let progress = Arc::clone(&progress);
                    s.spawn(move || -> Result<()> {
                        loop {
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            if i >= sw.variants.len() {
                                return Ok(());
                            }
                            let vs = variant_spec(i, Some(d));
                            super::run_one(&vs, hub, restart, Arc::clone(&progress))?;
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(Error::Engine("a sweep worker panicked".into())))
                })
                .collect()
        });
        for r in results {
            r?;
        }
    }
    write_report(&out)
}

/// Rebuilds the report of a sweep output from its data (`runner report`).
pub fn write_report(out: &std::path::Path) -> Result<()> {
    let (info, rows) = report::build(out)?;
    report::write(out, &info, &rows)?;
    tracing::info!(
        variants = rows.len(),
        "report written to {}",
        out.join(report::REPORT_DIR).join("report.md").display()
    );
    Ok(())
}
