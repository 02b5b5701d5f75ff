//! `runner export OUT --format openai_batch`: a job's rows as OpenAI Batch
//! API output lines, one per record (its samples are the `choices`), in
//! input order: `id`, `custom_id`, `response` (`status_code` 200 and a
//! `chat.completion` body with `choices`, `usage` and, when the rows hold
//! them, `logprobs`) or, for a record that could not run, `response: null`
//! and an `error`.

use super::merge::sorted_rows;
use crate::prompt::Prompter;
use crate::{Error, Result};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, Int32Type, UInt32Type};
use serde_json::{json, Value};
use std::path::Path;

/// Writes the export of `dir` to `out`. `tokenizer` (a directory with
/// tokenizer.json) names tokens in `logprobs`; the job's model directory
/// is used when not given.
pub fn openai_batch(
    dir: &Path,
    tokenizer: Option<&Path>,
    out: &mut dyn std::io::Write,
) -> Result<usize> {
    let (m, rows) = sorted_rows(dir, "exporting")?;
    let model = m.fingerprint.get("model.id").cloned().unwrap_or_default();
    let created = m.updated_unix;
    let prompter = match rows.column_by_name("completion_logprobs") {
        Some(_) => Some(token_namer(&m, tokenizer)?),
        None => None,
    };
    let cols = Columns::of(&rows)?;
    let mut lines = 0;
    let mut start = 0;
    while start < rows.num_rows() {
        let id = cols.id.value(start);
        let mut end = start + 1;
        while end < rows.num_rows() && cols.id.value(end) == id {
            end += 1;
        }
        let line = record_line(&cols, start..end, &model, created, prompter.as_ref());
        serde_json::to_writer(&mut *out, &line).map_err(|e| Error::Output(e.to_string()))?;
        out.write_all(b"\n")
            .map_err(|e| Error::Output(format!("writing the export: {e}")))?;
        lines += 1;
        start = end;
    }
    Ok(lines)
}

/// The tokenizer that names logprob tokens: `tokenizer`, else the job's
/// model directory (a local `model.id`, relative to the job file).
fn token_namer(m: &super::Manifest, tokenizer: Option<&Path>) -> Result<Prompter> {
    let dir = match tokenizer {
        Some(d) => d.to_path_buf(),
        None => {
            let id = m.fingerprint.get("model.id").cloned().unwrap_or_default();
            let job_dir = Path::new(&m.job_file).parent().unwrap_or(Path::new("."));
            let p = job_dir.join(&id);
            if !p.join("tokenizer.json").is_file() {
                return Err(Error::Config(format!(
                    "the rows hold log-probabilities, whose tokens need the tokenizer: model `{id}` is not a local directory with tokenizer.json; pass --tokenizer DIR"
                )));
            }
            p
        }
    };
    Prompter::load(&dir, &[])
}

/// The columns an export reads.
struct Columns<'a> {
    id: &'a arrow::array::StringArray,
    status: &'a arrow::array::StringArray,
    error: &'a arrow::array::StringArray,
    completion: &'a arrow::array::StringArray,
    finish: &'a arrow::array::StringArray,
    sample: Option<&'a arrow::array::UInt32Array>,
    prompt_tokens: &'a arrow::array::UInt32Array,
    completion_tokens: &'a arrow::array::UInt32Array,
    token_ids: Option<&'a arrow::array::ListArray>,
    chosen: Option<&'a arrow::array::ListArray>,
    top: Option<&'a arrow::array::ListArray>,
}

impl<'a> Columns<'a> {
    fn of(b: &'a RecordBatch) -> Result<Self> {
        let s = |n: &str| -> Result<&'a arrow::array::StringArray> {
            Ok(b.column_by_name(n)
                .ok_or_else(|| Error::Output(format!("the output has no `{n}` column")))?
                .as_string::<i32>())
        };
        let u = |n: &str| b.column_by_name(n).map(|c| c.as_primitive::<UInt32Type>());
        let l = |n: &str| b.column_by_name(n).map(|c| c.as_list::<i32>());
        Ok(Self {
            id: s("id")?,
            status: s("status")?,
            error: s("error")?,
            completion: s("completion")?,
            finish: s("finish_reason")?,
            sample: u("sample_index"),
            prompt_tokens: u("prompt_tokens")
                .ok_or_else(|| Error::Output("no prompt_tokens".into()))?,
            completion_tokens: u("completion_tokens")
                .ok_or_else(|| Error::Output("no completion_tokens".into()))?,
            token_ids: l("completion_token_ids"),
            chosen: l("completion_logprobs"),
            top: l("completion_top_logprobs"),
        })
    }
}

/// One record's output line from its rows `range` (its samples).
fn record_line(
    c: &Columns<'_>,
    range: std::ops::Range<usize>,
    model: &str,
    created: u64,
    namer: Option<&Prompter>,
) -> Value {
    let first = range.start;
    let id = c.id.value(first);
    let key = crate::kv::fnv1a(crate::kv::FNV_OFFSET, id.bytes());
    let line_id = format!("batch_req_{key:016x}");
    if let Some(bad) = range.clone().find(|&i| c.status.value(i) != "ok") {
        let msg = if c.error.is_null(bad) {
            "the record could not run"
        } else {
            c.error.value(bad)
        };
        return json!({
            "id": line_id,
            "custom_id": id,
            "response": null,
            "error": {"code": "invalid_request", "message": msg},
        });
    }
    let choices: Vec<Value> = range
        .clone()
        .map(|i| {
            json!({
                "index": c.sample.map_or(0, |s| s.value(i)),
                "message": {"role": "assistant", "content": c.completion.value(i), "refusal": null},
                "logprobs": logprobs(c, i, namer),
                "finish_reason": c.finish.value(i),
            })
        })
        .collect();
    let prompt = c.prompt_tokens.value(first) as u64;
    let completion: u64 = range.map(|i| c.completion_tokens.value(i) as u64).sum();
    json!({
        "id": line_id,
        "custom_id": id,
        "response": {
            "status_code": 200,
            "request_id": format!("req_{key:016x}"),
            "body": {
                "id": format!("chatcmpl-{key:016x}"),
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        },
        "error": null,
    })
}

/// A choice's `logprobs` (`null` when the row has none).
fn logprobs(c: &Columns<'_>, i: usize, namer: Option<&Prompter>) -> Value {
    let (Some(chosen), Some(top), Some(ids), Some(namer)) = (c.chosen, c.top, c.token_ids, namer)
    else {
        return Value::Null;
    };
    if chosen.is_null(i) {
        return Value::Null;
    }
    let lp = chosen.value(i);
    let lp = lp.as_primitive::<Float32Type>();
    let ids = ids.value(i);
    let ids = ids.as_primitive::<UInt32Type>();
    let steps = top.value(i);
    let steps = steps.as_list::<i32>();
    let entry = |tok: u32, logprob: f32| {
        let bytes = namer.token_bytes(tok);
        json!({
            "token": String::from_utf8_lossy(&bytes),
            "logprob": logprob,
            "bytes": bytes,
        })
    };
    let content: Vec<Value> = (0..lp.len().min(ids.len()))
        .map(|j| {
            let alts = steps.value(j);
            let alts = alts.as_struct();
            let (toks, lps) = (
                alts.column(0).as_primitive::<Int32Type>(),
                alts.column(1).as_primitive::<Float32Type>(),
            );
            let mut e = entry(ids.value(j), lp.value(j));
            e["top_logprobs"] = (0..alts.len())
                .map(|a| entry(toks.value(a) as u32, lps.value(a)))
                .collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}
