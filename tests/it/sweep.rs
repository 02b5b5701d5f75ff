//! Sweeps over the fixture checkpoints (local paths standing for the quant
//! branches, the f16 model as baseline): the report's metric and agreement
//! figures against values computed here from the output rows, and a sweep
//! killed midway resuming the unfinished variant and skipping the finished.

use crate::common::{fixtures, runner, ALL_MODELS};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, UInt32Type};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const EVAL: &[(&str, &str, &str)] = &[
    ("q1", "What is 12 + 30? Answer with the number only.", "42"),
    ("q2", "What is the capital of France?", "fün"),
    ("q3", "Which is larger, 7 or 9?", "9"),
    ("q4", "Name a color.", "live"),
    ("q5", "Count to three.", "live fün fün fün fün fün fün fün"),
    ("q6", "Say yes.", "fün"),
    ("q7", "What is 2+2?", "4"),
    ("q8", "Spell cat.", "cat"),
];

/// Writes the eval set and a sweep job; `devices` goes to `sweep.devices`.
fn setup(dir: &Path, devices: &str) -> std::path::PathBuf {
    let mut s = String::new();
    for (id, p, r) in EVAL {
        s.push_str(&serde_json::json!({"id": id, "prompt": p, "reference": r}).to_string());
        s.push('\n');
    }
    std::fs::write(dir.join("eval.jsonl"), s).unwrap();
    let fx = fixtures();
    let models: Vec<String> = [1, 2, 3, 0]
        .iter()
        .map(|&i| format!("\"{}\"", fx.join(ALL_MODELS[i]).display()))
        .collect();
    let job = dir.join("sweep.toml");
    std::fs::write(
        &job,
        format!(
            "[model]\nid = \"{}\"\ndtype = \"f32\"\n\n[input]\npath = \"eval.jsonl\"\n\n[generation]\nmax_new_tokens = 8\n\n[output]\npath = \"sweep\"\n\n[scoring]\nmetrics = [\"exact_match\", \"contains\", \"regex_match\"]\nregex = '(\\w+)\\s*$'\n\n[sweep]\nmodels = [{}]\nbaseline = \"{}\"\ndevices = [{devices}]\n",
            fx.join(ALL_MODELS[0]).display(),
            models.join(", "),
            ALL_MODELS[0]
        ),
    )
    .unwrap();
    job
}

struct VRow {
    status: String,
    completion: Option<String>,
    reference: Option<String>,
    scores: BTreeMap<String, Option<f64>>,
    tokens: Vec<u32>,
}

fn variant_rows(dir: &Path) -> BTreeMap<String, VRow> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "parquet") {
            continue;
        }
        let f = std::fs::File::open(&p).unwrap();
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            let b = b.unwrap();
            let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
            let (id, st, comp, refc) = (s("id"), s("status"), s("completion"), s("reference"));
            let toks = b
                .column_by_name("completion_token_ids")
                .unwrap()
                .as_list::<i32>()
                .clone();
            for i in 0..b.num_rows() {
                let mut scores = BTreeMap::new();
                for m in ["exact_match", "contains", "regex_match"] {
                    let c = b
                        .column_by_name(&format!("score_{m}"))
                        .unwrap()
                        .as_primitive::<Float64Type>()
                        .clone();
                    scores.insert(m.to_string(), c.is_valid(i).then(|| c.value(i)));
                }
                out.insert(
                    id.value(i).to_string(),
                    VRow {
                        status: st.value(i).to_string(),
                        completion: comp.is_valid(i).then(|| comp.value(i).to_string()),
                        reference: refc.is_valid(i).then(|| refc.value(i).to_string()),
                        scores,
                        tokens: toks.value(i).as_primitive::<UInt32Type>().values().to_vec(),
                    },
                );
            }
        }
    }
    out
}

/// The job's normalisation, written independently.
fn norm(s: &str) -> String {
    let t: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn last_word(s: &str) -> Option<String> {
    regex::Regex::new(r"(\w+)\s*$")
        .unwrap()
        .captures(s)
        .map(|c| c[1].to_string())
}

fn report_rows(out: &Path) -> Vec<serde_json::Value> {
    let f = std::fs::File::open(out.join("_report/report.parquet")).unwrap();
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for b in r {
        let b = b.unwrap();
        for i in 0..b.num_rows() {
            let mut m = serde_json::Map::new();
            for (fi, field) in b.schema().fields().iter().enumerate() {
                let c = b.column(fi);
                let v = if !c.is_valid(i) {
                    serde_json::Value::Null
                } else if let Some(a) = c.as_any().downcast_ref::<arrow::array::Float64Array>() {
                    serde_json::json!(a.value(i))
                } else if let Some(a) = c.as_any().downcast_ref::<arrow::array::UInt64Array>() {
                    serde_json::json!(a.value(i))
                } else {
                    serde_json::json!(c.as_string::<i32>().value(i))
                };
                m.insert(field.name().clone(), v);
            }
            rows.push(serde_json::Value::Object(m));
        }
    }
    rows
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn sweep_report_matches_figures_computed_from_the_rows() {
    let tmp = tempfile::tempdir().unwrap();
    // Two workers run the four variants concurrently.
    let job = setup(tmp.path(), "\"cpu\", \"cpu\"");
    let run = runner(tmp.path(), &["submit", job.to_str().unwrap()], &[]);
    assert!(run.ok, "{}", run.stderr);
    let out = tmp.path().join("sweep");
    let base = variant_rows(&out.join(format!("variant={}", ALL_MODELS[0])));
    let report = report_rows(&out);
    assert_eq!(report.len(), 4);
    let mut nontrivial = 0;
    for r in &report {
        let name = r["variant"].as_str().unwrap();
        // Measured on the CPU: no GPU figure, blank rather than 0.00.
        assert!(
            r["peak_gpu_gib"].is_null(),
            "{name}: peak GPU {}",
            r["peak_gpu_gib"]
        );
        let rows = variant_rows(&out.join(format!("variant={name}")));
        assert_eq!(rows.len(), EVAL.len(), "{name}: every record");
        assert_eq!(r["records"], EVAL.len() as u64);
        assert_eq!(r["errors"], 0);
        // Metrics from the rows' text and references.
        for m in ["exact_match", "contains", "regex_match"] {
            let mut vals = Vec::new();
            for row in rows.values() {
                let (c, refr) = (
                    row.completion.as_deref().unwrap(),
                    row.reference.as_deref().unwrap(),
                );
                let hit = match m {
                    "exact_match" => norm(c) == norm(refr),
                    "contains" => norm(c).contains(&norm(refr)),
                    _ => last_word(c).is_some() && last_word(c) == last_word(refr),
                };
                let v = if hit { 1.0 } else { 0.0 };
                assert_eq!(row.scores[m], Some(v), "{name} {m}: a row's score");
                vals.push(v);
            }
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            assert!(
                close(r[&format!("{m}_mean")].as_f64().unwrap(), mean),
                "{name} {m}: mean"
            );
            if mean > 0.0 && mean < 1.0 {
                nontrivial += 1;
            }
            let sd = (vals.iter().map(|x| (x - mean).powi(2)).sum::<f64>()
                / (vals.len() - 1) as f64)
                .sqrt();
            assert!(
                close(
                    r[&format!("{m}_ci95")].as_f64().unwrap(),
                    1.96 * sd / (vals.len() as f64).sqrt()
                ),
                "{name} {m}: ci"
            );
        }
        // Agreement with the baseline's greedy tokens.
        let mut same = 0;
        let mut div = Vec::new();
        for (id, row) in &rows {
            let b = &base[id];
            assert_eq!((row.status.as_str(), b.status.as_str()), ("ok", "ok"));
            if row.tokens == b.tokens {
                same += 1;
            } else {
                let first = (0..row.tokens.len().min(b.tokens.len()))
                    .find(|&i| row.tokens[i] != b.tokens[i])
                    .unwrap_or(row.tokens.len().min(b.tokens.len()));
                div.push(first as f64);
            }
        }
        assert!(
            close(
                r["agreement"].as_f64().unwrap(),
                same as f64 / rows.len() as f64
            ),
            "{name}: agreement"
        );
        match r["mean_first_divergence"].as_f64() {
            Some(v) => assert!(
                close(v, div.iter().sum::<f64>() / div.len() as f64),
                "{name}: divergence"
            ),
            None => assert!(div.is_empty(), "{name}: divergence missing"),
        }
    }
    assert!(
        nontrivial > 0,
        "the eval set should give some metric strictly between 0 and 1"
    );
    let baseline = report
        .iter()
        .find(|r| r["variant"] == ALL_MODELS[0])
        .unwrap();
    assert_eq!(baseline["agreement"].as_f64(), Some(1.0));
    let md = std::fs::read_to_string(out.join("_report/report.md")).unwrap();
    assert!(
        md.contains("| variant | records | errors |") && md.contains(ALL_MODELS[2]),
        "{md}"
    );
    // The plot: an SVG with a title, axis labels and one coloured point per variant.
    let svg = std::fs::read_to_string(out.join("_report/report.svg"))
        .unwrap()
        .replace('\n', "");
    assert!(
        svg.contains(">output tok/s<") && svg.contains("against output tok/s"),
        "{svg}"
    );
    assert_eq!(svg.matches("<circle").count(), ALL_MODELS.len(), "{svg}");
    for c in &runner::report::plot::PALETTE[..ALL_MODELS.len()] {
        let hex = format!("#{:02X}{:02X}{:02X}", c[0], c[1], c[2]);
        assert!(svg.to_uppercase().contains(&hex), "a point of colour {hex}");
    }
    assert!(md.contains("](report.svg)"), "{md}");
    // `runner report` rebuilds the same figures from the data.
    std::fs::remove_file(out.join("_report/report.parquet")).unwrap();
    let run = runner(tmp.path(), &["report", out.to_str().unwrap()], &[]);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(report_rows(&out), report);
}

#[test]
fn a_sweep_killed_midway_resumes_the_unfinished_variant_and_skips_the_finished() {
    let tmp = tempfile::tempdir().unwrap();
    let job = setup(tmp.path(), "");
    let out = tmp.path().join("sweep");
    let bin = std::env::var_os("TEST_RUNNER_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_runner").into());
    let mut child = std::process::Command::new(bin)
        .current_dir(tmp.path())
        .args(["submit", job.to_str().unwrap()])
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let second = out.join(format!("variant={}", ALL_MODELS[2]));
    let t = Instant::now();
    while !second.join("_manifest.json").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "second variant never started"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let first = out.join(format!("variant={}", ALL_MODELS[1]));
    let files = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".parquet"))
            .collect();
        v.sort();
        v
    };
    let before = files(&first);
    let run = runner(tmp.path(), &["submit", job.to_str().unwrap()], &[]);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(
        run.stderr.matches("already complete").count(),
        1,
        "the finished variant is skipped:\n{}",
        run.stderr
    );
    assert_eq!(
        files(&first),
        before,
        "the finished variant's parts are untouched"
    );
    for m in [1, 2, 3, 0] {
        assert_eq!(
            variant_rows(&out.join(format!("variant={}", ALL_MODELS[m]))).len(),
            EVAL.len()
        );
    }
    assert_eq!(report_rows(&out).len(), 4);
}

#[test]
fn loglikelihood_mode_scores_continuations_without_generating() {
    let tmp = tempfile::tempdir().unwrap();
    let rows_in = [
        (
            "a",
            "What is the capital of France?",
            Some(" Paris is the capital."),
        ),
        ("b", "Count to three.", Some("1 2 3")),
        ("c", "No continuation here.", None),
    ];
    let mut s = String::new();
    for (id, p, c) in rows_in {
        s.push_str(&serde_json::json!({"id": id, "prompt": p, "continuation": c}).to_string());
        s.push('\n');
    }
    std::fs::write(tmp.path().join("ll.jsonl"), s).unwrap();
    let model = fixtures().join(ALL_MODELS[1]);
    let job = crate::common::write_job(tmp.path(), &model, "ll.jsonl", "[model]\n");
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("[model]\n\n", "");
    let text = text.replacen("[model]\n", "[model]\ndtype = \"f32\"\n", 1)
        + "[output]\npath = \"ll\"\n\n[scoring]\nmode = \"loglikelihood\"\n";
    std::fs::write(&job, text).unwrap();
    let run = runner(tmp.path(), &["submit", job.to_str().unwrap()], &[]);
    assert!(run.ok, "{}", run.stderr);
    let f = |d: &Path| -> Vec<serde_json::Value> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.path().extension().is_none_or(|x| x != "parquet") {
                continue;
            }
            let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                std::fs::File::open(e.path()).unwrap(),
            )
            .unwrap()
            .build()
            .unwrap();
            for b in r {
                let b = b.unwrap();
                for i in 0..b.num_rows() {
                    let s = |n: &str| {
                        b.column_by_name(n)
                            .unwrap()
                            .as_string::<i32>()
                            .value(i)
                            .to_string()
                    };
                    let fl = |n: &str| {
                        let c = b
                            .column_by_name(n)
                            .unwrap()
                            .as_primitive::<Float64Type>()
                            .clone();
                        c.is_valid(i).then(|| c.value(i))
                    };
                    let n = b
                        .column_by_name("ll_tokens")
                        .unwrap()
                        .as_primitive::<UInt32Type>()
                        .clone();
                    v.push(serde_json::json!({"id": s("id"), "status": s("status"), "finish": s("finish_reason"),
                        "sum": fl("ll_sum"), "mean": fl("ll_mean"), "n": n.is_valid(i).then(|| n.value(i))}));
                }
            }
        }
        v
    };
    let out = f(&tmp.path().join("ll"));
    assert_eq!(out.len(), 3);
    // The two scored records share one forward by default; one record per
    // forward (max_num_seqs = 1) must give the same scores.
    let single = runner(
        tmp.path(),
        &[
            "submit",
            job.to_str().unwrap(),
            "--set",
            "engine.max_num_seqs=1",
            "--set",
            "output.path=\"ll1\"",
        ],
        &[],
    );
    assert!(single.ok, "{}", single.stderr);
    let one = f(&tmp.path().join("ll1"));
    for r in &out {
        let o = one.iter().find(|o| o["id"] == r["id"]).unwrap();
        assert_eq!(
            (&r["status"], &r["n"]),
            (&o["status"], &o["n"]),
            "{}",
            r["id"]
        );
        if let (Some(a), Some(b)) = (r["sum"].as_f64(), o["sum"].as_f64()) {
            assert!(
                (a - b).abs() < 1e-6 * a.abs().max(1.0),
                "{}: batched {a} vs alone {b}",
                r["id"]
            );
        }
    }
    let m = runner::model::load(
        &model,
        &runner::model::LoadOptions::new(candle_core::DType::F32, &candle_core::Device::Cpu),
    )
    .unwrap();
    let p = runner::prompt::Prompter::load(&model, &[32000]).unwrap();
    for (id, prompt, cont) in rows_in {
        let row = out.iter().find(|r| r["id"] == id).unwrap();
        let Some(cont) = cont else {
            assert_eq!(row["status"], "error", "{id}");
            continue;
        };
        assert_eq!(
            (row["status"].as_str(), row["finish"].as_str()),
            (Some("ok"), Some("scored")),
            "{id}"
        );
        // Independently: render, encode with and without the continuation, sum log-softmax in f64.
        let text = p
            .render(&runner::prompt::Prompter::messages(None, "", prompt))
            .unwrap();
        let ctx = p.encode(&text).unwrap();
        let all = p.encode(&format!("{text}{cont}")).unwrap();
        let logits = m.logits_full(&all).unwrap().to_vec2::<f32>().unwrap();
        let mut want = 0.0f64;
        for i in ctx.len()..all.len() {
            let row = &logits[i - 1];
            let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
            want += row[all[i] as usize] as f64 - z.ln();
        }
        let n = (all.len() - ctx.len()) as u64;
        assert_eq!(row["n"].as_u64(), Some(n), "{id}");
        assert!(
            (row["sum"].as_f64().unwrap() - want).abs() < 1e-6 * want.abs().max(1.0),
            "{id}: {} vs {want}",
            row["sum"]
        );
        assert!(
            (row["mean"].as_f64().unwrap() * n as f64 - want).abs() < 1e-6 * want.abs().max(1.0),
            "{id}"
        );
    }
}

#[test]
fn offline_sweep_names_the_missing_revision() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("eval.jsonl"),
        "{\"id\": \"q\", \"prompt\": \"hi\"}\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("job.toml"),
        "[model]\nid = \"TheBloke/Mistral-7B-OpenOrca-GPTQ\"\n\n[input]\npath = \"eval.jsonl\"\n\n[output]\npath = \"out\"\n\n[sweep]\nrevisions = [\"gptq-4bit-32g-actorder_True\", \"main\"]\nbaseline = \"main\"\n",
    )
    .unwrap();
    let cache = tmp.path().join("hf");
    let run = runner(
        tmp.path(),
        &["submit", "job.toml"],
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HOME", cache.to_str().unwrap()),
        ],
    );
    let e = crate::common::error_line(&run);
    assert!(
        e.contains("revision gptq-4bit-32g-actorder_True is not in the HF cache")
            && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
}
