//! Property tests of the input readers: on any JSONL bytes and any mix of
//! Parquet column types they never panic and account for every record
//! (one record or error record per non-blank line / per row, in order).

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use proptest::prelude::*;
use runner::config::{GenerationParams, InputFormat, InputSpec};
use std::sync::Arc;

fn spec(path: &std::path::Path, format: InputFormat) -> InputSpec {
    InputSpec {
        template: None,
        passthrough: vec![],
        path: path.to_path_buf(),
        format,
        id_column: "id".into(),
        prompt_column: "prompt".into(),
        messages_column: "messages".into(),
        system_column: "system".into(),
        reference_column: "reference".into(),
        continuation_column: "continuation".into(),
    }
}

fn defaults() -> GenerationParams {
    GenerationParams {
        max_new_tokens: 8,
        ..Default::default()
    }
}

/// Writes one batch as a Parquet file.
fn write_parquet(p: &std::path::Path, batch: &RecordBatch) {
    let f = std::fs::File::create(p).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// A JSONL line: a plausible record, a record with wrong types, JSON that
/// is not an object, garbage text, or raw bytes (often not UTF-8).
fn line() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just(serde_json::Value::Null),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)),
        ".{0,20}".prop_map(serde_json::Value::from),
        prop::collection::vec(".{0,5}", 0..3).prop_map(serde_json::Value::from),
    ];
    let key = prop_oneof![
        Just("id".to_string()),
        Just("prompt".to_string()),
        Just("messages".to_string()),
        Just("temperature".to_string()),
        Just("max_new_tokens".to_string()),
        "[a-z]{1,6}",
    ];
    prop_oneof![
        prop::collection::btree_map(key, value.clone(), 0..5)
            .prop_map(|m| serde_json::to_vec(&m).unwrap()),
        value.prop_map(|v| serde_json::to_vec(&v).unwrap()),
        "[^\n]{0,40}".prop_map(|s| s.into_bytes()),
        prop::collection::vec(
            any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
            0..40
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn jsonl_reader_accounts_for_every_line(lines in prop::collection::vec(line(), 0..30)) {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("in.jsonl");
        std::fs::write(&p, lines.join(&b'\n')).unwrap();
        let expected = lines.iter().filter(|l| !l.iter().all(|b| b.is_ascii_whitespace())).count();
        let recs: Vec<_> = runner::input::open(&spec(&p, InputFormat::Jsonl), &defaults())
            .unwrap()
            .collect();
        prop_assert_eq!(recs.len(), expected);
        for (i, r) in recs.into_iter().enumerate() {
            let r = r.expect("no job-level error on readable files");
            prop_assert_eq!(r.row, i as u64);
            if let Err(e) = &r.body {
                let e = e.to_string();
                prop_assert!(e.starts_with("record "), "error rows name the record: {}", e);
            }
        }
    }

    #[test]
    fn parquet_reader_accounts_for_every_row(
        rows in prop::collection::vec(
            (prop::option::of("[a-z0-9]{1,8}"), prop::option::of(".{0,30}"), prop::option::of(-2.0f64..3.0), prop::option::of(any::<i64>())),
            0..40),
        ids_as_ints in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("in.parquet");
        // Unique ids (duplicates are a job-level check, not the reader's).
        let id: ArrayRef = if ids_as_ints {
            Arc::new(Int64Array::from((0..rows.len() as i64).map(Some).collect::<Vec<_>>()))
        } else {
            Arc::new(StringArray::from(rows.iter().enumerate().map(|(i, r)| r.0.as_ref().map(|s| format!("{s}-{i}"))).collect::<Vec<_>>()))
        };
        let prompt: ArrayRef = Arc::new(StringArray::from(rows.iter().map(|r| r.1.clone()).collect::<Vec<_>>()));
        let temp: ArrayRef = Arc::new(Float64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>()));
        let mnt: ArrayRef = Arc::new(Int64Array::from(rows.iter().map(|r| r.3).collect::<Vec<_>>()));
        let batch = RecordBatch::try_from_iter([("id", id), ("prompt", prompt), ("temperature", temp), ("max_new_tokens", mnt)]).unwrap();
        write_parquet(&p, &batch);
        let recs: Vec<_> = runner::input::open(&spec(&p, InputFormat::Parquet), &defaults())
            .unwrap()
            .collect();
        prop_assert_eq!(recs.len(), rows.len());
        for (i, r) in recs.into_iter().enumerate() {
            let r = r.expect("no job-level error on readable files");
            prop_assert_eq!(r.row, i as u64);
            if let Err(e) = &r.body {
                let e = e.to_string();
                prop_assert!(e.starts_with("record "), "error rows name the record: {}", e);
            }
        }
    }
}

/// A NaN or infinite override cell is an error row naming the column, not
/// a silent fallback to the job default (engine v2 issue, item 8).
#[test]
fn non_finite_override_cells_become_error_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("in.parquet");
    let id: ArrayRef = Arc::new(Int64Array::from(vec![0, 1, 2, 3]));
    let prompt: ArrayRef = Arc::new(StringArray::from(vec!["a", "b", "c", "d"]));
    let temp: ArrayRef = Arc::new(Float64Array::from(vec![
        Some(f64::NAN),
        Some(f64::INFINITY),
        None,
        Some(0.5),
    ]));
    let batch = RecordBatch::try_from_iter([("id", id), ("prompt", prompt), ("temperature", temp)])
        .unwrap();
    write_parquet(&p, &batch);
    let recs: Vec<_> = runner::input::open(&spec(&p, InputFormat::Parquet), &defaults())
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    for (r, what) in recs[..2].iter().zip(["NaN", "inf"]) {
        let e = r.body.as_ref().unwrap_err().to_string();
        assert!(
            e.contains("`temperature` is a non-finite float") && e.contains(what),
            "{e}"
        );
    }
    // A null cell still means "the job default"; a finite one overrides.
    assert_eq!(recs[2].body.as_ref().unwrap().params.temperature, 0.0);
    assert_eq!(recs[3].body.as_ref().unwrap().params.temperature, 0.5);
}

/// Regression (new-user issue, item 4): a malformed line among small
/// integer ids once took its row number as its id and collided with a real
/// id (`duplicate record id 2`); its error row is `#line-N` now.
#[test]
fn a_malformed_line_never_collides_with_integer_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("in.jsonl");
    std::fs::write(
        &p,
        "{\"id\": 0, \"prompt\": \"a\"}\n{\"id\": 1, \"prompt\": \"b\"}\n{not json\n{\"id\": 2, \"prompt\": \"c\"}\n",
    )
    .unwrap();
    let recs: Vec<_> = runner::input::open(&spec(&p, InputFormat::Jsonl), &defaults())
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let ids: Vec<&str> = recs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["0", "1", "#line-3", "2"]);
    assert!(recs[2]
        .body
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("line 3"));
}
