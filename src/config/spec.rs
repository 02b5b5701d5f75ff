//! The resolved, validated job: what every other module reads.

use super::raw::RawJob;
use crate::{Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Activation/weight dtype of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// single precision (the reference path).
    F32,
}

impl DType {
    /// The candle dtype.
    pub fn candle(self) -> candle_core::DType {
        match self {
            DType::F16 => candle_core::DType::F16,
            DType::Bf16 => candle_core::DType::BF16,
            DType::F32 => candle_core::DType::F32,
        }
    }
}

/// Where the forward runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Device {
    /// The first CUDA device when the binary has the `cuda` feature and
    /// sees one (and the dtype is f16), else the CPU; chosen at load.
    Auto,
    /// candle's CPU backend.
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

/// How weights are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadFormat {
    /// Read the checkpoint.
    Auto,
    /// Random weights of the config's shapes (benchmarks).
    Dummy,
}

/// Input file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet.
    Parquet,
}

/// `[model]`, resolved.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSpec {
    /// Hub repo id or local directory, as written.
    pub id: String,
    /// The local directory, when `id` names one (resolved against the job file).
    pub local_dir: Option<PathBuf>,
    /// Hub revision (quant branch); ignored for local directories.
    pub revision: String,
    /// Compute dtype.
    pub dtype: DType,
    /// Checkpoint or dummy weights.
    pub load_format: LoadFormat,
    /// Quantization to fake with dummy weights.
    pub dummy_quant: Option<String>,
}

/// `[input]`, resolved.
#[derive(Debug, Clone, Serialize)]
pub struct InputSpec {
    /// The input file.
    pub path: PathBuf,
    /// Its format (never `auto` after resolution).
    pub format: InputFormat,
    /// Column with record ids (row numbers when absent from the file).
    pub id_column: String,
    /// Column with a plain user prompt.
    pub prompt_column: String,
    /// Column with a list of chat messages (takes precedence when present).
    pub messages_column: String,
    /// Column with a per-record system prompt.
    pub system_column: String,
    /// Column with a per-record reference answer (read when present).
    pub reference_column: String,
    /// Column with a continuation to score (loglikelihood mode).
    pub continuation_column: String,
}

/// Sampling and stopping parameters; job-level defaults, overridable per record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationParams {
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1].
    pub top_p: f64,
    /// 0 means off.
    pub top_k: usize,
    /// 1 means off; > 1 penalises tokens already in prompt or output.
    pub repetition_penalty: f64,
    /// Job seed (a record's RNG is seeded from this and its id).
    pub seed: u64,
    /// Stop strings, trimmed from the completion.
    pub stop: Vec<String>,
    /// System prompt used when a record has none.
    pub system_prompt: String,
    /// Keep generating past EOS (benchmarks).
    pub ignore_eos: bool,
}

impl GenerationParams {
    /// Checks ranges; `what` names the source (job field or record) in messages.
    pub fn validate(&self, what: &str) -> std::result::Result<(), String> {
        if self.max_new_tokens == 0 {
            return Err(format!("{what}max_new_tokens is 0, expected at least 1"));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "{what}temperature is {}, expected a finite value >= 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!(
                "{what}top_p is {}, expected a value in (0, 1]",
                self.top_p
            ));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "{what}repetition_penalty is {}, expected a finite value > 0",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// `[output]`, resolved.
#[derive(Debug, Clone, Serialize)]
pub struct OutputSpec {
    /// Output directory of Parquet part files.
    pub path: PathBuf,
    /// Write `completion_token_ids`.
    pub include_token_ids: bool,
    /// Records per part file.
    pub flush_every: usize,
}

/// `[engine]`, resolved.
#[derive(Debug, Clone, Serialize)]
pub struct EngineSpec {
    /// Where the forward runs.
    pub device: Device,
    /// Sequences decoded together at most.
    pub max_num_seqs: usize,
    /// Tokens per forward at most (prefill chunks + decodes).
    pub max_batch_tokens: usize,
    /// Longest accepted prompt; 0 = the model's context length.
    pub max_prompt_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks; 0 = sized automatically.
    pub num_blocks: usize,
    /// KV cache budget in MiB; 0 = what the device has left.
    pub kv_cache_mib: usize,
    /// CUDA: the share of device memory weights, activations and the KV
    /// cache may take together (automatic cache size).
    pub gpu_memory_utilization: f64,
    /// Share full prompt blocks between records.
    pub prefix_caching: bool,
    /// GPTQ kernel choice on CUDA (`auto` carries `gptq_fused_max_m`).
    pub gptq_kernel: crate::quant::GptqMode,
}

/// A validated job.
#[derive(Debug, Clone, Serialize)]
pub struct JobSpec {
    /// The job file it came from.
    pub job_file: PathBuf,
    #[allow(missing_docs)]
    pub model: ModelSpec,
    #[allow(missing_docs)]
    pub input: InputSpec,
    #[allow(missing_docs)]
    pub generation: GenerationParams,
    #[allow(missing_docs)]
    pub output: OutputSpec,
    #[allow(missing_docs)]
    pub engine: EngineSpec,
    #[allow(missing_docs)]
    pub scoring: ScoringSpec,
    /// Model variants of a sweep (`None`: one model).
    pub sweep: Option<SweepSpec>,
}

/// `[scoring]`, resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoringSpec {
    /// Generate (and score against references) or score given continuations.
    pub loglikelihood: bool,
    /// Column with the continuation of loglikelihood mode.
    pub continuation_column: String,
    /// Column with each record's reference answer.
    pub reference_column: String,
    /// Metrics to compute per record.
    pub metrics: Vec<Metric>,
    /// Normalisations applied before comparing, in order.
    pub normalize: Vec<Normalize>,
    /// Extraction pattern of `regex_match`.
    pub regex: String,
}

/// A text normalisation applied before comparing a completion with its
/// reference (`scoring.normalize`, applied in the order given).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Lowercase (Unicode).
    Lowercase,
    /// Remove ASCII punctuation.
    StripPunctuation,
    /// Runs of whitespace become one space; leading and trailing removed.
    CollapseWhitespace,
    /// Leading and trailing whitespace removed.
    Strip,
}

/// A per-record metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Normalised completion equals normalised reference.
    ExactMatch,
    /// Normalised completion contains normalised reference.
    Contains,
    /// The last regex match of completion equals that of the reference.
    RegexMatch,
}

impl Metric {
    /// Its name in jobs and output columns (`score_<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::ExactMatch => "exact_match",
            Metric::Contains => "contains",
            Metric::RegexMatch => "regex_match",
        }
    }
}

/// One model variant of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Variant {
    /// Its name: the revision, or the directory's base name.
    pub name: String,
    /// `model.id` for this variant.
    pub id: String,
    /// `model.revision` for this variant.
    pub revision: String,
    /// Local directory, when the variant is one.
    pub local_dir: Option<PathBuf>,
}

/// `[sweep]`, resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepSpec {
    /// The variants, in run order.
    pub variants: Vec<Variant>,
    /// The variant the others are compared with.
    pub baseline: Option<String>,
    /// Devices that run variants concurrently (one variant per device at a
    /// time); empty: every variant on `engine.device`, one after another.
    pub devices: Vec<Device>,
    /// `devices = ["auto"]`: every visible GPU (resolved when the sweep runs).
    pub all_gpus: bool,
}

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
        let dtype = match self.model.dtype.as_str() {
            "f16" | "float16" => DType::F16,
            "bf16" | "bfloat16" => DType::Bf16,
            "f32" | "float32" => DType::F32,
            other => {
                return Err(Error::Config(format!(
                    "model.dtype is `{other}`, expected f16, bf16 or f32"
                )))
            }
        };
        let load_format = match self.model.load_format.as_str() {
            "auto" => LoadFormat::Auto,
            "dummy" => LoadFormat::Dummy,
            other => {
                return Err(Error::Config(format!(
                    "model.load_format is `{other}`, expected auto or dummy"
                )))
            }
        };
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
        let format = match self.input.format.as_str() {
            "jsonl" => InputFormat::Jsonl,
            "parquet" => InputFormat::Parquet,
            "auto" => match input_path.extension().and_then(|e| e.to_str()) {
                Some("jsonl") | Some("json") | Some("ndjson") => InputFormat::Jsonl,
                Some("parquet") | Some("pq") => InputFormat::Parquet,
                _ => {
                    return Err(Error::Config(format!(
                        "input.format is auto but {} has no .jsonl or .parquet extension; set input.format",
                        input_path.display()
                    )))
                }
            },
            other => {
                return Err(Error::Config(format!(
                    "input.format is `{other}`, expected auto, jsonl or parquet"
                )))
            }
        };
        let g = self.generation;
        if g.top_k < 0 {
            return Err(Error::Config(format!(
                "generation.top_k is {}, expected >= 0",
                g.top_k
            )));
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
            },
            generation,
            output: OutputSpec {
                path: self.output.path.relative(),
                include_token_ids: self.output.include_token_ids,
                flush_every: positive("output.flush_every", self.output.flush_every)?,
            },
            engine: EngineSpec {
                device: parse_device(&e.device)?,
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
                gptq_kernel: match e.gptq_kernel.as_str() {
                    "auto" => crate::quant::GptqMode::Auto {
                        max_m: positive("engine.gptq_fused_max_m", e.gptq_fused_max_m)?,
                    },
                    "fused" => crate::quant::GptqMode::Fused,
                    "dequant" => crate::quant::GptqMode::Dequant,
                    "resident" => crate::quant::GptqMode::Resident,
                    other => {
                        return Err(Error::Config(format!(
                            "engine.gptq_kernel is `{other}`, expected auto, fused, dequant or resident"
                        )))
                    }
                },
                prefix_caching: e.prefix_caching,
            },
            scoring,
            sweep,
        })
    }
}

fn resolve_scoring(r: super::raw::RawScoring) -> Result<ScoringSpec> {
    let metrics = r
        .metrics
        .iter()
        .map(|m| match m.as_str() {
            "exact_match" => Ok(Metric::ExactMatch),
            "contains" => Ok(Metric::Contains),
            "regex_match" => Ok(Metric::RegexMatch),
            other => Err(Error::Config(format!(
                "scoring.metrics holds `{other}`, expected exact_match, contains or regex_match"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    let normalize = r
        .normalize
        .iter()
        .map(|n| match n.as_str() {
            "lowercase" => Ok(Normalize::Lowercase),
            "strip_punctuation" => Ok(Normalize::StripPunctuation),
            "collapse_whitespace" => Ok(Normalize::CollapseWhitespace),
            "strip" => Ok(Normalize::Strip),
            other => Err(Error::Config(format!(
                "scoring.normalize holds `{other}`, expected lowercase, strip_punctuation, collapse_whitespace or strip"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    if metrics.contains(&Metric::RegexMatch) {
        regex::Regex::new(&r.regex).map_err(|e| {
            Error::Config(format!("scoring.regex `{}` is not a regex: {e}", r.regex))
        })?;
    }
    let loglikelihood = match r.mode.as_str() {
        "generate" => false,
        "loglikelihood" => true,
        other => {
            return Err(Error::Config(format!(
                "scoring.mode is `{other}`, expected generate or loglikelihood"
            )))
        }
    };
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
