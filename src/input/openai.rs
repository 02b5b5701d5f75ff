//! OpenAI Batch API request lines (`input.format = "openai_batch"`, the
//! format vLLM's `run_batch` reads too): each line's `custom_id` is the
//! record id, `body.messages` its messages and the body's sampling fields
//! its per-record settings. A body field runner does not support is that
//! record's error row, naming the field; fields a body leaves out take the
//! job's `[generation]` values.

use super::{describe, InputRecord, PromptInput, RecordBody, RecordError};
use crate::config::{Constraint, GenerationParams, MAX_LOGPROBS};
use crate::prompt::Message;
use serde_json::{Map, Value};

/// Body fields read (`model` and `user` are accepted and ignored: the job
/// names the model).
const SUPPORTED: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "logprobs",
    "top_logprobs",
    "response_format",
    "user",
    "stream",
];

/// A request line as a record.
pub fn build(row: u64, obj: &Map<String, Value>, defaults: &GenerationParams) -> InputRecord {
    let (id, body) = match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => {
            let body = request(s, obj, defaults).map_err(RecordError::Field);
            (s.clone(), body)
        }
        other => (
            format!("#row-{row}"),
            Err(RecordError::Field(format!(
                "request at row {row}: `custom_id` is {}, expected a non-empty string",
                other.map_or("missing".to_string(), describe)
            ))),
        ),
    };
    InputRecord::new(row, id, body)
}

fn request(
    id: &str,
    obj: &Map<String, Value>,
    defaults: &GenerationParams,
) -> Result<RecordBody, String> {
    let err = |m: String| format!("record {id}: {m}");
    if let Some(m) = obj.get("method").filter(|m| m.as_str() != Some("POST")) {
        return Err(err(format!("`method` is {m}, expected \"POST\"")));
    }
    if let Some(u) = obj
        .get("url")
        .filter(|u| u.as_str() != Some("/v1/chat/completions"))
    {
        return Err(err(format!(
            "`url` is {u}, expected \"/v1/chat/completions\" (runner serves chat completions)"
        )));
    }
    let body = obj
        .get("body")
        .and_then(Value::as_object)
        .ok_or_else(|| err("`body` is missing or not an object".into()))?;
    if let Some(k) = body.keys().find(|k| !SUPPORTED.contains(&k.as_str())) {
        return Err(err(format!("body.{k} is not supported by runner")));
    }
    if body.get("stream").is_some_and(|s| s != &Value::Bool(false)) {
        return Err(err(
            "body.stream is not supported by runner (a batch is not streamed)".into(),
        ));
    }
    let messages = messages(body).map_err(err)?;
    let params = params(body, defaults).map_err(err)?;
    params.validate(&format!("record {id}: "))?;
    Ok(RecordBody {
        prompt: PromptInput::Messages {
            system: None,
            messages,
        },
        params,
        reference: None,
        continuation: None,
    })
}

/// `body.messages`: roles and text contents (a string, or a list of
/// `{"type": "text", "text": ...}` parts, joined).
fn messages(body: &Map<String, Value>) -> Result<Vec<Message>, String> {
    let list = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|l| !l.is_empty())
        .ok_or("body.messages is missing or not a non-empty list")?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or(format!("body.messages[{i}].role is not a string"))?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => text_parts(i, parts)?,
                other => {
                    return Err(format!(
                        "body.messages[{i}].content is {}, expected a string or text parts",
                        other.map_or("missing".to_string(), describe)
                    ))
                }
            };
            if let Some(k) = ["tool_calls", "function_call", "audio"]
                .iter()
                .find(|k| m.get(**k).is_some())
            {
                return Err(format!("body.messages[{i}].{k} is not supported by runner"));
            }
            Ok(Message {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

fn text_parts(i: usize, parts: &[Value]) -> Result<String, String> {
    parts
        .iter()
        .enumerate()
        .map(
            |(j, p)| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                (t, _) => Err(format!(
                    "body.messages[{i}].content[{j}] is a {} part; runner reads text parts only",
                    t.unwrap_or("typeless")
                )),
            },
        )
        .collect()
}

/// The body's sampling fields over the job's defaults.
fn params(
    body: &Map<String, Value>,
    defaults: &GenerationParams,
) -> Result<GenerationParams, String> {
    let mut p = defaults.clone();
    let num = |k: &str| -> Result<Option<f64>, String> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or(format!("body.{k} is {}, expected a number", describe(v))),
        }
    };
    let int = |k: &str| -> Result<Option<u64>, String> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or(format!(
                "body.{k} is {}, expected an integer >= 0",
                describe(v)
            )),
        }
    };
    if let Some(n) = int("max_completion_tokens")?.or(int("max_tokens")?) {
        p.max_new_tokens = n as usize;
    }
    if let Some(t) = num("temperature")? {
        p.temperature = t;
    }
    if let Some(t) = num("top_p")? {
        p.top_p = t;
    }
    if let Some(s) = int("seed")? {
        p.seed = s;
    }
    if let Some(n) = int("n")? {
        p.n = n as usize;
    }
    match body.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => p.stop = vec![s.clone()],
        Some(Value::Array(l)) => {
            p.stop = l
                .iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or("body.stop is a list with a non-string entry")?;
        }
        Some(v) => {
            return Err(format!(
                "body.stop is {}, expected a string or a list",
                describe(v)
            ))
        }
    }
    if p.stop.iter().any(String::is_empty) {
        return Err("body.stop holds an empty string".into());
    }
    let top = int("top_logprobs")?.map(|k| k as usize);
    match (body.get("logprobs"), top) {
        (Some(Value::Bool(true)), k) => p.logprobs = Some(k.unwrap_or(0)),
        (None | Some(Value::Bool(false)) | Some(Value::Null), None) => {}
        (None | Some(Value::Bool(false)) | Some(Value::Null), Some(_)) => {
            return Err("body.top_logprobs needs body.logprobs = true".into())
        }
        (Some(v), _) => {
            return Err(format!(
                "body.logprobs is {}, expected a boolean",
                describe(v)
            ))
        }
    }
    if p.logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
        return Err(format!(
            "body.top_logprobs is {}, expected at most {MAX_LOGPROBS}",
            top.unwrap_or(0)
        ));
    }
    if let Some(c) = response_format(body)? {
        p.constraint = Some(c);
    }
    Ok(p)
}

/// `body.response_format`: `text`, `json_object` or `json_schema`.
fn response_format(body: &Map<String, Value>) -> Result<Option<Constraint>, String> {
    let Some(rf) = body.get("response_format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonSchema("{\"type\":\"object\"}".into()))),
        Some("json_schema") => {
            let schema = rf
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or("body.response_format.json_schema.schema is missing")?;
            Constraint::json_schema_value(schema)
                .map(Some)
                .map_err(|e| format!("body.response_format.json_schema.schema {e}"))
        }
        other => Err(format!(
            "body.response_format.type is {}, expected \"text\", \"json_object\" or \"json_schema\"",
            other.unwrap_or("missing")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(line: &str) -> InputRecord {
        let v: Value = serde_json::from_str(line).unwrap();
        build(3, v.as_object().unwrap(), &GenerationParams::default())
    }

    #[test]
    fn a_request_line_becomes_a_record_with_its_settings() {
        let r = rec(
            r#"{"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
            "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 4, "stop": "END",
            "n": 3, "logprobs": true, "top_logprobs": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": true}}}}"#,
        );
        assert_eq!(r.id, "req-1");
        let b = r.body.unwrap();
        let PromptInput::Messages { messages, .. } = &b.prompt else {
            panic!("messages expected")
        };
        assert_eq!(messages[1].content, "Hi there");
        let p = &b.params;
        assert_eq!(
            (p.max_new_tokens, p.temperature, p.top_p, p.seed, p.n),
            (7, 0.5, 0.9, 4, 3)
        );
        assert_eq!(
            (p.stop.clone(), p.logprobs),
            (vec!["END".to_string()], Some(2))
        );
        assert_eq!(
            p.constraint,
            Some(Constraint::JsonSchema("{\"type\":\"object\"}".into()))
        );
    }

    #[test]
    fn unsupported_fields_and_bad_lines_are_error_rows_naming_them() {
        let cases = [
            (
                r#"{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}}"#,
                "record a: body.presence_penalty is not supported",
            ),
            (
                r#"{"custom_id": "b", "url": "/v1/embeddings", "body": {}}"#,
                "record b: `url` is \"/v1/embeddings\"",
            ),
            (
                r#"{"custom_id": "c", "body": {"messages": []}}"#,
                "record c: body.messages is missing",
            ),
            (
                r#"{"custom_id": "d", "body": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}}"#,
                "record d: body.messages[0].content[0] is a image_url part",
            ),
            (
                r#"{"custom_id": "e", "body": {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}}"#,
                "needs body.logprobs = true",
            ),
            (
                r#"{"body": {}}"#,
                "request at row 3: `custom_id` is missing",
            ),
        ];
        for (line, want) in cases {
            let r = rec(line);
            let e = r.body.unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
    }
}
