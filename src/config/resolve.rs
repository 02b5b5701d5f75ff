//! Raw configuration to the validated [`JobSpec`]: every value checked,
//! messages naming the key and what was expected.

use super::raw::RawDevices;
use super::raw::RawJob;
use super::spec::*;
use crate::{Error, Result};
use std::path::Path;

fn positive(field: &str, v: i64) -> Result<usize> {
    if v < 1 {
        return Err(Error::Config(format!(
            "{field} is {v}, expected at least 1"
        )));
    }
    Ok(v as usize)
}

/// Parses `auto`, `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "auto" => Ok(Device::Auto),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| {
                Error::Config(format!(
                    "engine.device is `{s}`, expected auto, cpu, cuda or cuda:N"
                ))
            }),
    }
}

impl RawJob {
    /// Validates every field and resolves paths and `auto` values.
    pub fn resolve(self, job_file: &Path) -> Result<JobSpec> {
        let dtype = self.model.dtype;
        if dtype == DType::Bf16 {
            // Refused before any model work: candle's CPU backend has no bf16
            // matmul and our CUDA kernels run f16.
            return Err(Error::Config(
                "model.dtype is bf16, which no backend runs: the CPU has no bf16 matmul and the CUDA kernels run f16; use f16 (GPU or CPU) or f32 (CPU)".into(),
            ));
        }
        let load_format = self.model.load_format;
        let id = self.model.id.original().display().to_string();
        let rel = self.model.id.relative();
        let local_dir = if rel.is_dir() {
            Some(rel)
        } else if id.starts_with('.') || id.starts_with('/') || id.matches('/').count() != 1 {
            return Err(Error::Config(format!(
                "model.id `{id}` is neither an existing directory ({}) nor a hub repo id like owner/name",
                rel.display()
            )));
        } else {
            None
        };
        let input_path = self.input.path.relative();
        let template = match (self.input.template.is_empty(), &self.input.template_file) {
            (true, None) => None,
            (false, None) => Some(self.input.template.clone()),
            (true, Some(f)) => {
                let p = f.relative();
                Some(std::fs::read_to_string(&p).map_err(|e| {
                    Error::Config(format!(
                        "input.template_file {} cannot be read: {e}",
                        p.display()
                    ))
                })?)
            }
            (false, Some(_)) => {
                return Err(Error::Config(
                    "input.template and input.template_file are both set; use one".into(),
                ))
            }
        };
        let format = match self.input.format {
            FormatChoice::Jsonl => InputFormat::Jsonl,
            FormatChoice::Parquet => InputFormat::Parquet,
            FormatChoice::OpenaiBatch => InputFormat::OpenaiBatch,
            FormatChoice::Auto => match input_path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                // Any case: `DATA.JSONL` is JSONL.
                Some("jsonl") | Some("json") | Some("ndjson") => InputFormat::Jsonl,
                Some("parquet") | Some("pq") => InputFormat::Parquet,
                _ => {
                    return Err(Error::Config(format!(
                        "input.format is auto but {} has no .jsonl or .parquet extension; set input.format",
                        input_path.display()
                    )))
                }
            },
        };
        let g = self.generation;
        for (key, v) in [
            ("top_k", g.top_k),
            ("min_new_tokens", g.min_new_tokens),
            ("n", g.n),
        ] {
            if v < 0 {
                return Err(Error::Config(format!(
                    "generation.{key} is {v}, expected >= 0"
                )));
            }
        }
        let generation = GenerationParams {
            max_new_tokens: positive("generation.max_new_tokens", g.max_new_tokens)?,
            temperature: g.temperature,
            top_p: g.top_p,
            top_k: g.top_k as usize,
            repetition_penalty: g.repetition_penalty,
            seed: g.seed,
            stop: g.stop,
            system_prompt: g.system_prompt,
            ignore_eos: g.ignore_eos,
            min_new_tokens: g.min_new_tokens as usize,
            stop_token_ids: g.stop_token_ids,
            n: g.n as usize,
            constraint: constraint(
                &g.json_schema,
                g.json_schema_file.as_ref(),
                &g.regex,
                &g.grammar,
            )?,
            logprobs: None,
        };
        generation.validate("generation.").map_err(Error::Config)?;
        if generation.stop.iter().any(|s| s.is_empty()) {
            return Err(Error::Config(
                "generation.stop holds an empty string".into(),
            ));
        }
        let e = self.engine;
        if e.max_prompt_tokens < 0 {
            return Err(Error::Config(format!(
                "engine.max_prompt_tokens is {}, expected >= 0",
                e.max_prompt_tokens
            )));
        }
        let scoring = resolve_scoring(self.scoring)?;
        if scoring.loglikelihood && generation.n > 1 {
            return Err(Error::Config(format!(
                "generation.n is {} but scoring.mode = \"loglikelihood\" scores one continuation per record; set n = 1",
                generation.n
            )));
        }
        let model_for_sweep = ModelSpec {
            id: id.clone(),
            local_dir: local_dir.clone(),
            revision: self.model.revision.clone(),
            dtype,
            load_format,
            dummy_quant: self.model.dummy_quant.clone(),
        };
        let sweep = self
            .sweep
            .map(|sw| resolve_sweep(sw, &model_for_sweep))
            .transpose()?;
        if sweep.is_some() && !matches!(&e.devices, RawDevices::Many(v) if v.is_empty()) {
            return Err(Error::Config(
                "engine.devices is set in a sweep job: use sweep.devices (one variant per device) instead".into(),
            ));
        }
        Ok(JobSpec {
            job_file: job_file.to_path_buf(),
            model: ModelSpec {
                id,
                local_dir,
                revision: self.model.revision,
                dtype,
                load_format,
                dummy_quant: self.model.dummy_quant,
            },
            input: InputSpec {
                path: input_path,
                format,
                id_column: self.input.id_column,
                prompt_column: self.input.prompt_column,
                messages_column: self.input.messages_column,
                system_column: self.input.system_column,
                reference_column: scoring.reference_column.clone(),
                continuation_column: scoring.continuation_column.clone(),
                template,
                passthrough: self.output.passthrough_columns.clone(),
            },
            generation,
            output: OutputSpec {
                path: self.output.path.relative(),
                // OpenAI Batch exports name the chosen tokens of `logprobs`.
                include_token_ids: self.output.include_token_ids
                    || format == InputFormat::OpenaiBatch,
                flush_every: positive("output.flush_every", self.output.flush_every)?,
                include_stop_str: self.output.include_stop_str,
                logprobs: logprobs(self.output.logprobs)?,
                prompt_logprobs: self.output.prompt_logprobs,
                shard_count: match self.output.shard_count {
                    0 => 0,
                    n => positive("output.shard_count", n)?,
                },
                flush_every_s: match self.output.flush_every_s {
                    s if s.is_finite() && s > 0.0 => s,
                    s => {
                        return Err(Error::Config(format!(
                            "output.flush_every_s is {s}, expected a number of seconds > 0"
                        )))
                    }
                },
            },
            engine: resolve_engine(&e)?,
            scoring,
            sweep,
            shard: None,
        })
    }
}

/// The job-wide structured-output constraint: at most one of
/// `generation.json_schema`, `json_schema_file`, `regex`, `grammar`.
fn constraint(
    schema: &str,
    schema_file: Option<&figment::value::magic::RelativePathBuf>,
    regex: &str,
    grammar: &str,
) -> Result<Option<Constraint>> {
    let set: Vec<&str> = [
        ("generation.json_schema", !schema.is_empty()),
        ("generation.json_schema_file", schema_file.is_some()),
        ("generation.regex", !regex.is_empty()),
        ("generation.grammar", !grammar.is_empty()),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(k, _)| *k)
    .collect();
    if set.len() > 1 {
        return Err(Error::Config(format!(
            "{} are all set; a job takes one constraint",
            set.join(" and ")
        )));
    }
    if let Some(f) = schema_file {
        let path = f.relative();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::Config(format!(
                "generation.json_schema_file {}: cannot read it ({e})",
                path.display()
            ))
        })?;
        return Constraint::json_schema(&text).map(Some).map_err(|e| {
            Error::Config(format!(
                "generation.json_schema_file {} {e}",
                path.display()
            ))
        });
    }
    if !schema.is_empty() {
        return Constraint::json_schema(schema)
            .map(Some)
            .map_err(|e| Error::Config(format!("generation.json_schema {e}")));
    }
    if !regex.is_empty() {
        regex::Regex::new(regex).map_err(|e| {
            Error::Config(format!("generation.regex `{regex}` is not a regex: {e}"))
        })?;
        return Ok(Some(Constraint::Regex(regex.to_string())));
    }
    Ok((!grammar.is_empty()).then(|| Constraint::Grammar(grammar.to_string())))
}

/// `output.logprobs`: 0 (off) to [`MAX_LOGPROBS`].
fn logprobs(k: i64) -> Result<usize> {
    if (0..=MAX_LOGPROBS as i64).contains(&k) {
        Ok(k as usize)
    } else {
        Err(Error::Config(format!(
            "output.logprobs is {k}, expected 0 (off) to {MAX_LOGPROBS}"
        )))
    }
}

fn resolve_scoring(r: super::raw::RawScoring) -> Result<ScoringSpec> {
    let (metrics, normalize) = (r.metrics, r.normalize);
    if metrics.contains(&Metric::RegexMatch) {
        regex::Regex::new(&r.regex).map_err(|e| {
            Error::Config(format!("scoring.regex `{}` is not a regex: {e}", r.regex))
        })?;
    }
    let loglikelihood = r.mode == ScoringMode::Loglikelihood;
    Ok(ScoringSpec {
        loglikelihood,
        continuation_column: r.continuation_column,
        reference_column: r.reference_column,
        metrics,
        normalize,
        regex: r.regex,
    })
}

fn resolve_sweep(r: super::raw::RawSweep, model: &ModelSpec) -> Result<SweepSpec> {
    let mut variants = Vec::new();
    for rev in &r.revisions {
        variants.push(Variant {
            name: rev.clone(),
            id: model.id.clone(),
            revision: rev.clone(),
            local_dir: None,
        });
    }
    for m in &r.models {
        let dir = m.relative();
        if !dir.is_dir() {
            return Err(Error::Config(format!(
                "sweep.models holds {}, which is not a directory",
                m.original().display()
            )));
        }
        let name = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        variants.push(Variant {
            name,
            id: m.original().display().to_string(),
            revision: model.revision.clone(),
            local_dir: Some(dir),
        });
    }
    if variants.is_empty() {
        return Err(Error::Config(
            "[sweep] names no revisions and no models".into(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for v in &variants {
        if !seen.insert(v.name.clone()) {
            return Err(Error::Config(format!(
                "sweep variant name `{}` appears twice; variant directories are named after it",
                v.name
            )));
        }
        if v.name.contains('/') || v.name.starts_with('.') {
            return Err(Error::Config(format!(
                "sweep variant name `{}` is not a valid directory name",
                v.name
            )));
        }
    }
    if let Some(b) = &r.baseline {
        if !variants.iter().any(|v| &v.name == b) {
            return Err(Error::Config(format!(
                "sweep.baseline is `{b}`, expected one of the variants: {}",
                variants
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let all_gpus = r.devices.iter().any(|d| d == "auto");
    if all_gpus && r.devices.len() > 1 {
        return Err(Error::Config(
            "sweep.devices: \"auto\" (every visible GPU) stands alone".into(),
        ));
    }
    let devices = r
        .devices
        .iter()
        .filter(|d| *d != "auto")
        .map(|d| {
            parse_device(d).map_err(|_| {
                Error::Config(format!(
                    "sweep.devices holds `{d}`, expected cpu, cuda or cuda:N"
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SweepSpec {
        variants,
        baseline: r.baseline,
        devices,
        all_gpus,
    })
}

/// `engine.devices`: `"all"` (or `"auto"`), or a list of `cpu`, `cuda`,
/// `cuda:N` (a device may repeat: two engines share it).
fn engine_devices(d: &RawDevices) -> Result<(Vec<Device>, bool)> {
    let list = match d {
        RawDevices::One(s) if s == "all" || s == "auto" => return Ok((Vec::new(), true)),
        RawDevices::One(s) => std::slice::from_ref(s),
        RawDevices::Many(v) => v.as_slice(),
    };
    let devices = list
        .iter()
        .map(|s| match parse_device(s) {
            Ok(Device::Auto) | Err(_) => Err(Error::Config(format!(
                "engine.devices holds `{s}`, expected \"all\" or a list of cpu, cuda or cuda:N"
            ))),
            Ok(d) => Ok(d),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((devices, false))
}

/// `[engine]`, checked.
fn resolve_engine(e: &super::raw::RawEngine) -> Result<EngineSpec> {
    let (devices, all_devices) = engine_devices(&e.devices)?;
    Ok(EngineSpec {
        device: parse_device(&e.device)?,
        devices,
        all_devices,
        max_num_seqs: positive("engine.max_num_seqs", e.max_num_seqs)?,
        max_batch_tokens: positive("engine.max_batch_tokens", e.max_batch_tokens)?,
        max_prompt_tokens: e.max_prompt_tokens as usize,
        block_size: positive("engine.block_size", e.block_size)?,
        num_blocks: if e.num_blocks == 0 {
            0
        } else {
            positive("engine.num_blocks", e.num_blocks)?
        },
        kv_cache_mib: match e.kv_cache_mib {
            0 => 0,
            n => positive("engine.kv_cache_mib", n)?,
        },
        gpu_memory_utilization: match e.gpu_memory_utilization {
            u if u > 0.0 && u <= 1.0 => u,
            u => {
                return Err(Error::Config(format!(
                    "engine.gpu_memory_utilization is {u}, expected a value in (0, 1]"
                )))
            }
        },
        gptq_kernel: match e.gptq_kernel {
            GptqKernel::Auto => crate::quant::GptqMode::Auto {
                max_m: positive("engine.gptq_fused_max_m", e.gptq_fused_max_m)?,
            },
            GptqKernel::Fused => crate::quant::GptqMode::Fused,
            GptqKernel::FusedPacked => crate::quant::GptqMode::FusedPacked,
            GptqKernel::Dequant => crate::quant::GptqMode::Dequant,
            GptqKernel::Resident => crate::quant::GptqMode::Resident,
            GptqKernel::Packed => crate::quant::GptqMode::Packed {
                max_m: positive("engine.gptq_fused_max_m", e.gptq_fused_max_m)?,
            },
        },
        prefix_caching: e.prefix_caching,
        overlap: e.overlap,
        cuda_graphs: e.cuda_graphs,
        cublas_tuning: e.cublas_tuning,
        kv_cache_dtype: e.kv_cache_dtype,
        // `auto` picks the flash prefill kernel per forward; a batch-invariant
        // job (`fused`, `fused_packed`) must not, so it takes the wgmma kernel wherever it
        // runs, for every forward.
        prefill_attention: match (e.gptq_kernel, e.prefill_attention) {
            (GptqKernel::Fused | GptqKernel::FusedPacked, PrefillAttention::Auto) => {
                PrefillAttention::Wgmma
            }
            (_, p) => p,
        },
    })
}
