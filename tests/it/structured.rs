//! Structured output (`generation.json_schema`, `regex`, a record's
//! `json_schema`) on a fixture model with random-ish weights: every row
//! that finished with `stop` parses and validates against its schema, checked
//! by an independent validator (Python's `jsonschema` from PyPI).

use crate::common::{error_line, fixtures, read_output, runner, ALL_MODELS};
use arrow::array::{Array, AsArray};
use std::path::Path;

const SCHEMA: &str = r#"{"type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "colour": {"enum": ["red", "green", "blue"]}}, "required": ["name", "age", "colour"], "additionalProperties": false}"#;

/// (id, completion, finish_reason, schema_valid) of every row.
fn constrained_rows(out: &Path) -> Vec<(String, Option<String>, String, Option<bool>)> {
    let mut v = Vec::new();
    for b in read_output(out) {
        let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
        let (id, comp, fr) = (s("id"), s("completion"), s("finish_reason"));
        let valid = b
            .column_by_name("schema_valid")
            .expect("schema_valid column");
        let valid = valid.as_boolean();
        for i in 0..b.num_rows() {
            v.push((
                id.value(i).to_string(),
                (!comp.is_null(i)).then(|| comp.value(i).to_string()),
                fr.value(i).to_string(),
                (!valid.is_null(i)).then(|| valid.value(i)),
            ));
        }
    }
    v
}

fn write_job(dir: &Path, name: &str, input: &str, generation: &str) -> std::path::PathBuf {
    std::fs::write(dir.join(format!("{name}.jsonl")), input).unwrap();
    let job = dir.join(format!("{name}.toml"));
    std::fs::write(
        &job,
        format!(
            "[model]\nid = \"{}\"\ndtype = \"f32\"\n\n[input]\npath = \"{name}.jsonl\"\n\n[generation]\n{generation}\n\n[output]\npath = \"out-{name}\"\n",
            fixtures().join(ALL_MODELS[1]).display(),
        ),
    )
    .unwrap();
    job
}

/// Validates each completion against `schema` with Python's jsonschema.
fn validate_with_python(dir: &Path, schema: &str, docs: &[String]) {
    let (python, path) = crate::common::python_with("jsonschema");
    std::fs::write(dir.join("schema.json"), schema).unwrap();
    std::fs::write(dir.join("docs.json"), serde_json::to_string(docs).unwrap()).unwrap();
    let script = "import json, jsonschema\nschema = json.load(open('schema.json'))\nfor d in json.load(open('docs.json')):\n    jsonschema.validate(json.loads(d), schema)\nprint('valid', len(json.load(open('docs.json'))))\n";
    let mut cmd = std::process::Command::new(python);
    cmd.current_dir(dir).args(["-c", script]);
    if let Some(p) = path {
        cmd.env("PYTHONPATH", p);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "jsonschema rejects a completion: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_stopped_row_of_a_json_schema_job_validates() {
    json_schema_job_on(&[]);
}

/// Runs the JSON-schema job with `sets` added (the GPU's device and
/// dtype), checks its rows; then an array schema that 40 tokens cannot
/// finish, greedy and sampled at top-k 20 (the device's routes).
pub fn json_schema_job_on(sets: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let mut input = String::new();
    for i in 0..8 {
        let r = serde_json::json!({"id": format!("p{i}"), "prompt": format!("Describe person {i} as JSON.")});
        input.push_str(&format!("{r}\n"));
    }
    // One record whose completion cannot finish in 4 tokens.
    input.push_str(
        "{\"id\": \"short\", \"prompt\": \"Describe someone.\", \"max_new_tokens\": 4}\n",
    );
    let generation = format!(
        "max_new_tokens = 64\ntemperature = 0.8\nseed = 5\nn = 2\njson_schema = '''{SCHEMA}'''"
    );
    let job = write_job(tmp.path(), "js", &input, &generation);
    let submit = |job: &Path| {
        let mut args = vec!["submit", job.to_str().unwrap()];
        for s in sets {
            args.extend(["--set", s]);
        }
        let run = runner(tmp.path(), &args, &[]);
        assert!(run.ok, "{}", run.stderr);
    };
    submit(&job);
    let rows = constrained_rows(&tmp.path().join("out-js"));
    assert_eq!(rows.len(), 18);
    let mut docs = Vec::new();
    for (id, comp, fr, valid) in &rows {
        match fr.as_str() {
            "stop" => {
                assert_eq!(*valid, Some(true), "{id}: {comp:?}");
                docs.push(comp.clone().unwrap());
            }
            "length" => assert_eq!(*valid, Some(false), "{id}: {comp:?}"),
            other => panic!("{id}: finish_reason {other}"),
        }
    }
    let short: Vec<_> = rows.iter().filter(|r| r.0 == "short").collect();
    assert!(short.iter().all(|r| r.2 == "length" && r.3 == Some(false)));
    assert!(docs.len() >= 12, "most rows finish: {rows:?}");
    for d in &docs {
        check_person(d);
    }
    // The independent validator needs PyPI, which the GPU machines lack.
    if sets.is_empty() {
        validate_with_python(tmp.path(), SCHEMA, &docs);
    }
    for (name, sampling) in [
        ("greedy", ""),
        ("topk", "temperature = 0.7\ntop_k = 20\nseed = 2\n"),
    ] {
        let generation =
            format!("max_new_tokens = 40\nignore_eos = true\n{sampling}json_schema = '''{LONG}'''");
        let job = write_job(tmp.path(), name, &input, &generation);
        submit(&job);
        for (id, comp, fr, valid) in constrained_rows(&tmp.path().join(format!("out-{name}"))) {
            let comp = comp.unwrap();
            assert_eq!(
                (fr.as_str(), valid),
                ("length", Some(false)),
                "{name} {id}: {comp}"
            );
            let head = "[{\"name\": \"";
            assert!(
                comp.starts_with(head) || head.starts_with(comp.as_str()),
                "{name} {id}: {comp}"
            );
        }
    }
}

/// `SCHEMA` checked by hand (where Python's jsonschema cannot be had).
fn check_person(doc: &str) {
    let v: serde_json::Value = serde_json::from_str(doc).unwrap_or_else(|e| panic!("{e}: {doc}"));
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {doc}"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["age", "colour", "name"], "{doc}");
    let name = o["name"].as_str().unwrap_or_else(|| panic!("{doc}"));
    assert!((1..=8).contains(&name.chars().count()), "{doc}");
    assert!(o["age"].as_u64().is_some_and(|a| a <= 120), "{doc}");
    assert!(
        ["red", "green", "blue"].contains(&o["colour"].as_str().unwrap_or("")),
        "{doc}"
    );
}

/// At least 20 objects: 40 tokens never finish it.
const LONG: &str = r#"{"type": "array", "minItems": 20, "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150}, "tag": {"enum": ["alpha", "beta", "gamma"]}}, "required": ["name", "age", "tag"], "additionalProperties": false}}"#;

#[test]
fn a_regex_job_matches_whole_and_a_record_schema_that_is_not_json_is_its_error_row() {
    let tmp = tempfile::tempdir().unwrap();
    let input = "{\"id\": \"a\", \"prompt\": \"Name and number?\"}\n{\"id\": \"b\", \"prompt\": \"Another?\"}\n";
    let job = write_job(
        tmp.path(),
        "rx",
        input,
        "max_new_tokens = 32\ntemperature = 0.9\nseed = 3\nregex = '[A-Z][a-z]{2,6} [0-9]{1,3}'",
    );
    let run = runner(tmp.path(), &["submit", job.to_str().unwrap()], &[]);
    assert!(run.ok, "{}", run.stderr);
    let re = regex::Regex::new("^[A-Z][a-z]{2,6} [0-9]{1,3}$").unwrap();
    for (id, comp, fr, valid) in constrained_rows(&tmp.path().join("out-rx")) {
        let comp = comp.unwrap();
        assert_eq!((fr.as_str(), valid), ("stop", Some(true)), "{id}: {comp}");
        assert!(re.is_match(&comp), "{id}: `{comp}`");
    }
    // Per-record schemas: one is not JSON.
    let input = format!(
        "{}\n{}\n",
        serde_json::json!({"id": "ok", "prompt": "Person?", "json_schema": SCHEMA}),
        serde_json::json!({"id": "bad", "prompt": "Person?", "json_schema": "{not json"}),
    );
    let job = write_job(tmp.path(), "per", &input, "max_new_tokens = 64\nseed = 1");
    let run = runner(tmp.path(), &["submit", job.to_str().unwrap()], &[]);
    assert!(run.ok, "{}", run.stderr);
    let rows = constrained_rows(&tmp.path().join("out-per"));
    let bad = rows.iter().find(|r| r.0 == "bad").unwrap();
    assert_eq!((bad.2.as_str(), bad.3), ("error", None));
    let ok = rows.iter().find(|r| r.0 == "ok").unwrap();
    if ok.2 == "stop" {
        validate_with_python(tmp.path(), SCHEMA, &[ok.1.clone().unwrap()]);
    }
    let errs = crate::common::rows(&tmp.path().join("out-per"));
    let e = errs
        .iter()
        .find(|r| r.id == "bad")
        .unwrap()
        .error
        .clone()
        .unwrap();
    assert!(
        e.contains("record bad") && e.contains("`json_schema` is not JSON"),
        "{e}"
    );
}

#[test]
fn a_job_schema_that_is_not_a_schema_or_two_constraints_fail_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let input = "{\"id\": \"a\", \"prompt\": \"hi\"}\n";
    let job = write_job(tmp.path(), "bad", input, "json_schema = '[1, 2]'");
    let run = runner(tmp.path(), &["validate", job.to_str().unwrap()], &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    let e = error_line(&run);
    assert!(
        e.contains("generation.json_schema is not a JSON Schema"),
        "{e}"
    );
    let job = write_job(tmp.path(), "two", input, "json_schema = '{}'\nregex = 'a+'");
    let run = runner(tmp.path(), &["validate", job.to_str().unwrap()], &[]);
    let e = error_line(&run);
    assert!(
        e.contains("generation.json_schema and generation.regex"),
        "{e}"
    );
}
