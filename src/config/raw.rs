//! Raw configuration as extracted by figment: every section rejects unknown
//! keys; nothing here is validated yet (see [`RawJob::resolve`]).

use super::spec::{
    DType, FormatChoice, GptqKernel, KvCacheDtype, LoadFormat, Metric, Normalize, PrefillAttention,
    ScoringMode,
};
use figment::value::magic::RelativePathBuf;
use serde::Deserialize;

/// The whole job file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawJob {
    pub model: RawModel,
    pub input: RawInput,
    pub generation: RawGeneration,
    pub output: RawOutput,
    pub engine: RawEngine,
    pub scoring: RawScoring,
    #[serde(default)]
    pub sweep: Option<RawSweep>,
}

/// `[scoring]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawScoring {
    pub mode: ScoringMode,
    pub continuation_column: String,
    pub reference_column: String,
    pub metrics: Vec<Metric>,
    pub normalize: Vec<Normalize>,
    pub regex: String,
}

/// `[sweep]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawSweep {
    #[serde(default)]
    pub revisions: Vec<String>,
    #[serde(default)]
    pub models: Vec<RelativePathBuf>,
    #[serde(default)]
    pub baseline: Option<String>,
    #[serde(default)]
    pub devices: Vec<String>,
}

/// `[model]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawModel {
    pub id: RelativePathBuf,
    pub revision: String,
    pub dtype: DType,
    pub load_format: LoadFormat,
    /// For `load_format = "dummy"`: quantization to fake ("none", or "4bit-128g", "8bit--1g", ...).
    #[serde(default)]
    pub dummy_quant: Option<String>,
}

/// `[input]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawInput {
    pub path: RelativePathBuf,
    pub format: FormatChoice,
    pub id_column: String,
    pub prompt_column: String,
    pub messages_column: String,
    pub system_column: String,
    pub template: String,
    #[serde(default)]
    pub template_file: Option<RelativePathBuf>,
}

/// `[generation]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawGeneration {
    pub max_new_tokens: i64,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: i64,
    pub repetition_penalty: f64,
    pub seed: u64,
    pub stop: Vec<String>,
    pub system_prompt: String,
    pub ignore_eos: bool,
    pub min_new_tokens: i64,
    pub stop_token_ids: Vec<u32>,
    pub n: i64,
    pub json_schema: String,
    #[serde(default)]
    pub json_schema_file: Option<RelativePathBuf>,
    pub regex: String,
    pub grammar: String,
}

/// `[output]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawOutput {
    pub path: RelativePathBuf,
    pub include_token_ids: bool,
    pub flush_every: i64,
    pub flush_every_s: f64,
    pub include_stop_str: bool,
    pub passthrough_columns: Vec<String>,
    pub logprobs: i64,
    pub prompt_logprobs: bool,
    pub shard_count: i64,
}

/// `engine.devices`: `"all"` or a list of device names.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
#[allow(missing_docs)]
pub enum RawDevices {
    One(String),
    Many(Vec<String>),
}

/// `[engine]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawEngine {
    pub device: String,
    pub devices: RawDevices,
    pub max_num_seqs: i64,
    pub max_batch_tokens: i64,
    pub max_prompt_tokens: i64,
    pub block_size: i64,
    pub num_blocks: i64,
    pub kv_cache_mib: i64,
    pub gpu_memory_utilization: f64,
    pub prefix_caching: bool,
    pub overlap: bool,
    pub cuda_graphs: bool,
    pub cublas_tuning: bool,
    pub gptq_kernel: GptqKernel,
    pub gptq_fused_max_m: i64,
    pub kv_cache_dtype: KvCacheDtype,
    pub prefill_attention: PrefillAttention,
}
