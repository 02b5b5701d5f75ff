//! Greedy ChatML continuations through the real `runner submit`, token for
//! token against `generations.json` (f32: every step; f16: up to the first
//! step whose reference top1-top2 margin is below 0.1, as the fixture README
//! says), plus the output schema as pyarrow reads it (provisioned under
//! target/ when python3 lacks it: `common::pyarrow_python`).

use crate::common::{fixtures, json, reference_path, rows, runner, write_job, ALL_MODELS};

fn write_prompts(dir: &std::path::Path) {
    let seqs = json(&fixtures().join("references/sequences.json"));
    let mut lines = String::new();
    for (name, g) in seqs["generation_prompts"].as_object().unwrap() {
        lines.push_str(&serde_json::json!({"id": name, "messages": g["messages"]}).to_string());
        lines.push('\n');
    }
    std::fs::write(dir.join("prompts.jsonl"), lines).unwrap();
}

/// Runs the fixture prompts through `runner submit` with extra `--set`s and
/// checks the greedy tokens.
pub fn check(model: &str, f16: bool, sets: &[&str]) {
    check_upto(model, f16, sets, if f16 { 0.1 } else { 0.0 });
}

/// [`check`], comparing each generation up to its first step whose
/// reference top1-top2 logit margin is below `margin` (0: every step);
/// returns (tokens compared, tokens generated).
pub fn check_upto(model: &str, f16: bool, sets: &[&str], margin: f64) -> (usize, usize) {
    let tmp = tempfile::tempdir().unwrap();
    write_prompts(tmp.path());
    let job = write_job(
        tmp.path(),
        &fixtures().join(model),
        "prompts.jsonl",
        "[generation]\nmax_new_tokens = 16\n\n[output]\npath = \"out\"\ninclude_token_ids = true\n\n[engine]\nmax_num_seqs = 3\n",
    );
    let dtype = if f16 {
        "model.dtype=f16"
    } else {
        "model.dtype=f32"
    };
    let mut args = vec!["submit", job.to_str().unwrap(), "--set", dtype];
    for s in sets {
        args.extend(["--set", s]);
    }
    let run = runner(tmp.path(), &args, &[]);
    assert!(run.ok, "{model}: submit failed:\n{}", run.stderr);
    let gens = json(&fixtures().join("references/generations.json"));
    let refs = &gens["results"][format!("{model}/{}", reference_path(model, f16))];
    let out = rows(&tmp.path().join("out"));
    assert_eq!(out.len(), 4);
    let (mut compared, mut generated) = (0, 0);
    for r in out {
        let want = &refs[&r.id];
        assert_eq!(r.status, "ok", "{}", r.id);
        assert_eq!(r.error, None);
        assert!(
            r.completion.as_deref().is_some_and(|c| !c.is_empty()),
            "{}: completion text",
            r.id
        );
        assert_eq!(
            r.prompt_tokens as u64,
            want["prompt_len"].as_u64().unwrap(),
            "{}",
            r.id
        );
        let ids: Vec<u32> = crate::common::token_ids(&want["generated_ids"]);
        let margins: Vec<f64> = want["top1_top2_logit_margin_per_step"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let upto = margins
            .iter()
            .position(|&m| m < margin)
            .unwrap_or(ids.len());
        compared += upto;
        generated += ids.len();
        assert_eq!(r.finish_reason, "length");
        assert_eq!(r.token_ids.len(), 16);
        assert_eq!(
            &r.token_ids[..upto],
            &ids[..upto],
            "{model} f16={f16} {}: greedy tokens",
            r.id
        );
    }
    (compared, generated)
}

#[test]
fn greedy_f32_matches_reference_generations() {
    for m in crate::common::models() {
        check(m, false, &[]);
    }
}

#[test]
fn greedy_f16_matches_reference_generations() {
    for m in crate::common::models() {
        check(m, true, &[]);
    }
}

/// The documented output columns and their Arrow types, as pyarrow names them.
const SCHEMA: &[(&str, &str)] = &[
    ("id", "string"),
    ("input_row", "uint64"),
    ("sample_index", "uint32"),
    ("completion", "string"),
    ("finish_reason", "string"),
    ("status", "string"),
    ("error", "string"),
    ("prompt_tokens", "uint32"),
    ("completion_tokens", "uint32"),
    ("cached_prompt_tokens", "uint32"),
    ("max_new_tokens", "uint32"),
    ("temperature", "double"),
    ("top_p", "double"),
    ("top_k", "uint32"),
    ("repetition_penalty", "double"),
    ("seed", "uint64"),
    ("model_id", "string"),
    ("revision", "string"),
    ("quant_bits", "int32"),
    ("quant_group_size", "int32"),
    ("quant_act_order", "bool"),
    ("queue_ms", "double"),
    ("ttft_ms", "double"),
    ("total_ms", "double"),
    ("runner_version", "string"),
    ("job_id", "string"),
    ("completion_token_ids", "list<item: uint32>"),
];

#[test]
fn example_generate_job_writes_parquet_that_pyarrow_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = fixtures().join(ALL_MODELS[1]);
    let out = tmp.path().join("out");
    let run = runner(
        tmp.path(),
        &[
            "submit",
            repo.join("jobs/generate.toml").to_str().unwrap(),
            "--set",
            &format!("model.id={}", model.display()),
            "--set",
            &format!("output.path={}", out.display()),
            "--set",
            "output.include_token_ids=true",
            "--set",
            "generation.max_new_tokens=8",
            "--set",
            "engine.device=cpu",
        ],
        &[],
    );
    assert!(run.ok, "submit failed:\n{}", run.stderr);
    let script = r#"
import sys, json, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
print(json.dumps({"schema": [[f.name, str(f.type)] for f in t.schema], "rows": t.num_rows,
                  "status": sorted(set(t.column("status").to_pylist())),
                  "quant_bits": sorted(set(t.column("quant_bits").to_pylist()))}))
"#;
    let (python, path) = crate::common::pyarrow_python();
    let mut py = std::process::Command::new(python);
    py.args(["-c", script, out.to_str().unwrap()]);
    if let Some(p) = path {
        py.env("PYTHONPATH", p);
    }
    let py = py.output().expect("python runs");
    assert!(
        py.status.success(),
        "pyarrow failed to read the output: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    let got: Vec<(String, String)> = v["schema"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = SCHEMA
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(got, want);
    let f = std::fs::File::open(repo.join("jobs/data/prompts.parquet")).unwrap();
    let input_rows = parquet::file::reader::FileReader::metadata(
        &parquet::file::reader::SerializedFileReader::new(f).unwrap(),
    )
    .file_metadata()
    .num_rows() as usize;
    assert_eq!(v["rows"].as_u64().unwrap() as usize, input_rows);
    assert_eq!(v["status"], serde_json::json!(["ok"]));
    assert_eq!(v["quant_bits"], serde_json::json!([4]));
}

/// A stop string taken from late in the model's own greedy completion
/// (beyond the tail window the stop check decodes): the run stops at its
/// first occurrence and the completion is the text before it.
#[test]
fn stop_strings_end_the_completion_at_their_first_occurrence() {
    let tmp = tempfile::tempdir().unwrap();
    write_prompts(tmp.path());
    let model = fixtures().join(ALL_MODELS[1]);
    let job_text = |out: &str, stop: Option<&str>| {
        let stop = stop.map_or(String::new(), |s| {
            format!("stop = [{}]\n", serde_json::to_string(s).unwrap())
        });
        format!(
            "[output]\npath = \"{out}\"\ninclude_token_ids = true\n\n[generation]\nmax_new_tokens = 120\n{stop}"
        )
    };
    let submit = |text: String| {
        let job = write_job(tmp.path(), &model, "prompts.jsonl", &text);
        let run = runner(
            tmp.path(),
            &["submit", job.to_str().unwrap(), "--set", "model.dtype=f32"],
            &[],
        );
        assert!(run.ok, "{}", run.stderr);
    };
    submit(job_text("free", None));
    let free = rows(&tmp.path().join("free"));
    // The substring (6 to 10 characters) of any completion whose first
    // occurrence comes latest: the greedy text repeats itself a lot.
    let mut best: Option<(usize, String)> = None;
    for r in &free {
        let text = r.completion.as_deref().unwrap();
        let chars: Vec<char> = text.chars().collect();
        for len in [6, 8, 10] {
            for p in 0..chars.len().saturating_sub(len) {
                let cand: String = chars[p..p + len].iter().collect();
                let first = text[..text.find(cand.as_str()).unwrap()].chars().count();
                if first == p && best.as_ref().is_none_or(|b| p > b.0) {
                    best = Some((p, cand));
                }
            }
        }
    }
    let (_, stop) = best.expect("completions");
    submit(job_text("stopped", Some(&stop)));
    let stopped = rows(&tmp.path().join("stopped"));
    assert_eq!(stopped.len(), free.len());
    for r in &stopped {
        let f = free.iter().find(|x| x.id == r.id).unwrap();
        let full = f.completion.as_deref().unwrap();
        match full.find(&stop) {
            Some(at) => {
                assert_eq!(
                    r.finish_reason, "stop",
                    "{}: stop {stop:?} in {full:?}",
                    r.id
                );
                assert_eq!(
                    r.completion.as_deref(),
                    Some(&full[..at]),
                    "{}: the text before the stop",
                    r.id
                );
                assert_eq!(
                    r.token_ids[..],
                    f.token_ids[..r.token_ids.len()],
                    "{}: the same tokens up to the stop",
                    r.id
                );
            }
            None => assert_eq!(
                r.token_ids, f.token_ids,
                "{}: no stop string, same completion",
                r.id
            ),
        }
    }
    assert!(
        stopped
            .iter()
            .any(|r| r.finish_reason == "stop" && r.token_ids.len() > 44),
        "some record stops beyond the decoded tail window"
    );
}

/// `runner bench` on the CPU with dummy weights of a fixture's config:
/// the workload runs end to end and the JSON carries its figures.
#[test]
fn bench_runs_a_scaled_workload_on_dummy_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = fixtures().join(ALL_MODELS[2]);
    let json = tmp.path().join("bench.json");
    let run = runner(
        tmp.path(),
        &[
            "bench",
            repo.join("jobs/bench.toml").to_str().unwrap(),
            "--workload",
            "W1,W4",
            "--scale",
            "0.002",
            "--tokenizer",
            model.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--set",
            &format!("model.id={}", model.display()),
            "--set",
            "engine.device=cpu",
            "--set",
            "model.dtype=f32",
            "--set",
            "engine.kv_cache_mib=256",
        ],
        &[],
    );
    assert!(run.ok, "{}", run.stderr);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let w = v["workloads"].as_array().unwrap();
    assert_eq!(w.len(), 2);
    assert_eq!(w[0]["workload"]["prompts"], 4);
    assert!(w[0]["output_tok_s"].as_f64().unwrap() > 0.0);
    // W1: 4 prompts x 128 generated tokens, ignore_eos.
    assert!(
        (w[0]["output_tok_s"].as_f64().unwrap() * w[0]["wall_s"].as_f64().unwrap() - 512.0).abs()
            < 1.0
    );
    // W4 shares a 1024-token prefix: later prompts hit the prefix cache.
    assert!(w[1]["prefix_hit_tokens"].as_u64().unwrap() >= 1024);
}
