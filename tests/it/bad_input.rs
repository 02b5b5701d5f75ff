//! The bad-input corpus (tests/data/bad_input, made by make.py there): each
//! class becomes an error row naming the record, the field and what was
//! expected, and the job goes on (the good record beside it is ok).

use crate::common::{fixtures, rows, runner, write_job, ALL_MODELS};
use std::path::Path;

/// (file, the bad row's expected error).
const CASES: &[(&str, &str)] = &[
    ("malformed_json.jsonl", "record at line 1: malformed JSON: "),
    (
        "invalid_utf8.jsonl",
        "record at line 1: invalid UTF-8 at byte 28",
    ),
    (
        "invalid_utf8.parquet",
        "record bad: `prompt` is binary that is not UTF-8, expected a string",
    ),
    (
        "missing_prompt.jsonl",
        "record bad: `prompt` is missing or null, expected a string (or a `messages` list)",
    ),
    (
        "missing_prompt.parquet",
        "record bad: `prompt` is missing or null, expected a string (or a `messages` list)",
    ),
    (
        "null_prompt.jsonl",
        "record bad: `prompt` is missing or null, expected a string (or a `messages` list)",
    ),
    (
        "null_prompt.parquet",
        "record bad: `prompt` is missing or null, expected a string (or a `messages` list)",
    ),
    (
        "wrong_type.jsonl",
        "record bad: `prompt` is a number, expected a string",
    ),
    (
        "wrong_type.parquet",
        "record bad: `temperature` is a string, expected a number",
    ),
    ("empty_prompt.jsonl", "record bad: `prompt` is empty"),
    ("empty_prompt.parquet", "record bad: `prompt` is empty"),
    (
        "too_long.jsonl",
        "record bad: prompt has 411 tokens, max_prompt_tokens is 64",
    ),
    (
        "too_long.parquet",
        "record bad: prompt has 411 tokens, max_prompt_tokens is 64",
    ),
    (
        "param_out_of_range.jsonl",
        "record bad: temperature is -1, expected a finite value >= 0",
    ),
    (
        "param_out_of_range.parquet",
        "record bad: temperature is -1, expected a finite value >= 0",
    ),
];

#[test]
fn every_bad_record_class_becomes_an_error_row_and_the_job_goes_on() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bad_input");
    let model = fixtures().join(ALL_MODELS[1]);
    for (file, want) in CASES {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(corpus.join(file), tmp.path().join(file)).unwrap();
        let j = write_job(
            tmp.path(),
            &model,
            file,
            "[generation]\nmax_new_tokens = 4\n\n[output]\npath = \"out\"\n\n[engine]\nmax_prompt_tokens = 64\n",
        );
        let run = runner(tmp.path(), &["submit", j.to_str().unwrap()], &[]);
        assert!(run.ok, "{file}: the job died:\n{}", run.stderr);
        let out = rows(&tmp.path().join("out"));
        assert_eq!(out.len(), 2, "{file}: one row per record");
        let good = out.iter().find(|r| r.id == "good").expect("good row");
        assert_eq!(good.status, "ok", "{file}: good record {:?}", good.error);
        let bad = out.iter().find(|r| r.id != "good").expect("bad row");
        assert_eq!(bad.status, "error", "{file}");
        assert_eq!(bad.finish_reason, "error", "{file}");
        assert!(bad.completion.is_none(), "{file}");
        let e = bad.error.as_deref().unwrap_or("");
        assert!(
            e.starts_with(want),
            "{file}: error row says `{e}`, expected `{want}`"
        );
    }
}
