//! `generation.n`: samples forked from one prefill, each with its own RNG.

use super::*;

fn sampling(n: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens: 9,
        temperature: 1.5,
        seed: 7,
        n,
        ..Default::default()
    }
}

/// Completion ids by (record id, sample index).
type BySample = std::collections::BTreeMap<(String, u32), Vec<u32>>;

/// Completion ids by (record id, sample index), the summary and the rows.
fn run_samples(
    items: Vec<Prepared>,
    cfg: SchedulerConfig,
) -> (BySample, super::super::JobSummary, Vec<OutputRow>) {
    let (rows, sum) = run(items, cfg, &mut FakeRunner::default(), false);
    let by = rows
        .iter()
        .map(|r| {
            assert_eq!(r.status, RowStatus::Ok, "{:?}", r.error);
            (
                (r.id.clone(), r.sample_index),
                r.completion_token_ids.clone(),
            )
        })
        .collect();
    (by, sum, rows)
}

#[test]
fn samples_are_reproducible_alone_and_independent_of_n_and_batching() {
    // Prompts of 6 tokens: the last block (4 tokens) is partial and shared
    // by the forks until each writes into it (copy-on-write).
    let ps = prompts(5, 6);
    let (four, s4, rows) = run_samples(
        gen_items(&ps, &sampling(4)),
        SchedulerConfig::tiny(200, 16, 1000),
    );
    assert_eq!(four.len(), 20, "one row per (record, sample)");
    let distinct: std::collections::HashSet<&Vec<u32>> = four.values().collect();
    assert!(distinct.len() > 10, "samples differ: {four:?}");
    let (again, ..) = run_samples(
        gen_items(&ps, &sampling(4)),
        SchedulerConfig::tiny(200, 16, 1000),
    );
    assert_eq!(four, again, "two runs give the same rows");
    let (one_seq, ..) = run_samples(
        gen_items(&ps, &sampling(4)),
        SchedulerConfig::tiny(200, 1, 1000),
    );
    assert_eq!(four, one_seq, "max_num_seqs 1 and 16 give the same rows");
    let (tight, st, _) = run_samples(
        gen_items(&ps, &sampling(4)),
        SchedulerConfig::tiny(14, 8, 7),
    );
    assert!(st.preemptions > 0, "the tight cache must preempt");
    assert_eq!(four, tight, "preemption does not change a sample");
    let (three, ..) = run_samples(
        gen_items(&ps, &sampling(3)),
        SchedulerConfig::tiny(200, 16, 1000),
    );
    for ((id, i), toks) in &three {
        assert_eq!(
            &four[&(id.clone(), *i)],
            toks,
            "{id} sample {i}: n=3 vs n=4"
        );
    }
    let (one, s1, _) = run_samples(
        gen_items(&ps, &sampling(1)),
        SchedulerConfig::tiny(200, 16, 1000),
    );
    for ((id, i), toks) in &one {
        assert_eq!(&four[&(id.clone(), *i)], toks, "{id} sample 0: n=1 vs n=4");
    }
    assert_eq!(
        s4.prefill_tokens, s1.prefill_tokens,
        "one prefill per record"
    );
    assert_eq!(s4.prefill_tokens, 5 * 6);
    // The forks' prompts all come from the shared blocks.
    for r in rows.iter().filter(|r| r.sample_index > 0) {
        assert_eq!(
            r.cached_prompt_tokens, 6,
            "{} sample {}",
            r.id, r.sample_index
        );
    }
}

#[test]
fn a_resumed_record_runs_only_its_missing_samples() {
    let ps = prompts(2, 7);
    let (full, ..) = run_samples(
        gen_items(&ps, &sampling(4)),
        SchedulerConfig::tiny(200, 16, 1000),
    );
    let mut items = gen_items(&ps, &sampling(4));
    items[0].0.written_samples = vec![0, 2];
    items[1].0.written_samples = vec![0, 1, 2, 3];
    let (rest, ..) = run_samples(items, SchedulerConfig::tiny(200, 16, 1000));
    let keys: Vec<(String, u32)> = rest.keys().cloned().collect();
    assert_eq!(keys, [("r0".to_string(), 1), ("r0".to_string(), 3)]);
    for (k, toks) in &rest {
        assert_eq!(&full[k], toks, "{k:?}");
    }
}
