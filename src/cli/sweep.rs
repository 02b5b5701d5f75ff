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
    for (i, v) in sw.variants.iter().enumerate() {
        let mut vs = spec.clone();
        vs.sweep = None;
        vs.model.id = v.id.clone();
        vs.model.revision = v.revision.clone();
        vs.model.local_dir = v.local_dir.clone();
        vs.output.path = report::variant_dir(&out, &v.name);
        // Agreement with the baseline compares greedy tokens.
        vs.output.include_token_ids = true;
        tracing::info!(variant = %v.name, n = i + 1, of = sw.variants.len(), "sweep variant");
        super::submit::run_one(&vs, hub, restart)?;
    }
    write_report(&out)
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
