//! The resolved, validated job: what every other module reads.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Activation/weight dtype of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE half.
    #[serde(alias = "float16")]
    F16,
    /// bfloat16.
    #[serde(alias = "bfloat16")]
    Bf16,
    /// single precision (the reference path).
    #[serde(alias = "float32")]
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

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How weights are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// OpenAI Batch API request lines (`custom_id`, `body.messages`, ...).
    #[serde(rename = "openai_batch")]
    OpenaiBatch,
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
    /// `input.template` (or the text of `input.template_file`): renders the
    /// user message from the record's columns instead of the prompt column.
    pub template: Option<String>,
    /// `output.passthrough_columns`: read with the record, copied to its row.
    pub passthrough: Vec<String>,
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
    /// Tokens generated before EOS, `stop_token_ids` or a stop string may
    /// end the completion (EOS and stop ids are masked until then).
    pub min_new_tokens: usize,
    /// Token ids that end a completion (finish reason `stop`), beside EOS.
    pub stop_token_ids: Vec<u32>,
    /// Samples per record (one output row each, `sample_index` 0..n-1).
    pub n: usize,
    /// Structured output: what every completion must match.
    pub constraint: Option<Constraint>,
    /// This record's log-probabilities: `Some(k)` records them with the k
    /// most likely tokens (`None`: as `output.logprobs` says). Set by
    /// OpenAI Batch requests (`logprobs`, `top_logprobs`).
    pub logprobs: Option<usize>,
}

/// A structured-output constraint: `generation.json_schema` (or
/// `json_schema_file`, or a record's `json_schema` column),
/// `generation.regex` or `generation.grammar` (Lark, as llguidance reads it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Constraint {
    /// A JSON Schema, as compact JSON text.
    JsonSchema(String),
    /// A regular expression the whole completion matches.
    Regex(String),
    /// A Lark grammar.
    Grammar(String),
}

impl Constraint {
    /// The job key (or column) it comes from.
    pub fn key(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "json_schema",
            Constraint::Regex(_) => "regex",
            Constraint::Grammar(_) => "grammar",
        }
    }

    /// A JSON Schema from its text: JSON whose top level is an object or a
    /// boolean (kept as compact JSON).
    pub fn json_schema(text: &str) -> std::result::Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("is not JSON ({e})"))?;
        Self::json_schema_value(&v)
    }

    /// A JSON Schema from a parsed value.
    pub fn json_schema_value(v: &serde_json::Value) -> std::result::Result<Self, String> {
        match v {
            serde_json::Value::Object(_) | serde_json::Value::Bool(_) => {
                Ok(Constraint::JsonSchema(v.to_string()))
            }
            _ => Err("is not a JSON Schema (expected an object or a boolean)".into()),
        }
    }
}

impl Default for GenerationParams {
    /// `configs/default.toml`'s `[generation]`: greedy, 256 tokens, no
    /// stop strings (tests and benches start from it).
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: 0,
            stop: Vec::new(),
            system_prompt: String::new(),
            ignore_eos: false,
            min_new_tokens: 0,
            stop_token_ids: Vec::new(),
            n: 1,
            constraint: None,
            logprobs: None,
        }
    }
}

/// Most samples per record (`generation.n`).
pub const MAX_SAMPLES: usize = 1024;

/// Most top log-probabilities per token (`output.logprobs`).
pub const MAX_LOGPROBS: usize = 20;

impl GenerationParams {
    /// Checks ranges; `what` names the source (job field or record) in messages.
    pub fn validate(&self, what: &str) -> std::result::Result<(), String> {
        if self.max_new_tokens == 0 {
            return Err(format!("{what}max_new_tokens is 0, expected at least 1"));
        }
        if !(1..=MAX_SAMPLES).contains(&self.n) {
            return Err(format!(
                "{what}n is {}, expected 1 to {MAX_SAMPLES} samples per record",
                self.n
            ));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(format!(
                "{what}min_new_tokens is {}, expected at most max_new_tokens ({})",
                self.min_new_tokens, self.max_new_tokens
            ));
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
    /// Seconds a finished row may wait in the buffer before a part is written.
    pub flush_every_s: f64,
    /// Keep the stop string that ended a completion.
    pub include_stop_str: bool,
    /// Log-probabilities: 0 = off; k >= 1 also writes the k most likely
    /// tokens of each step. (`completion_logprobs` is written whenever
    /// `logprobs > 0`.)
    pub logprobs: usize,
    /// Write `prompt_logprobs`.
    pub prompt_logprobs: bool,
    /// The shard count `--shard auto` takes when the environment gives only
    /// an index (Kubernetes' `JOB_COMPLETION_INDEX`); 0: not set.
    pub shard_count: usize,
}

/// `[engine]`, resolved.
#[derive(Debug, Clone, Serialize)]
pub struct EngineSpec {
    /// Where the forward runs.
    pub device: Device,
    /// One engine per device in one job (empty: `device` alone).
    pub devices: Vec<Device>,
    /// `devices = "all"`: every visible GPU (resolved when the job runs;
    /// `device` alone when there is none).
    pub all_devices: bool,
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
    /// Queue the next greedy step before this one's tokens reach the host.
    pub overlap: bool,
    /// CUDA: replay decode steps from CUDA graphs.
    pub cuda_graphs: bool,
    /// CUDA: products over resident f16 weights through the fastest
    /// algorithm with cuBLAS's values (timed once per shape and M).
    pub cublas_tuning: bool,
    /// GPTQ kernel choice on CUDA (`auto` carries `gptq_fused_max_m`).
    pub gptq_kernel: crate::quant::GptqMode,
    /// How the KV cache stores keys and values.
    pub kv_cache_dtype: KvCacheDtype,
    /// The flash prefill kernel on CUDA.
    pub prefill_attention: PrefillAttention,
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
    /// The static shard of the records this run writes (`--shard`; `None`:
    /// all of them).
    pub shard: Option<crate::output::Shard>,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// `input.format` as written: `auto` picks by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatChoice {
    /// By extension (.jsonl/.json/.ndjson, .parquet/.pq).
    Auto,
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet.
    Parquet,
    /// OpenAI Batch API request lines (JSONL).
    #[serde(rename = "openai_batch")]
    OpenaiBatch,
}

/// `engine.gptq_kernel` as written (`auto` takes `engine.gptq_fused_max_m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GptqKernel {
    /// The fused kernel up to `gptq_fused_max_m` tokens, cuBLAS above.
    Auto,
    /// Batch-invariant: cuBLASLt without K splits over f16 weights kept
    /// from load, at every M.
    Fused,
    /// Batch-invariant on the packed weights only: the warpgroup product
    /// (Hopper) or the fused kernel at every M.
    #[serde(rename = "fused_packed")]
    FusedPacked,
    /// Dequantize per product, then cuBLAS.
    Dequant,
    /// cuBLAS on f16 weights kept from load.
    Resident,
    /// The fused kernel up to `gptq_fused_max_m` tokens, the warpgroup
    /// product on the packed weights above (Hopper): no f16 copy.
    Packed,
}

/// `engine.kv_cache_dtype`: how the paged cache stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    /// The model's dtype on CUDA (f16), f32 rows on the CPU.
    #[default]
    Auto,
    /// FP8 E4M3 with one f32 scale per token and KV head
    /// (`crate::quant::fp8`), on the CPU and on CUDA.
    Fp8,
}

/// `engine.prefill_attention`: the flash prefill kernel on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PrefillAttention {
    /// The wgmma kernel on Hopper (head dim 128, f16 cache) for a forward
    /// whose prefill tiles average at least
    /// `cuda::WGMMA_PREFILL_MIN_KEYS` keys, the mma.sync kernel otherwise.
    #[default]
    Auto,
    /// The mma.sync kernel always (every CUDA GPU, every head dim).
    Mma,
    /// The wgmma kernel wherever it runs (Hopper, head dim 128, f16
    /// cache), the mma.sync kernel elsewhere.
    Wgmma,
}

/// `scoring.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoringMode {
    /// Generate completions (scored against references when metrics are set).
    Generate,
    /// Score the continuation column; generate nothing.
    Loglikelihood,
}

/// A per-record metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
