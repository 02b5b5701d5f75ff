//! `runner bench`: the synthetic workloads W1-W4 on random weights of the
//! job's shapes (`load_format = "dummy"`, `ignore_eos`), and on CUDA the
//! kernel benches (GPTQ products against cuBLAS f16, decode attention
//! against the copy bandwidth), each against ceilings measured in the same
//! process.

use crate::config::{GenerationParams, JobSpec};
use crate::engine::{Engine, Fleet, JobSummary};
use crate::input::InputRecord;
use crate::model::{Mistral, QuantConfig};
use crate::output::ParquetSink;
use crate::prompt::Prompter;
use crate::{Error, Result};
use serde::Serialize;
use std::path::Path;

/// One synthetic workload.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Workload {
    /// W1..W4.
    pub name: &'static str,
    /// Prompts.
    pub prompts: usize,
    /// Tokens shared by every prompt (W4).
    pub shared_prefix: usize,
    /// Tokens of each prompt beside the shared prefix.
    pub own: usize,
    /// Generated tokens per prompt.
    pub out: usize,
}

/// The four workloads.
pub const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "W1",
        prompts: 2048,
        shared_prefix: 0,
        own: 128,
        out: 128,
    },
    Workload {
        name: "W2",
        prompts: 512,
        shared_prefix: 0,
        own: 128,
        out: 2048,
    },
    Workload {
        name: "W3",
        prompts: 1024,
        shared_prefix: 0,
        own: 2048,
        out: 128,
    },
    Workload {
        name: "W4",
        prompts: 2000,
        shared_prefix: 1024,
        own: 64,
        out: 16,
    },
];

/// Result of one workload.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    /// The workload (after scaling).
    pub workload: Workload,
    /// Generated tokens per second.
    pub output_tok_s: f64,
    /// Prompt + generated tokens per second.
    pub total_tok_s: f64,
    /// Most device memory in use (GiB; `None` on the CPU).
    pub peak_gpu_gib: Option<f64>,
    /// Achieved linear-layer FLOP rate over the measured f16 matmul rate.
    pub compute_floor_fraction: f64,
    /// The engine's summary.
    #[serde(skip)]
    pub summary: JobSummary,
    /// Device time per kernel class and step kind (`--breakdown`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breakdown: Option<crate::backend::timeline::Breakdown>,
    /// Wall seconds.
    pub wall_s: f64,
    /// Prefix-cache hit tokens.
    pub prefix_hit_tokens: usize,
    /// Prompt positions run (a record's `generation.n` samples share one
    /// prefill).
    pub prefill_tokens: usize,
    /// Rows written (records x samples).
    pub rows: usize,
}

/// Prompt token ids of a workload: random ids in [100, 32000), W4's
/// shared prefix identical across prompts.
pub fn prompts(w: &Workload, seed: u64) -> Vec<Vec<u32>> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        100 + (s % 31_900) as u32
    };
    let prefix: Vec<u32> = (0..w.shared_prefix).map(|_| next()).collect();
    (0..w.prompts)
        .map(|_| {
            let mut p = prefix.clone();
            p.extend((0..w.own).map(|_| next()));
            p
        })
        .collect()
}

/// Loads the dummy model of `spec` (config from `model.id`'s directory,
/// tokenizer from `tokenizer_dir`) into an engine.
pub fn engine(spec: &JobSpec, tokenizer_dir: &Path) -> Result<Engine> {
    let dir = spec.model.local_dir.as_ref().ok_or_else(|| {
        Error::Config(
            "runner bench needs model.id to be a local directory with a config.json".into(),
        )
    })?;
    let (cfg, quant) = crate::model::read_meta(dir)?;
    let quant = match &spec.model.dummy_quant {
        Some(name) => QuantConfig::from_short_name(name)?,
        None => quant,
    };
    let opts = crate::model::LoadOptions {
        dtype: spec.model.dtype.candle(),
        device: crate::engine::candle_device(spec.engine.device, spec.model.dtype)?,
        gptq_mode: spec.engine.gptq_kernel,
        kv_fp8: spec.engine.kv_cache_dtype == crate::config::KvCacheDtype::Fp8,
        prefill_attention: spec.engine.prefill_attention,
    };
    let used = |dev: &candle_core::Device| {
        dev.is_cuda()
            .then(|| crate::cuda::memory_usage(dev).ok())
            .flatten()
            .map(|u| u.0)
    };
    let before = used(&opts.device);
    let model = Mistral::dummy(&cfg, quant.as_ref(), &opts, 0x5eed)?;
    if let (Some(a), Some(b)) = (before, used(&opts.device)) {
        tracing::info!(
            gptq_kernel = ?spec.engine.gptq_kernel,
            "model weights on the device: {:.2} GB",
            b.saturating_sub(a) as f64 / 1e9
        );
    }
    let prompter = Prompter::load(tokenizer_dir, &cfg.eos_token_ids)?;
    Ok(Engine::assemble(model, prompter, spec)?.0)
}

/// One dummy-weight engine per device of `engine.devices` (see
/// [`crate::engine::job_devices`]), built side by side; `breakdown` times
/// their steps' kernel classes.
pub fn fleet(spec: &JobSpec, tokenizer_dir: &Path, breakdown: bool) -> Result<Fleet> {
    let devices = crate::engine::job_devices(&spec.engine)?;
    let engines = Fleet::on_each(spec, &devices, |one| {
        let mut e = engine(one, tokenizer_dir)?;
        e.set_breakdown(breakdown);
        Ok(e)
    })?;
    Ok(Fleet::from_engines(engines))
}

/// Runs one workload through the fleet's engines (the job path: records
/// handed out on demand, one sink), output rows into a scratch directory.
/// The compute floor is the fleet's: `matmul_tflops` (one GPU's) times the
/// devices.
pub fn run_workload(
    fleet: &mut Fleet,
    spec: &JobSpec,
    w: &Workload,
    matmul_tflops: f64,
) -> Result<WorkloadResult> {
    // The job's sampler settings (greedy unless `--set generation...`
    // says otherwise), a fixed length.
    let params = GenerationParams {
        max_new_tokens: w.out,
        ignore_eos: true,
        ..spec.generation.clone()
    };
    let mut items = prompts(w, 17).into_iter().enumerate().map(|(i, ids)| {
        Ok(InputRecord::with_token_ids(
            i as u64,
            format!("{}-{i}", w.name),
            params.clone(),
            ids,
        ))
    });
    let tmp = std::env::temp_dir().join(format!("runner-bench-{}-{}", w.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let meta = crate::output::JobMeta {
        job_id: format!("bench-{}", w.name),
        model_id: spec.model.id.clone(),
        revision: spec.model.revision.clone(),
        quant_bits: None,
        quant_group_size: None,
        quant_act_order: None,
        metrics: vec![],
        loglikelihood: false,
        passthrough: None,
        logprobs: spec.output.logprobs,
        prompt_logprobs: spec.output.prompt_logprobs,
        constrained: spec.generation.constraint.is_some(),
    };
    let settings = crate::output::SinkSettings {
        include_token_ids: false,
        flush_every: 1 << 20,
        flush_after: std::time::Duration::MAX,
    };
    let mut sink = ParquetSink::create(&tmp, meta, settings)?;
    let sum = fleet.run(&mut items, "", &params, &mut sink)?.summary;
    let _ = std::fs::remove_dir_all(&tmp);
    let gpus = fleet.devices().len() as f64;
    let engine = fleet.engines().next().expect("a fleet has an engine");
    let total = (sum.prompt_tokens + sum.completion_tokens) as f64;
    let wall = sum.wall_s.max(1e-9);
    // Useful work only: tokens served from the prefix cache and preemption
    // recomputes are not counted (forward_tokens says what ran).
    let flops = engine.model().config().flops_per_token();
    let achieved = total.min(sum.forward_tokens as f64) * flops / wall;
    Ok(WorkloadResult {
        workload: *w,
        output_tok_s: sum.completion_tokens as f64 / wall,
        total_tok_s: total / wall,
        peak_gpu_gib: sum
            .peak_device_bytes
            .map(|b| b as f64 / (1u64 << 30) as f64),
        compute_floor_fraction: if matmul_tflops > 0.0 {
            achieved / (gpus * matmul_tflops * 1e12)
        } else {
            0.0
        },
        wall_s: sum.wall_s,
        prefix_hit_tokens: sum.prefix_hit_tokens,
        prefill_tokens: sum.prefill_tokens,
        rows: sum.records,
        breakdown: sum.breakdown.clone(),
        summary: sum,
    })
}

#[cfg(feature = "cuda")]
pub mod attention;
#[cfg(feature = "cuda")]
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod lt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w4_prompts_share_the_prefix_and_have_the_stated_lengths() {
        let w = WORKLOADS[3];
        let p = prompts(&w, 1);
        assert_eq!(p.len(), 2000);
        assert!(p.iter().all(|x| x.len() == 1024 + 64));
        assert!(p.iter().all(|x| x[..1024] == p[0][..1024]));
        assert_ne!(p[0][1024..], p[1][1024..]);
        let w1 = prompts(&WORKLOADS[0], 1);
        assert!(w1
            .iter()
            .all(|x| x.len() == 128 && x.iter().all(|&t| (100..32_000).contains(&t))));
    }
}
