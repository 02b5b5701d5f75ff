//! The batch-invariant mode (`engine.gptq_kernel = "fused"`) end to end on
//! the GPU: each record's generated tokens, their log-probabilities and
//! its prompt's log-probabilities are the same bits whether the record
//! runs alone (one sequence per step) or among the others (mixed prefill
//! and decode steps of many rows, decode graphs padded to their ladder).
//! Prefix caching is off in both runs, so that no record's prefill
//! starts from another's cached blocks in one run and not in the other.

use crate::common::{fixtures, json, token_ids};
use runner::config::GenerationParams;
use runner::input::InputRecord;
use runner::output::OutputRow;
use std::collections::BTreeMap;

fn engine(dir: &std::path::Path, model: &str, max_num_seqs: usize) -> runner::engine::Engine {
    std::fs::write(dir.join("in.jsonl"), "{\"prompt\": \"x\"}\n").unwrap();
    let job = dir.join(format!("job-{max_num_seqs}.toml"));
    std::fs::write(
        &job,
        format!(
            "[model]\nid = \"{}\"\ndtype = \"f16\"\n[input]\npath = \"in.jsonl\"\n\
             [output]\nlogprobs = 3\nprompt_logprobs = true\n\
             [engine]\ndevice = \"cuda\"\ngptq_kernel = \"fused\"\nprefix_caching = false\n\
             max_num_seqs = {max_num_seqs}\n",
            fixtures().join(model).display(),
        ),
    )
    .unwrap();
    crate::logprobs::engine_of(&job)
}

/// Prompts of 1 to 100 tokens (26 records) cut from the reference sequences, each
/// generating 3 to 12 tokens greedily.
fn items() -> Vec<(InputRecord, Vec<u32>)> {
    let seqs = json(&fixtures().join("references/sequences.json"));
    let mut out = Vec::new();
    for (name, ids) in seqs["sequences"].as_object().unwrap() {
        let ids = token_ids(ids);
        let mut cuts: Vec<usize> = [1, 3, 5, 9, 17, 33, ids.len()]
            .iter()
            .map(|&c| c.min(ids.len()))
            .collect();
        cuts.dedup();
        for cut in cuts {
            let i = out.len();
            let params = GenerationParams {
                max_new_tokens: 3 + (i % 10),
                ignore_eos: true,
                ..Default::default()
            };
            let rec = InputRecord::for_tokens(i as u64, format!("{name}-{cut}"), params);
            out.push((rec, ids[..cut].to_vec()));
        }
    }
    out
}

fn run(engine: &runner::engine::Engine) -> BTreeMap<String, OutputRow> {
    let mut rows: Vec<OutputRow> = Vec::new();
    engine.run_tokens(items(), &mut rows).unwrap();
    rows.into_iter().map(|r| (r.id.clone(), r)).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Where two runs' rows of one record differ: each field that differs, and
/// its first differing position.
fn differences(a: &OutputRow, b: &OutputRow) -> Vec<String> {
    fn first<T: PartialEq>(x: &[T], y: &[T]) -> Option<usize> {
        (x != y).then(|| x.iter().zip(y).take_while(|(p, q)| p == q).count())
    }
    let (la, lb) = (a.logprobs.as_ref().unwrap(), b.logprobs.as_ref().unwrap());
    let top = |t: &[Vec<(u32, f32)>]| -> Vec<Vec<(u32, u32)>> {
        t.iter()
            .map(|v| v.iter().map(|&(i, l)| (i, l.to_bits())).collect())
            .collect()
    };
    let prompt = |r: &OutputRow| -> Vec<Option<u32>> {
        let p = r
            .prompt_logprobs
            .as_ref()
            .expect("prompt logprobs asked for");
        p.iter().map(|v| v.map(f32::to_bits)).collect()
    };
    let fields = [
        ("tokens", first(&a.completion_token_ids, &b.completion_token_ids)),
        ("logprobs", first(&bits(&la.chosen), &bits(&lb.chosen))),
        ("top logprobs", first(&top(&la.top), &top(&lb.top))),
        ("prompt logprobs", first(&prompt(a), &prompt(b))),
    ];
    fields
        .into_iter()
        .filter_map(|(f, at)| at.map(|i| format!("{f} from position {i}")))
        .collect()
}

#[test]
fn fused_mode_rows_do_not_depend_on_the_batch() {
    let mut bad = Vec::new();
    for model in crate::common::models() {
        let tmp = tempfile::tempdir().unwrap();
        let alone = run(&engine(tmp.path(), model, 1));
        let together = run(&engine(tmp.path(), model, 64));
        assert!(alone.len() >= 20, "{model}: {} records", alone.len());
        assert_eq!(
            alone.keys().collect::<Vec<_>>(),
            together.keys().collect::<Vec<_>>()
        );
        for (id, a) in &alone {
            let b = &together[id];
            assert_eq!((&a.error, &b.error), (&None, &None), "{model} {id}");
            for d in differences(a, b) {
                bad.push(format!("{model} {id}: {d}"));
            }
        }
    }
    assert!(bad.is_empty(), "rows that depend on the batch:\n{}", bad.join("\n"));
}
