//! `runner submit` and `runner validate`.

use crate::config::JobSpec;
use crate::engine::Engine;
use crate::model::HubSettings;
use crate::output::ParquetSink;
use crate::Error;

/// Runs a job end to end.
pub fn submit(spec: &JobSpec, hub: &HubSettings) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let mut input = crate::input::open(&spec.input, &spec.generation)?;
    let (engine, meta) = Engine::load(spec, hub)?;
    tracing::info!(
        model = %spec.model.id,
        quant = %engine.model().quant().map_or("none".into(), |q| q.short_name()),
        load_s = t0.elapsed().as_secs_f64(),
        job_id = %meta.job_id,
        "model loaded"
    );
    let mut sink = ParquetSink::create(
        &spec.output.path,
        meta,
        spec.output.include_token_ids,
        spec.output.flush_every,
    )?;
    let sum = engine.run(&mut input, &spec.generation.system_prompt, &mut sink)?;
    let tok_s = sum.completion_tokens as f64 / sum.wall_s.max(1e-9);
    tracing::info!(
        records = sum.records,
        ok = sum.ok,
        errors = sum.errors,
        prompt_tokens = sum.prompt_tokens,
        completion_tokens = sum.completion_tokens,
        steps = sum.steps,
        prefix_hit_tokens = sum.prefix_hit_tokens,
        preemptions = sum.preemptions,
        wall_s = format!("{:.2}", sum.wall_s),
        output_tok_s = format!("{tok_s:.1}"),
        "job finished, output in {}",
        spec.output.path.display()
    );
    Ok(())
}

/// Resolves and checks everything cheap: model metadata (when local or
/// cached), input file and columns, output directory; prints the job.
pub fn validate(spec: &JobSpec, hub: &HubSettings) -> anyhow::Result<()> {
    if let Some(dir) = &spec.model.local_dir {
        let (cfg, quant) = crate::model::read_meta(dir)?;
        crate::model::Checkpoint::open(dir)?;
        tracing::info!(
            layers = cfg.num_hidden_layers,
            hidden = cfg.hidden_size,
            quant = %quant.map_or("none".into(), |q| q.short_name()),
            "model directory ok"
        );
    } else {
        tracing::info!(
            offline = hub.offline,
            "model {} revision {} comes from the hub cache (not checked by validate)",
            spec.model.id,
            spec.model.revision
        );
    }
    let mut input = crate::input::open(&spec.input, &spec.generation)?;
    if let Some(first) = input.next() {
        first?;
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
