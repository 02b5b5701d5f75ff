//! Sweep jobs: the same prompts through every model variant, one after
//! another on one device (weights freed between them), each a resumable
//! sub-job in `OUTPUT/variant=<name>/`, then the report.

use crate::config::{JobSpec, SweepSpec};
use crate::model::HubSettings;
use crate::report::{self, SweepInfo, SWEEP};

/// Runs every variant (finished ones are skipped without loading weights),
/// then writes `report.md` / `report.parquet`.
pub fn run(spec: &JobSpec, sw: &SweepSpec, hub: &HubSettings, restart: bool) -> anyhow::Result<()> {
    let out = spec.output.path.clone();
    std::fs::create_dir_all(&out).map_err(|e| crate::Error::io(&out, e))?;
    let info = SweepInfo {
        variants: sw.variants.iter().map(|v| v.name.clone()).collect(),
        baseline: sw.baseline.clone(),
    };
    crate::output::manifest::write_atomic(&out, SWEEP, &serde_json::to_vec_pretty(&info)?)?;
    let variant_spec = |i: usize, device: Option<crate::config::Device>| {
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
        visible_gpus()?
    } else {
        sw.devices.clone()
    };
    if devices.len() <= 1 {
        for i in 0..sw.variants.len() {
            super::submit::run_one(&variant_spec(i, devices.first().copied()), hub, restart)?;
        }
    } else {
        // One worker per device takes the next variant until none is left.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<anyhow::Result<()>> = std::thread::scope(|s| {
            let workers: Vec<_> = devices
                .iter()
                .map(|&d| {
                    let (next, variant_spec) = (&next, &variant_spec);
                    s.spawn(move || -> anyhow::Result<()> {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            if i >= sw.variants.len() {
                                return Ok(());
                            }
                            super::submit::run_one(&variant_spec(i, Some(d)), hub, restart)?;
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a sweep worker panicked")))
                })
                .collect()
        });
        for r in results {
            r?;
        }
    }
    write_report(&out)
}

/// Every visible CUDA device (`sweep.devices = ["auto"]`).
fn visible_gpus() -> anyhow::Result<Vec<crate::config::Device>> {
    #[cfg(feature = "cuda")]
    {
        let n = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count().map_err(
            |e| anyhow::anyhow!("sweep.devices = auto: cannot count CUDA devices ({e})"),
        )?;
        tracing::info!(gpus = n, "sweep variants run concurrently, one per GPU");
        Ok((0..n as usize).map(crate::config::Device::Cuda).collect())
    }
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("sweep.devices = auto needs a binary built with the `cuda` feature")
}

/// Rebuilds the report of a sweep output from its data (`runner report`).
pub fn write_report(out: &std::path::Path) -> anyhow::Result<()> {
    let (info, rows) = report::build(out)?;
    report::write(out, &info, &rows)?;
    tracing::info!(
        variants = rows.len(),
        "report written to {}",
        out.join("report.md").display()
    );
    Ok(())
}
