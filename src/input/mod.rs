//! Input records from JSONL or Parquet, read as a stream. Every row becomes
//! an [`InputRecord`]; a row that cannot be used carries its error (and
//! becomes an error row in the output) instead of stopping the job.

mod openai;
mod passthrough;
mod record_error;
mod template;

pub use record_error::RecordError;
pub use template::UserTemplate;
mod jsonl;
mod parquet;

pub use self::jsonl::JsonlSource;
pub use self::parquet::ParquetSource;

use crate::config::{GenerationParams, InputFormat, InputSpec};
use crate::prompt::Message;
use crate::{Error, Result};
use serde_json::{Map, Value};

/// What a record asks the model.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// A user prompt with an optional per-record system prompt.
    Text {
        /// Per-record system prompt (`None`: the job's).
        system: Option<String>,
        /// The user turn.
        user: String,
    },
    /// A full message list, with the record's system prompt for lists
    /// that have no system message.
    Messages {
        /// Per-record system prompt (`None`: the job's).
        system: Option<String>,
        /// The messages as given.
        messages: Vec<Message>,
    },
    /// Token ids, used as they are (no template): benchmarks' synthetic
    /// prompts; no input format reads these.
    Tokens(Vec<u32>),
}

/// A usable record.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordBody {
    /// The prompt.
    pub prompt: PromptInput,
    /// Generation parameters after per-record overrides.
    pub params: GenerationParams,
    /// The reference answer (scoring), when the row has one.
    pub reference: Option<String>,
    /// The continuation to score (loglikelihood mode), when the row has one.
    pub continuation: Option<String>,
}

/// One input row.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRecord {
    /// 0-based row number in the input.
    pub row: u64,
    /// Record id (from the id column, else the row number).
    pub id: String,
    /// The record, or why it cannot be run.
    pub body: std::result::Result<RecordBody, RecordError>,
    /// Its `output.passthrough_columns` cells (one row), when any are asked
    /// for and the row could be read.
    pub passthrough: Option<arrow::array::RecordBatch>,
    /// Sample indices already in the output (a resumed job runs only the
    /// others).
    pub written_samples: Vec<u32>,
}

impl InputRecord {
    /// A record read from the input (no passthrough cells, no samples
    /// written yet).
    pub fn new(row: u64, id: String, body: std::result::Result<RecordBody, RecordError>) -> Self {
        Self {
            row,
            id,
            body,
            passthrough: None,
            written_samples: Vec::new(),
        }
    }

    /// A record whose prompt is given as token ids beside it
    /// (`Engine::run_tokens`: benchmarks and tests).
    pub fn for_tokens(row: u64, id: String, params: GenerationParams) -> Self {
        let body = RecordBody {
            prompt: PromptInput::Text {
                system: None,
                user: String::new(),
            },
            params,
            reference: None,
            continuation: None,
        };
        Self::new(row, id, Ok(body))
    }

    /// A record whose prompt is these token ids, taken as they are (the
    /// benchmarks' prompts through a fleet of engines).
    pub fn with_token_ids(row: u64, id: String, params: GenerationParams, ids: Vec<u32>) -> Self {
        let mut r = Self::for_tokens(row, id, params);
        if let Ok(b) = &mut r.body {
            b.prompt = PromptInput::Tokens(ids);
        }
        r
    }

    /// Samples the record asks for: its `n`, or the job's when its body
    /// could not be read.
    pub fn samples(&self, defaults: &GenerationParams) -> usize {
        self.body.as_ref().map_or(defaults.n, |b| b.params.n)
    }

    /// The sample indices still to write.
    pub fn pending_samples(&self, defaults: &GenerationParams) -> Vec<u32> {
        (0..self.samples(defaults) as u32)
            .filter(|i| !self.written_samples.contains(i))
            .collect()
    }
}

/// A stream of records, and the output fields of their passthrough cells.
pub trait RecordSource: Iterator<Item = Result<InputRecord>> + Send {
    /// The passthrough columns' output fields (`None`: none asked for).
    fn passthrough_schema(&self) -> Option<arrow::datatypes::SchemaRef>;

    /// Whether records may carry a per-record `json_schema` (Parquet: the
    /// column exists; JSONL: the first record has it).
    fn has_schema_column(&self) -> bool;
}

/// Per-record override columns, named as the `[generation]` keys.
pub const OVERRIDE_COLUMNS: &[&str] = &[
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "min_new_tokens",
    "n",
];

/// The per-record JSON Schema column (a JSON string, or an object in JSONL).
pub const SCHEMA_COLUMN: &str = "json_schema";

/// Opens the input named by the spec as a stream of records.
pub fn open(spec: &InputSpec, defaults: &GenerationParams) -> Result<Box<dyn RecordSource>> {
    if !spec.path.is_file() {
        return Err(Error::Input(format!(
            "input file {} does not exist (input.path)",
            spec.path.display()
        )));
    }
    let rb = RecordBuilder::new(spec.clone(), defaults.clone())?;
    Ok(match spec.format {
        InputFormat::Jsonl | InputFormat::OpenaiBatch => {
            Box::new(JsonlSource::open(&spec.path, rb)?)
        }
        InputFormat::Parquet => Box::new(ParquetSource::open(&spec.path, rb)?),
    })
}

/// Turns one row (as a JSON object) into a record; shared by both formats.
#[derive(Debug, Clone)]
pub struct RecordBuilder {
    spec: InputSpec,
    defaults: GenerationParams,
    template: Option<UserTemplate>,
}

impl RecordBuilder {
    /// Builds a builder for a spec and job-level defaults (compiling the
    /// user-message template, if any).
    pub fn new(spec: InputSpec, defaults: GenerationParams) -> Result<Self> {
        let template = spec
            .template
            .as_deref()
            .map(UserTemplate::compile)
            .transpose()?;
        Ok(Self {
            spec,
            defaults,
            template,
        })
    }

    /// The template's columns, for the readers' checks and projections.
    pub fn template_columns(&self) -> &[String] {
        self.template.as_ref().map_or(&[], |t| t.columns())
    }

    /// Fails before any model work when the template reads a column the
    /// input lacks.
    pub fn check_template(&self, file: &std::path::Path, has: impl Fn(&str) -> bool) -> Result<()> {
        self.template
            .as_ref()
            .map_or(Ok(()), |t| t.check_columns(file, has))
    }

    /// The id of a row: the id column's value (string or integer), else the
    /// row number.
    pub fn id_of(&self, row: u64, obj: &Map<String, Value>) -> std::result::Result<String, String> {
        match obj.get(&self.spec.id_column) {
            None => Ok(row.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(Value::Null) => Err(format!(
                "record at row {row}: `{}` is null, expected a string or integer id",
                self.spec.id_column
            )),
            Some(other) => Err(format!(
                "record at row {row}: `{}` is {}, expected a string or integer id",
                self.spec.id_column,
                kind(other)
            )),
        }
    }

    /// Builds a record from a row.
    pub fn build(&self, row: u64, obj: &Map<String, Value>) -> InputRecord {
        if self.spec.format == InputFormat::OpenaiBatch {
            return openai::build(row, obj, &self.defaults);
        }
        let (id, body) = match self.id_of(row, obj) {
            Ok(id) => {
                let body = self.body(&id, obj).map_err(RecordError::Field);
                (id, body)
            }
            // No usable id: `#row-N` (reserved, README) never collides.
            Err(e) => (format!("#row-{row}"), Err(RecordError::Field(e))),
        };
        InputRecord::new(row, id, body)
    }

    /// What the record asks: the template's rendering of its columns, else
    /// its messages, else its prompt column.
    fn prompt(
        &self,
        id: &str,
        obj: &Map<String, Value>,
        system: Option<String>,
    ) -> std::result::Result<PromptInput, String> {
        let s = &self.spec;
        if let Some(t) = &self.template {
            return Ok(PromptInput::Text {
                system,
                user: t.render(id, obj)?,
            });
        }
        Ok(match obj.get(&s.messages_column) {
            Some(v) if !v.is_null() => PromptInput::Messages {
                system,
                messages: messages(id, &s.messages_column, v)?,
            },
            _ => {
                let user = match obj.get(&s.prompt_column) {
                    None | Some(Value::Null) => {
                        return Err(format!(
                        "record {id}: `{}` is missing or null, expected a string (or a `{}` list)",
                        s.prompt_column, s.messages_column
                    ))
                    }
                    Some(Value::String(t)) => t.clone(),
                    Some(other) => {
                        return Err(format!(
                            "record {id}: `{}` is {}, expected a string",
                            s.prompt_column,
                            describe(other)
                        ))
                    }
                };
                if user.trim().is_empty() {
                    return Err(format!("record {id}: `{}` is empty", s.prompt_column));
                }
                PromptInput::Text { system, user }
            }
        })
    }

    fn body(&self, id: &str, obj: &Map<String, Value>) -> std::result::Result<RecordBody, String> {
        let s = &self.spec;
        let system = match obj.get(&s.system_column) {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t.clone()),
            Some(other) => {
                return Err(format!(
                    "record {id}: `{}` is {}, expected a string",
                    s.system_column,
                    kind(other)
                ))
            }
        };
        let prompt = self.prompt(id, obj, system)?;
        let mut p = self.defaults.clone();
        for &col in OVERRIDE_COLUMNS {
            let Some(v) = obj.get(col).filter(|v| !v.is_null()) else {
                continue;
            };
            let bad = || format!("record {id}: `{col}` is {}, expected a number", describe(v));
            match col {
                "max_new_tokens" | "top_k" | "seed" | "min_new_tokens" | "n" => {
                    let n = v.as_i64().ok_or_else(bad)?;
                    if n < 0 {
                        return Err(format!("record {id}: `{col}` is {n}, expected >= 0"));
                    }
                    match col {
                        "max_new_tokens" => p.max_new_tokens = n as usize,
                        "top_k" => p.top_k = n as usize,
                        "min_new_tokens" => p.min_new_tokens = n as usize,
                        "n" => p.n = n as usize,
                        _ => p.seed = n as u64,
                    }
                }
                _ => {
                    let x = v.as_f64().ok_or_else(bad)?;
                    match col {
                        "temperature" => p.temperature = x,
                        "top_p" => p.top_p = x,
                        _ => p.repetition_penalty = x,
                    }
                }
            }
        }
        if let Some(v) = obj.get(SCHEMA_COLUMN).filter(|v| !v.is_null()) {
            let c = match v {
                Value::String(t) => crate::config::Constraint::json_schema(t),
                other => crate::config::Constraint::json_schema_value(other),
            };
            p.constraint = Some(c.map_err(|e| format!("record {id}: `{SCHEMA_COLUMN}` {e}"))?);
        }
        p.validate(&format!("record {id}: "))?;
        let reference = match obj.get(&s.reference_column) {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => {
                return Err(format!(
                    "record {id}: `{}` is {}, expected a string or number",
                    s.reference_column,
                    describe(other)
                ))
            }
        };
        let continuation = match obj.get(&s.continuation_column) {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t.clone()),
            Some(other) => {
                return Err(format!(
                    "record {id}: `{}` is {}, expected a string",
                    s.continuation_column,
                    describe(other)
                ))
            }
        };
        Ok(RecordBody {
            prompt,
            params: p,
            reference,
            continuation,
        })
    }
}

fn messages(id: &str, col: &str, v: &Value) -> std::result::Result<Vec<Message>, String> {
    let arr = v.as_array().ok_or_else(|| {
        format!(
            "record {id}: `{col}` is {}, expected a list of {{role, content}}",
            kind(v)
        )
    })?;
    if arr.is_empty() {
        return Err(format!("record {id}: `{col}` is an empty list"));
    }
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(|r| r.as_str());
            let content = m.get("content").and_then(|r| r.as_str());
            match (role, content) {
                (Some(r), Some(c)) => Ok(Message {
                    role: r.to_string(),
                    content: c.to_string(),
                }),
                _ => Err(format!(
                    "record {id}: `{col}`[{i}] is not an object with string `role` and `content`"
                )),
            }
        })
        .collect()
}

/// A cell's kind for messages, naming Arrow types that have no JSON form.
pub fn describe(v: &Value) -> String {
    match v.get("arrow_type").and_then(|t| t.as_str()) {
        Some(t) if v.as_object().is_some_and(|o| o.len() == 1) => t.to_string(),
        _ => kind(v).to_string(),
    }
}

/// A JSON value's kind for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
