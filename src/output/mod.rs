//! Output: one row per input record, written as Parquet part files into the
//! job's output directory (see README for the schema).

mod atomic;
mod layout;
mod logprobs;
mod parquet;

pub use self::atomic::{write_atomic, write_atomic_path};
pub use self::layout::{shards_in, Layout, Shard, LOCK, MANIFEST, METRICS};
pub use self::parquet::{
    existing_parts, read_part, schema, ParquetSink, PartHook, RowHook, SinkSettings,
};

/// Figures of one part file.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct PartStats {
    /// File name inside the output directory.
    pub file: String,
    /// Rows.
    pub rows: usize,
    /// Rows with status ok.
    pub ok: usize,
    /// Rows with status error.
    pub errors: usize,
    /// Prompt tokens of its rows.
    pub prompt_tokens: usize,
    /// Generated tokens of its rows.
    pub completion_tokens: usize,
}

/// Where finished rows go: the job's Parquet parts, or a vector in tests.
pub trait RowSink {
    /// Adds a row (written when the sink's buffer fills).
    fn push(&mut self, row: OutputRow) -> crate::Result<()>;
    /// Writes what is buffered.
    fn flush(&mut self) -> crate::Result<()>;
    /// Called after every engine step: writes what has waited too long.
    fn tick(&mut self) -> crate::Result<()> {
        Ok(())
    }
}

impl RowSink for ParquetSink {
    fn push(&mut self, row: OutputRow) -> crate::Result<()> {
        ParquetSink::push(self, row)
    }
    fn flush(&mut self) -> crate::Result<()> {
        ParquetSink::flush(self)
    }
    fn tick(&mut self) -> crate::Result<()> {
        ParquetSink::tick(self)
    }
}

impl RowSink for Vec<OutputRow> {
    fn push(&mut self, row: OutputRow) -> crate::Result<()> {
        Vec::push(self, row);
        Ok(())
    }
    fn flush(&mut self) -> crate::Result<()> {
        Ok(())
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, `<|im_end|>` or a stop string.
    Stop,
    /// max_new_tokens reached.
    Length,
    /// The record could not be run.
    Error,
    /// Loglikelihood mode: the continuation was scored, nothing generated.
    Scored,
}

impl FinishReason {
    /// The string written to the output.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Error => "error",
            FinishReason::Scored => "scored",
        }
    }
}

/// Whether a record ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowStatus {
    /// It ran: the row holds its completion or score.
    Ok,
    /// It could not run: the row's `error` says why.
    Error,
}

impl RowStatus {
    /// The string written to the output.
    pub fn as_str(self) -> &'static str {
        match self {
            RowStatus::Ok => "ok",
            RowStatus::Error => "error",
        }
    }
}

/// Per-job values repeated on every row.
#[derive(Debug, Clone)]
pub struct JobMeta {
    /// Unique id of this job run.
    pub job_id: String,
    /// Model id as configured.
    pub model_id: String,
    /// Hub revision (quant branch).
    pub revision: String,
    /// GPTQ bits, `None` for dense.
    pub quant_bits: Option<i32>,
    /// GPTQ group size (-1: one group), `None` for dense.
    pub quant_group_size: Option<i32>,
    /// Act-order, `None` for dense.
    pub quant_act_order: Option<bool>,
    /// Scoring metrics (their columns are added when any).
    pub metrics: Vec<crate::config::Metric>,
    /// Loglikelihood mode (adds `ll_sum`, `ll_mean`, `ll_tokens`).
    pub loglikelihood: bool,
    /// The passthrough columns' fields, appended last (`None`: none).
    pub passthrough: Option<arrow::datatypes::SchemaRef>,
    /// `output.logprobs` (k; 0 = no log-probability columns).
    pub logprobs: usize,
    /// `output.prompt_logprobs`.
    pub prompt_logprobs: bool,
    /// Some records are constrained (adds `schema_valid`).
    pub constrained: bool,
}

/// Log-probabilities of a completion's tokens under the model's own
/// distribution (before temperature, top-k, top-p and penalties).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenLogprobs {
    /// Per generated token, its log-probability.
    pub chosen: Vec<f32>,
    /// Per generated token, the k most likely `(token, log-probability)`,
    /// most likely first.
    pub top: Vec<Vec<(u32, f32)>>,
}

/// One output row.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRow {
    /// Record id.
    pub id: String,
    /// 0-based input row.
    pub input_row: u64,
    /// Which of the record's `generation.n` samples this row is.
    pub sample_index: u32,
    /// Generated text (stop strings trimmed); `None` for errors.
    pub completion: Option<String>,
    /// Why the completion ended (`error` for error rows).
    pub finish_reason: FinishReason,
    /// Whether the record ran.
    pub status: RowStatus,
    /// Error message for status = error.
    pub error: Option<String>,
    /// Prompt length in tokens (0 when it never got tokenized).
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: u32,
    /// Parameters used for this record.
    pub max_new_tokens: u32,
    #[allow(missing_docs)]
    pub temperature: f64,
    #[allow(missing_docs)]
    pub top_p: f64,
    #[allow(missing_docs)]
    pub top_k: u32,
    #[allow(missing_docs)]
    pub repetition_penalty: f64,
    /// The seed the record's RNG was derived from (with its id).
    pub seed: u64,
    /// Admission time minus job start.
    pub queue_ms: f64,
    /// First token time minus admission.
    pub ttft_ms: Option<f64>,
    /// Finish time minus admission.
    pub total_ms: f64,
    /// Generated ids (written when `output.include_token_ids`).
    pub completion_token_ids: Vec<u32>,
    /// The record's passthrough cells (one row; `None`: nulls).
    pub passthrough: Option<arrow::array::RecordBatch>,
    /// The record's reference answer (scoring jobs).
    pub reference: Option<String>,
    /// Scores in the order of the job's metrics (`None`: no reference or an error row).
    pub scores: Vec<Option<f64>>,
    /// The answer `regex_match` extracted from the completion.
    pub extracted: Option<String>,
    /// Loglikelihood mode: (sum of log-probabilities, continuation tokens).
    pub loglikelihood: Option<(f64, u32)>,
    /// The completion's log-probabilities (`output.logprobs > 0`).
    pub logprobs: Option<TokenLogprobs>,
    /// Per prompt token, its log-probability (`None` for the first), when
    /// `output.prompt_logprobs`.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    /// Constrained rows: whether the completion is a complete sentence of
    /// the record's schema, regex or grammar.
    pub schema_valid: Option<bool>,
}
