//! Dataset generation (issue 13) through the real CLI.

use crate::common::{error_line, fixtures, rows, runner, Row, ALL_MODELS};
use std::collections::BTreeMap;
use std::path::Path;

/// Writes `input` and a job over it with `extra` job text; runs it.
fn job(
    dir: &Path,
    name: &str,
    input: &str,
    extra: &str,
) -> (crate::common::Run, std::path::PathBuf) {
    std::fs::write(dir.join(format!("{name}.jsonl")), input).unwrap();
    let out = dir.join(format!("out-{name}"));
    let job = dir.join(format!("{name}.toml"));
    std::fs::write(
        &job,
        format!(
            "[model]\nid = \"{}\"\ndtype = \"f32\"\n\n[input]\npath = \"{name}.jsonl\"\n{extra}\n[generation]\nmax_new_tokens = 4\n\n[output]\npath = \"{}\"\ninclude_token_ids = true\n",
            fixtures().join(ALL_MODELS[1]).display(),
            out.display()
        ),
    )
    .unwrap();
    (runner(dir, &["submit", job.to_str().unwrap()], &[]), out)
}

fn by_id(out: &Path) -> BTreeMap<String, Row> {
    rows(out).into_iter().map(|r| (r.id.clone(), r)).collect()
}

#[test]
fn a_template_over_columns_gives_the_prompt_it_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let records = [
        serde_json::json!({"id": "a", "question": "2+2?", "choices": ["3", "4"], "topic": "math"}),
        serde_json::json!({"id": "b", "question": "Capital of France?", "choices": ["Paris", "Rome"], "topic": "geo"}),
        serde_json::json!({"id": "c", "question": null, "choices": [], "topic": "none"}),
    ];
    let input: String = records.iter().map(|r| format!("{r}\n")).collect();
    let template = "[input]\ntemplate = '''Q: {{ question }}\nChoices: {{ choices | join(\", \") }}\nTopic: {{ topic | upper }}'''\n";
    // Written in the job text above, the template sits inside the [input] table.
    let (run, out) = job(
        tmp.path(),
        "templ",
        &input,
        &template.replace("[input]\n", ""),
    );
    assert!(run.ok, "{}", run.stderr);
    let templ = by_id(&out);
    // The same prompts, written out by hand.
    let plain = [
        serde_json::json!({"id": "a", "prompt": "Q: 2+2?\nChoices: 3, 4\nTopic: MATH"}),
        serde_json::json!({"id": "b", "prompt": "Q: Capital of France?\nChoices: Paris, Rome\nTopic: GEO"}),
    ];
    let input: String = plain.iter().map(|r| format!("{r}\n")).collect();
    let (run, out) = job(tmp.path(), "plain", &input, "");
    assert!(run.ok, "{}", run.stderr);
    let plain = by_id(&out);
    for id in ["a", "b"] {
        assert_eq!(
            (templ[id].prompt_tokens, &templ[id].token_ids),
            (plain[id].prompt_tokens, &plain[id].token_ids),
            "record {id}"
        );
    }
    // A null cell is that record's error row.
    assert_eq!(templ["c"].status, "error");
    let e = templ["c"].error.as_deref().unwrap();
    assert!(e.contains("`question`") && e.contains("null"), "{e}");
}

#[test]
fn a_template_column_the_input_lacks_fails_before_the_model_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, out) = job(
        tmp.path(),
        "lacks",
        "{\"id\": 1, \"question\": \"hi\"}\n",
        "template = \"{{ question }} ({{ topic }})\"\n",
    );
    let e = error_line(&run);
    assert_eq!(run.code, Some(2), "{e}");
    assert!(e.contains("input.template reads column `topic`"), "{e}");
    assert!(!run.stderr.contains("model loaded"), "{}", run.stderr);
    assert!(!out.exists());
}

/// id -> (source, tags) from an output's passthrough columns.
fn passthrough_of(out: &Path) -> BTreeMap<String, (Option<String>, Vec<i64>)> {
    use arrow::array::{Array, AsArray};
    let mut m = BTreeMap::new();
    for b in crate::common::read_output(out) {
        let schema = b.schema();
        assert_eq!(
            schema.field_with_name("source").unwrap().data_type(),
            &arrow::datatypes::DataType::Utf8
        );
        assert!(matches!(
            schema.field_with_name("tags").unwrap().data_type(),
            arrow::datatypes::DataType::List(f) if f.data_type() == &arrow::datatypes::DataType::Int64
        ));
        let id = b.column_by_name("id").unwrap().as_string::<i32>().clone();
        let src = b
            .column_by_name("source")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let tags = b.column_by_name("tags").unwrap().as_list::<i32>().clone();
        for i in 0..b.num_rows() {
            let t = tags.value(i);
            let t = t.as_primitive::<arrow::datatypes::Int64Type>();
            m.insert(
                id.value(i).to_string(),
                (
                    (!src.is_null(i)).then(|| src.value(i).to_string()),
                    t.values().to_vec(),
                ),
            );
        }
    }
    m
}

#[test]
fn passthrough_columns_round_trip_with_their_types() {
    use arrow::array::{ArrayRef, ListArray, RecordBatch, StringArray};
    use arrow::datatypes::Int64Type;
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let want: BTreeMap<String, (Option<String>, Vec<i64>)> = [
        ("a", Some("wiki"), vec![1, 2, 3]),
        ("b", None, vec![]),
        ("c", Some("books"), vec![-7]),
    ]
    .into_iter()
    .map(|(id, s, t)| (id.to_string(), (s.map(str::to_string), t)))
    .collect();
    // Parquet: the file's own types.
    let ids: Vec<&str> = want.keys().map(|k| k.as_str()).collect();
    let batch = RecordBatch::try_from_iter([
        ("id", Arc::new(StringArray::from(ids.clone())) as ArrayRef),
        (
            "prompt",
            Arc::new(StringArray::from(vec!["hi", "yo", "hey"])) as ArrayRef,
        ),
        (
            "source",
            Arc::new(StringArray::from(
                want.values().map(|v| v.0.clone()).collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
        (
            "tags",
            Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(
                want.values()
                    .map(|v| Some(v.1.iter().map(|&x| Some(x)).collect::<Vec<_>>())),
            )) as ArrayRef,
        ),
    ])
    .unwrap();
    let f = std::fs::File::create(tmp.path().join("pt.parquet")).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let out = tmp.path().join("out-pq");
    std::fs::write(
        tmp.path().join("pq.toml"),
        format!(
            "[model]\nid = \"{}\"\n\n[input]\npath = \"pt.parquet\"\n\n[generation]\nmax_new_tokens = 2\n\n[output]\npath = \"{}\"\npassthrough_columns = [\"source\", \"tags\"]\n",
            fixtures().join(ALL_MODELS[1]).display(),
            out.display()
        ),
    )
    .unwrap();
    let run = runner(tmp.path(), &["submit", "pq.toml"], &[]);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(passthrough_of(&out), want);
    // JSONL: the types arrow-json infers (string, list<int64>).
    let lines: String = want
        .iter()
        .zip(["hi", "yo", "hey"])
        .map(|((id, (s, t)), p)| {
            format!(
                "{}\n",
                serde_json::json!({"id": id, "prompt": p, "source": s, "tags": t})
            )
        })
        .collect();
    std::fs::write(tmp.path().join("pt.jsonl"), lines).unwrap();
    let job_text = std::fs::read_to_string(tmp.path().join("pq.toml")).unwrap();
    std::fs::write(
        tmp.path().join("jl.toml"),
        job_text
            .replace("pt.parquet", "pt.jsonl")
            .replace("out-pq", "out-jl"),
    )
    .unwrap();
    let run = runner(tmp.path(), &["submit", "jl.toml"], &[]);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(passthrough_of(&tmp.path().join("out-jl")), want);
    // A passthrough column the input lacks fails before the model loads.
    let bad = runner(
        tmp.path(),
        &[
            "validate",
            "pq.toml",
            "--set",
            "output.passthrough_columns=[\"nope\"]",
        ],
        &[],
    );
    let e = error_line(&bad);
    assert!(e.contains("output.passthrough_columns names `nope`"), "{e}");
}

/// The log-probability columns as written: their Arrow types, one value
/// per generated token, a null first prompt token, greedy top-1 = token.
#[test]
fn logprob_columns_are_written_with_their_types() {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Float32Type;
    let tmp = tempfile::tempdir().unwrap();
    let input = "{\"id\": \"a\", \"prompt\": \"Name a colour.\"}\n{\"id\": \"b\", \"prompt\": \"Count to three.\"}\n";
    let (run, out) = job(tmp.path(), "lp", input, "");
    assert!(run.ok, "{}", run.stderr);
    let with = runner(
        tmp.path(),
        &[
            "submit",
            "lp.toml",
            "--set",
            "output.path=out-lp2",
            "--set",
            "output.logprobs=3",
            "--set",
            "output.prompt_logprobs=true",
            "--set",
            "generation.n=2",
        ],
        &[],
    );
    assert!(with.ok, "{}", with.stderr);
    let plain = by_id(&out);
    let batches = crate::common::read_output(&tmp.path().join("out-lp2"));
    let schema = batches[0].schema();
    let ty = |n: &str| schema.field_with_name(n).unwrap().data_type().to_string();
    assert_eq!(ty("completion_logprobs"), "List(Float32)");
    assert_eq!(
        ty("completion_top_logprobs"),
        "List(List(Struct(\"token_id\": non-null Int32, \"logprob\": non-null Float32)))"
    );
    assert_eq!(ty("prompt_logprobs"), "List(Float32)");
    let mut seen = 0;
    for b in &batches {
        let ids = b.column_by_name("id").unwrap().as_string::<i32>();
        let toks = b
            .column_by_name("completion_token_ids")
            .unwrap()
            .as_list::<i32>();
        let chosen = b
            .column_by_name("completion_logprobs")
            .unwrap()
            .as_list::<i32>();
        let top = b
            .column_by_name("completion_top_logprobs")
            .unwrap()
            .as_list::<i32>();
        let prompt = b
            .column_by_name("prompt_logprobs")
            .unwrap()
            .as_list::<i32>();
        for i in 0..b.num_rows() {
            let want = &plain[ids.value(i)];
            let t = toks.value(i);
            let t = t.as_primitive::<arrow::datatypes::UInt32Type>().values();
            assert_eq!(
                t.to_vec(),
                want.token_ids,
                "greedy samples equal the plain run"
            );
            let c = chosen.value(i);
            let c = c.as_primitive::<Float32Type>();
            assert_eq!(c.len(), t.len());
            assert!(c.values().iter().all(|v| *v <= 0.0 && v.is_finite()));
            let steps = top.value(i);
            let steps = steps.as_list::<i32>();
            assert_eq!(steps.len(), t.len());
            for s in 0..steps.len() {
                let entries = steps.value(s);
                let entries = entries.as_struct();
                assert_eq!(entries.len(), 3);
                let first = entries
                    .column(0)
                    .as_primitive::<arrow::datatypes::Int32Type>()
                    .value(0);
                assert_eq!(first as u32, t[s], "greedy: the top-1 is the token");
            }
            let p = prompt.value(i);
            let p = p.as_primitive::<Float32Type>();
            assert_eq!(p.len() as u32, want.prompt_tokens);
            assert!(p.is_null(0) && (1..p.len()).all(|j| p.is_valid(j)));
            seen += 1;
        }
    }
    assert_eq!(seen, 4, "two records x two samples");
}

/// README's worked example, `jobs/datagen.toml`, on a fixture model: a
/// template over three columns, n = 4, a JSON schema, log-probabilities and
/// two passthrough columns, all in one output.
#[test]
fn the_datagen_example_job_runs_as_documented() {
    use arrow::array::AsArray;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("datagen");
    let job = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs/datagen.toml");
    let model = format!("model.id=\"{}\"", fixtures().join(ALL_MODELS[1]).display());
    let path = format!("output.path=\"{}\"", out.display());
    let run = runner(
        tmp.path(),
        &[
            "submit",
            job.to_str().unwrap(),
            "--set",
            &model,
            "--set",
            "model.dtype=f32",
            "--set",
            &path,
        ],
        &[],
    );
    assert!(run.ok, "{}", run.stderr);
    let batches = crate::common::read_output(&out);
    let schema = batches[0].schema();
    for col in [
        "sample_index",
        "schema_valid",
        "completion_logprobs",
        "completion_top_logprobs",
        "topic",
        "choices",
    ] {
        assert!(schema.field_with_name(col).is_ok(), "no `{col}` column");
    }
    let all = rows(&out);
    assert_eq!(all.len(), 6 * 4, "six questions, four samples each");
    let mut per: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for r in &all {
        assert_eq!(r.status, "ok", "{:?}", r.error);
        per.entry(r.id.clone()).or_default().push(r.sample_index);
    }
    for (id, mut s) in per {
        s.sort();
        assert_eq!(s, [0, 1, 2, 3], "{id}");
    }
    for b in &batches {
        let fr = b
            .column_by_name("finish_reason")
            .unwrap()
            .as_string::<i32>();
        let comp = b.column_by_name("completion").unwrap().as_string::<i32>();
        let valid = b.column_by_name("schema_valid").unwrap().as_boolean();
        for i in 0..b.num_rows() {
            if fr.value(i) == "stop" {
                assert!(valid.value(i));
                let v: serde_json::Value = serde_json::from_str(comp.value(i)).unwrap();
                assert!(v["confidence"]
                    .as_i64()
                    .is_some_and(|c| (0..=100).contains(&c)));
            }
        }
    }
}
