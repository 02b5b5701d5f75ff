//! The batch-invariant mode (`engine.gptq_kernel = "fused"`) end to end on
//! the GPU: each record's generated tokens, their log-probabilities and
//! its prompt's log-probabilities are the same bits whether the record
//! runs alone (one sequence per step) or among the others (mixed prefill
//! and decode steps of many rows, decode graphs padded to their ladder).
//! Each run pair is repeated over settings: CUDA graphs on and off, a
//! small cache, two alone runs, and prefix caching on (a record's prefill
//! may start from another's cached blocks in one run and not in the
//! other). Below the engine, the model's forward, a decode step, a mixed
//! step, reused cache blocks and two loads of one model are checked the
//! same way.

use crate::common::{fixtures, json, token_ids};
use runner::config::GenerationParams;
use runner::input::InputRecord;
use runner::kv::BlockId;
use runner::model::{LoadOptions, LogitRows, Mistral, PagedKvCache, SeqChunk};
use runner::output::OutputRow;
use std::collections::BTreeMap;

/// Tokens per KV block in the model-level tests.
const BLOCK: usize = 16;
/// The token every model-level decode step feeds.
const NEXT: [u32; 1] = [5];

fn engine(
    dir: &std::path::Path,
    model: &str,
    max_num_seqs: usize,
    extra: &str,
) -> runner::engine::Engine {
    std::fs::write(dir.join("in.jsonl"), "{\"prompt\": \"x\"}\n").unwrap();
    let job = dir.join(format!("job-{max_num_seqs}.toml"));
    std::fs::write(
        &job,
        format!(
            "[model]\nid = \"{}\"\ndtype = \"f16\"\n[input]\npath = \"in.jsonl\"\n\
             [output]\nlogprobs = 3\nprompt_logprobs = true\n\
             [engine]\ndevice = \"cuda\"\nmax_num_seqs = {max_num_seqs}\n{extra}",
            fixtures().join(model).display(),
        ),
    )
    .unwrap();
    crate::logprobs::engine_of(&job)
}

/// Prompts of 1 to 100 tokens (26 records) cut from the reference
/// sequences, each generating 3 to 12 tokens greedily, or `sampled` (seeded;
/// every third record through each device route: top-k, top-p, the whole
/// row; a repetition penalty on all).
fn items_of(sampled: bool) -> Vec<(InputRecord, Vec<u32>)> {
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
            let mut params = GenerationParams {
                max_new_tokens: 3 + (i % 10),
                ignore_eos: true,
                ..Default::default()
            };
            if sampled {
                let (top_k, top_p) = [(40, 1.0), (0, 0.9), (0, 1.0)][i % 3];
                params = GenerationParams {
                    temperature: 0.8,
                    top_k,
                    top_p,
                    repetition_penalty: 1.1,
                    seed: 7 + i as u64,
                    ..params
                };
            }
            let rec = InputRecord::for_tokens(i as u64, format!("{name}-{cut}"), params);
            out.push((rec, ids[..cut].to_vec()));
        }
    }
    out
}

fn items() -> Vec<(InputRecord, Vec<u32>)> {
    items_of(false)
}

/// The rows by record id, and the prompt tokens served from the prefix
/// cache.
fn run(engine: &runner::engine::Engine, sampled: bool) -> (BTreeMap<String, OutputRow>, usize) {
    let mut rows: Vec<OutputRow> = Vec::new();
    let sum = engine.run_tokens(items_of(sampled), &mut rows).unwrap();
    let rows = rows.into_iter().map(|r| (r.id.clone(), r)).collect();
    (rows, sum.prefix_hit_tokens)
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
    let at = |i: usize, x: &[f32], y: &[f32]| format!(" ({} vs {})", x[i], y[i]);
    let prompt_f = |r: &OutputRow| -> Vec<f32> {
        let p = r
            .prompt_logprobs
            .as_ref()
            .expect("prompt logprobs asked for");
        p.iter().map(|v| v.unwrap_or(f32::NAN)).collect()
    };
    let fields = [
        (
            "tokens",
            first(&a.completion_token_ids, &b.completion_token_ids),
        ),
        ("logprobs", first(&bits(&la.chosen), &bits(&lb.chosen))),
        ("top logprobs", first(&top(&la.top), &top(&lb.top))),
        ("prompt logprobs", first(&prompt(a), &prompt(b))),
    ];
    fields
        .into_iter()
        .filter_map(|(f, pos)| {
            let i = pos?;
            let v = match f {
                "logprobs" => at(i, &la.chosen, &lb.chosen),
                "prompt logprobs" => at(i, &prompt_f(a), &prompt_f(b)),
                _ => String::new(),
            };
            Some(format!("{f} from position {i}{v}"))
        })
        .collect()
}

#[test]
fn fused_mode_rows_do_not_depend_on_the_batch() {
    let mut bad = Vec::new();
    // (name, settings, sequences at a time in the second run, sampled)
    let off = "gptq_kernel = \"fused\"\nprefix_caching = false\n";
    let variants = [
        ("alone twice", off.to_string(), 1, false),
        ("graphs", off.to_string(), 64, false),
        (
            "no graphs",
            format!("{off}cuda_graphs = false\n"),
            64,
            false,
        ),
        (
            "64 MiB cache",
            format!("{off}kv_cache_mib = 64\n"),
            64,
            false,
        ),
        ("sampled", off.to_string(), 64, true),
        (
            "prefix caching",
            "gptq_kernel = \"fused\"\nprefix_caching = true\n".to_string(),
            64,
            false,
        ),
        (
            "fused_packed",
            "gptq_kernel = \"fused_packed\"\nprefix_caching = false\n".to_string(),
            64,
            false,
        ),
    ];
    for (model, (variant, extra, seqs, sampled)) in crate::common::models()
        .into_iter()
        .flat_map(|m| variants.iter().map(move |v| (m, v)))
    {
        let tmp = tempfile::tempdir().unwrap();
        let (alone, hits_alone) = run(&engine(tmp.path(), model, 1, extra), *sampled);
        let (together, hits) = run(&engine(tmp.path(), model, *seqs, extra), *sampled);
        if extra.contains("prefix_caching = true") {
            // The records that share a prefix reuse its blocks.
            assert!(
                hits_alone > 0 && hits > 0,
                "{model}: no prefix-cache hits ({hits_alone} alone, {hits} together)"
            );
        }
        assert!(alone.len() >= 20, "{model}: {} records", alone.len());
        assert_eq!(
            alone.keys().collect::<Vec<_>>(),
            together.keys().collect::<Vec<_>>()
        );
        for (id, a) in &alone {
            let b = &together[id];
            assert_eq!((&a.error, &b.error), (&None, &None), "{model} {id}");
            for d in differences(a, b) {
                bad.push(format!("{model} ({variant}) {id}: {d}"));
            }
        }
    }
    assert_none(&bad, "rows that depend on the batch");
}

/// The first row of `n`-wide rows where `a` and `b` differ.
fn first_row(a: &[f32], b: &[f32], n: usize) -> Option<usize> {
    a.chunks(n)
        .zip(b.chunks(n))
        .position(|(x, y)| x.iter().zip(y).any(|(p, q)| p.to_bits() != q.to_bits()))
}

/// Fails listing `bad` (what differed) unless it is empty.
fn assert_none(bad: &[String], what: &str) {
    assert!(bad.is_empty(), "{what}:\n{}", bad.join("\n"));
}

/// The fixture `model` in the batch-invariant mode, on a device handle
/// (stream) of its own.
fn fused_model(model: &str) -> Mistral {
    let mut opts = LoadOptions::new(candle_core::DType::F16, &super::gpu());
    opts.gptq_mode = runner::quant::GptqMode::Fused;
    runner::model::load(&fixtures().join(model), &opts).unwrap()
}

/// The items' prompts.
fn prompts_of(items: &[(InputRecord, Vec<u32>)]) -> Vec<&[u32]> {
    items.iter().map(|(_, ids)| ids.as_slice()).collect()
}

/// A chunk of `tokens` from position `start_pos` over `blocks`.
fn chunk<'a>(tokens: &'a [u32], start_pos: usize, blocks: &'a [BlockId]) -> SeqChunk<'a> {
    SeqChunk {
        tokens,
        start_pos,
        blocks,
    }
}

/// Fresh block tables for `prompts` with room for `extra` more tokens
/// each, and a cache of exactly those blocks.
fn fresh(m: &Mistral, prompts: &[&[u32]], extra: usize) -> (Vec<Vec<BlockId>>, PagedKvCache) {
    let lens: Vec<usize> = prompts.iter().map(|p| p.len() + extra).collect();
    let blocks = runner::backend::fresh_tables(&lens, BLOCK);
    let cache = m
        .new_cache(blocks.iter().map(Vec::len).sum(), BLOCK)
        .unwrap();
    (blocks, cache)
}

/// Where each item's logits alone (`m.logits_full`) differ from its rows
/// of `all`, the logits of every item's prompt in one forward, in order.
fn alone_vs(
    m: &Mistral,
    items: &[(InputRecord, Vec<u32>)],
    all: &[f32],
    what: &str,
) -> Vec<String> {
    let vocab = m.config().vocab_size;
    let mut bad = Vec::new();
    let mut off = 0;
    for (rec, p) in items {
        let alone = super::host(&m.logits_full(p).unwrap());
        let together = &all[off * vocab..(off + p.len()) * vocab];
        if let Some(r) = first_row(&alone, together, vocab) {
            bad.push(format!("{}: {what} row {r} of {}", rec.id, p.len()));
        }
        off += p.len();
    }
    bad
}

/// The forward alone, below the engine: each prompt's logits at every
/// position the same bits in a forward of its own as among all the
/// others' (one prefill of every prompt), and the last rows' logits the
/// same when the LM head takes only them (`LogitRows::These`).
#[test]
fn fused_mode_forward_rows_do_not_depend_on_the_batch() {
    let mut bad = Vec::new();
    for model in crate::common::models() {
        let m = fused_model(model);
        let vocab = m.config().vocab_size;
        // In the intake's order (sorted by tokens, as one engine step has them).
        let mut items = items();
        items.sort_by(|a, b| a.1.cmp(&b.1));
        let prompts = prompts_of(&items);
        let all = super::host(&m.logits_full_batch(&prompts).unwrap());
        for d in alone_vs(&m, &items, &all, "forward") {
            bad.push(format!("{model} {d}"));
        }
        // The LM head over the prompts' last rows only.
        let lasts: Vec<u32> = prompts
            .iter()
            .scan(0u32, |o, p| {
                *o += p.len() as u32;
                Some(*o - 1)
            })
            .collect();
        let (blocks, mut cache) = fresh(&m, &prompts, 0);
        let chunks: Vec<SeqChunk<'_>> = prompts
            .iter()
            .zip(&blocks)
            .map(|(p, b)| chunk(p, 0, b))
            .collect();
        let picked = m
            .forward(&chunks, &mut cache, LogitRows::These(&lasts))
            .unwrap();
        let picked = super::host(&picked);
        for (i, &r) in lasts.iter().enumerate() {
            let r = r as usize;
            let want = &all[r * vocab..(r + 1) * vocab];
            if first_row(&picked[i * vocab..(i + 1) * vocab], want, vocab).is_some() {
                bad.push(format!(
                    "{model} {}: last row through LogitRows::These",
                    items[i].0.id
                ));
            }
        }
    }
    assert_none(&bad, "rows that depend on the batch");
}

/// Prefills `prompts` in one forward over `blocks` of `cache`, then
/// decodes token 5 after each in one more; returns (the prefill's logits
/// at every position, the decode step's logits [prompts, vocab]).
fn prefill_then_decode_on(
    m: &Mistral,
    cache: &mut PagedKvCache,
    blocks: &[Vec<BlockId>],
    prompts: &[&[u32]],
) -> (Vec<f32>, Vec<f32>) {
    let chunks: Vec<SeqChunk<'_>> = prompts
        .iter()
        .zip(blocks)
        .map(|(p, b)| chunk(p, 0, b))
        .collect();
    let prefill = super::host(&m.forward(&chunks, cache, LogitRows::All).unwrap());
    let chunks: Vec<SeqChunk<'_>> = prompts
        .iter()
        .zip(blocks)
        .map(|(p, b)| chunk(&NEXT, p.len(), b))
        .collect();
    let decode = super::host(&m.forward(&chunks, cache, LogitRows::All).unwrap());
    (prefill, decode)
}

/// [`prefill_then_decode_on`] over a fresh cache; the decode step's logits.
fn prefill_then_decode(m: &Mistral, prompts: &[&[u32]]) -> Vec<f32> {
    let (blocks, mut cache) = fresh(m, prompts, 1);
    prefill_then_decode_on(m, &mut cache, &blocks, prompts).1
}

/// Blocks reused as the engine reuses a finished sequence's: each prompt
/// prefilled and decoded over the same blocks of one cache, after the
/// prompts before it, gives the same logits as over a fresh cache.
#[test]
fn fused_mode_rows_do_not_depend_on_what_reused_blocks_held() {
    let mut bad = Vec::new();
    for model in crate::common::models() {
        let m = fused_model(model);
        let vocab = m.config().vocab_size;
        let mut used = m.new_cache(8, BLOCK).unwrap();
        let blocks: Vec<BlockId> = (0..8).map(BlockId).collect();
        for (rec, p) in items() {
            let n = (p.len() + 1).div_ceil(BLOCK);
            let table = vec![blocks[..n].to_vec()];
            let (pre, dec) = prefill_then_decode_on(&m, &mut used, &table, &[&p]);
            let mut fresh = m.new_cache(n, BLOCK).unwrap();
            let (pre0, dec0) = prefill_then_decode_on(&m, &mut fresh, &table, &[&p]);
            if let Some(r) = first_row(&pre, &pre0, vocab) {
                bad.push(format!(
                    "{model} {}: prefill row {r} of {}",
                    rec.id,
                    p.len()
                ));
            }
            if first_row(&dec, &dec0, vocab).is_some() {
                bad.push(format!(
                    "{model} {}: decode after {} tokens",
                    rec.id,
                    p.len()
                ));
            }
        }
    }
    assert_none(&bad, "rows that depend on stale blocks");
}

/// A decode step below the engine: each sequence's logits the same bits
/// when it decodes alone as when all decode together (each after its own
/// prompt's prefill, alone or with all the others).
#[test]
fn fused_mode_decode_rows_do_not_depend_on_the_batch() {
    let mut bad = Vec::new();
    for model in crate::common::models() {
        let m = fused_model(model);
        let vocab = m.config().vocab_size;
        let items = items();
        let prompts = prompts_of(&items);
        let all = prefill_then_decode(&m, &prompts);
        for (i, p) in prompts.iter().enumerate() {
            let alone = prefill_then_decode(&m, &[p]);
            if first_row(&alone, &all[i * vocab..(i + 1) * vocab], vocab).is_some() {
                bad.push(format!(
                    "{model} {}: decode after {} tokens",
                    items[i].0.id,
                    p.len()
                ));
            }
        }
    }
    assert_none(&bad, "rows that depend on the batch");
}

/// Two loads of one model on two device handles (two streams, as two
/// engines of one process have): each prompt's logits alone on one the
/// same bits as among all the others on the other.
#[test]
fn fused_mode_rows_are_the_same_on_two_device_handles() {
    let mut bad = Vec::new();
    for model in crate::common::models() {
        let (a, b) = (fused_model(model), fused_model(model));
        let items = items();
        let all = super::host(&b.logits_full_batch(&prompts_of(&items)).unwrap());
        for d in alone_vs(&a, &items, &all, "forward") {
            bad.push(format!("{model} {d}"));
        }
    }
    assert_none(&bad, "rows that differ between two loads");
}

/// A mixed step below the engine: one prompt's prefill in the same
/// forward as every other prompt's first decode gives that prompt's
/// logits the same bits as its prefill alone.
#[test]
fn fused_mode_prefill_rows_do_not_depend_on_decodes_beside_them() {
    let mut bad = Vec::new();
    for model in crate::common::models() {
        let m = fused_model(model);
        let vocab = m.config().vocab_size;
        let items = items();
        let prompts = prompts_of(&items);
        for (i, p) in prompts.iter().enumerate() {
            let (blocks, mut cache) = fresh(&m, &prompts, 1);
            let others: Vec<usize> = (0..prompts.len()).filter(|&j| j != i).collect();
            let first: Vec<SeqChunk<'_>> = others
                .iter()
                .map(|&j| chunk(prompts[j], 0, &blocks[j]))
                .collect();
            m.forward(&first, &mut cache, LogitRows::LastOfEachChunk)
                .unwrap();
            let mut mixed: Vec<SeqChunk<'_>> = others
                .iter()
                .map(|&j| chunk(&NEXT, prompts[j].len(), &blocks[j]))
                .collect();
            mixed.push(chunk(p, 0, &blocks[i]));
            let all = super::host(&m.forward(&mixed, &mut cache, LogitRows::All).unwrap());
            let alone = super::host(&m.logits_full(p).unwrap());
            if let Some(r) = first_row(&alone, &all[others.len() * vocab..], vocab) {
                bad.push(format!(
                    "{model} {}: mixed-step row {r} of {}",
                    items[i].0.id,
                    p.len()
                ));
            }
        }
    }
    assert_none(&bad, "rows that depend on the batch");
}
