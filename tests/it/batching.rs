//! Engine core through the real CLI: batch invariance of greedy outputs
//! under batching, chunked prefill and preemption; the prefix cache
//! computing a shared system prompt once.

use crate::common::{fixtures, rows, runner, write_job, Row, ALL_MODELS};
use std::collections::BTreeMap;
use std::path::Path;

/// 44 records of mixed lengths (some past the 64-token sliding window).
pub fn mixed_prompts(dir: &Path) {
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "fox", "golf", "hotel", "india",
    ];
    let mut s = String::new();
    for i in 0..44usize {
        let n = 1 + (i * 7) % 40;
        let text: Vec<&str> = (0..n).map(|j| words[(i + j * 3) % words.len()]).collect();
        s.push_str(&serde_json::json!({"id": format!("r{i}"), "prompt": text.join(" "), "max_new_tokens": 4 + i % 9}).to_string());
        s.push('\n');
    }
    std::fs::write(dir.join("mixed.jsonl"), s).unwrap();
}

fn run(dir: &Path, model: &str, input: &str, sets: &[&str]) -> (BTreeMap<String, Row>, String) {
    run_as(dir, model, input, "f32", sets)
}

/// `runner submit` of `input` with `model.dtype = dtype` and `sets`: rows by
/// id, and the log.
pub fn run_as(
    dir: &Path,
    model: &str,
    input: &str,
    dtype: &str,
    sets: &[&str],
) -> (BTreeMap<String, Row>, String) {
    let out = dir.join(format!(
        "out-{}",
        sets.join("_").replace(['=', '.', ':'], "-")
    ));
    let job = write_job(
        dir,
        &fixtures().join(model),
        input,
        &format!(
            "[output]\npath = \"{}\"\ninclude_token_ids = true\n",
            out.display()
        ),
    );
    let mut args = vec![
        "submit".to_string(),
        job.to_str().unwrap().to_string(),
        "--set".into(),
        format!("model.dtype={dtype}"),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.to_string());
    }
    let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let r = runner(dir, &argv, &[("RUNNER_LOG", "info")]);
    assert!(r.ok, "submit {sets:?} failed:\n{}", r.stderr);
    (
        rows(&out).into_iter().map(|r| (r.id.clone(), r)).collect(),
        r.stderr,
    )
}

pub fn field(log: &str, key: &str) -> u64 {
    let i = log
        .rfind(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key} in log:\n{log}"));
    log[i + key.len() + 1..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

#[test]
fn greedy_outputs_do_not_depend_on_batching_chunking_or_preemption() {
    let tmp = tempfile::tempdir().unwrap();
    mixed_prompts(tmp.path());
    let model = ALL_MODELS[1];
    let (one, _) = run(
        tmp.path(),
        model,
        "mixed.jsonl",
        &["engine.max_num_seqs=1", "engine.prefix_caching=false"],
    );
    let (many, log) = run(tmp.path(), model, "mixed.jsonl", &SMALL_ENGINE);
    assert_same_rows(&one, &many);
    assert!(
        field(&log, "preemptions") > 0,
        "the small cache must force preemption:\n{log}"
    );
}

/// A small engine that batches, chunks prefills and preempts on the mixed
/// prompts.
const SMALL_ENGINE: [&str; 4] = [
    "engine.max_num_seqs=16",
    "engine.max_batch_tokens=24",
    "engine.num_blocks=16",
    "engine.block_size=8",
];

/// The greedy rows of the mixed prompts through [`SMALL_ENGINE`] with
/// `engine.overlap` off and on.
pub fn overlap_off_and_on(
    dir: &Path,
    model: &str,
    dtype: &str,
    device: &[&str],
) -> [(BTreeMap<String, Row>, String); 2] {
    setting_off_and_on(dir, model, dtype, device, "engine.overlap")
}

/// The greedy rows of the mixed prompts through [`SMALL_ENGINE`] with the
/// boolean `setting` off and on.
pub fn setting_off_and_on(
    dir: &Path,
    model: &str,
    dtype: &str,
    device: &[&str],
    setting: &str,
) -> [(BTreeMap<String, Row>, String); 2] {
    mixed_prompts(dir);
    [false, true].map(|on| {
        let o = format!("{setting}={on}");
        let sets: Vec<&str> = SMALL_ENGINE
            .iter()
            .chain(device)
            .copied()
            .chain([o.as_str()])
            .collect();
        run_as(dir, model, "mixed.jsonl", dtype, &sets)
    })
}

/// Asserts the same 44 rows in both runs: status ok, tokens, finish
/// reasons and completions.
pub fn assert_same_rows(off: &BTreeMap<String, Row>, on: &BTreeMap<String, Row>) {
    assert_eq!(off.len(), 44);
    assert_eq!(
        off.keys().collect::<Vec<_>>(),
        on.keys().collect::<Vec<_>>()
    );
    for (id, a) in off {
        let b = &on[id];
        assert_eq!(
            (a.status.as_str(), b.status.as_str()),
            ("ok", "ok"),
            "record {id}: {:?}",
            b.error
        );
        assert_eq!(a.token_ids, b.token_ids, "record {id}");
        assert_eq!(a.finish_reason, b.finish_reason, "record {id}");
        assert_eq!(a.completion, b.completion, "record {id}");
    }
}

#[test]
fn overlapped_steps_give_the_in_order_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let [(off, _), (on, log)] = overlap_off_and_on(tmp.path(), ALL_MODELS[1], "f32", &[]);
    assert_same_rows(&off, &on);
    assert!(
        field(&log, "preemptions") > 0,
        "the small cache must force preemption:\n{log}"
    );
}

#[test]
fn a_shared_system_prompt_is_computed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let system: String = (0..70)
        .map(|i| format!("rule{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut s = String::new();
    for i in 0..50 {
        s.push_str(&serde_json::json!({"id": i, "system": system, "prompt": format!("question number {i}?")}).to_string());
        s.push('\n');
    }
    std::fs::write(tmp.path().join("shared.jsonl"), s).unwrap();
    let sets = [
        "generation.max_new_tokens=3",
        "engine.max_num_seqs=16",
        "engine.block_size=16",
    ];
    let (on, log) = run(tmp.path(), ALL_MODELS[0], "shared.jsonl", &sets);
    let mut off_sets = sets.to_vec();
    off_sets.push("engine.prefix_caching=false");
    let (off, _) = run(tmp.path(), ALL_MODELS[0], "shared.jsonl", &off_sets);
    let prompt_len = on["0"].prompt_tokens as u64;
    assert!(
        prompt_len >= 200,
        "system prompt should be >= 200 tokens, prompt has {prompt_len}"
    );
    // Tokens common to every prompt, in whole blocks.
    let shared_blocks = {
        let common = on.values().map(|r| r.prompt_tokens as u64).min().unwrap() - 12;
        common / 16
    };
    let hits = field(&log, "prefix_hit_tokens");
    assert!(
        hits >= 49 * shared_blocks * 16,
        "49 of 50 records must reuse the {shared_blocks} shared blocks: {hits} hit tokens"
    );
    let cached: u64 = on.values().map(|r| r.cached_prompt_tokens as u64).sum();
    assert_eq!(cached, hits);
    for (id, a) in &on {
        assert_eq!(a.token_ids, off[id].token_ids, "record {id}");
    }
    assert!(off.values().all(|r| r.cached_prompt_tokens == 0));
}
