//! The overlapped step (`engine.overlap`) writes the rows the in-order
//! step writes: the same tokens, finish reasons and completions, with
//! stops at varied lengths, preemption, shared prefixes and records that
//! need the host between forward and pick.

use super::*;

/// Each row's (id, tokens, finish reason, completion), by id.
type RowKey = (String, Vec<u32>, FinishReason, Option<String>);

fn keys(rows: &[OutputRow]) -> Vec<RowKey> {
    let mut k: Vec<RowKey> = rows
        .iter()
        .map(|r| {
            let c = r.completion.clone();
            (
                r.id.clone(),
                r.completion_token_ids.clone(),
                r.finish_reason,
                c,
            )
        })
        .collect();
    k.sort_by(|a, b| a.0.cmp(&b.0));
    k
}

/// The rows of `items()` in order and overlapped, and the overlapped
/// run's patched rows and summary.
fn both(
    items: impl Fn() -> Vec<Prepared>,
    cfg: SchedulerConfig,
    eos_sum_mod: Option<u64>,
) -> (Vec<RowKey>, Vec<RowKey>, usize, crate::engine::JobSummary) {
    let mut rows = Vec::new();
    let mut last = (0, Default::default());
    for overlap in [false, true] {
        let mut runner = FakeRunner {
            eos_sum_mod,
            ..Default::default()
        };
        let opts = Opts {
            overlap,
            ..Default::default()
        };
        let (r, sum) = run_with(items(), cfg, &mut runner, opts);
        rows.push(keys(&r));
        last = (runner.patched, sum);
    }
    let off = rows.remove(0);
    (off, rows.remove(0), last.0, last.1)
}

/// Prompts sharing their first 8 tokens (two blocks of the tiny cache).
fn shared_prompts(n: usize) -> Vec<Vec<u32>> {
    prompts(n, 6)
        .into_iter()
        .map(|own| [vec![3, 1, 4, 1, 5, 9, 2, 6], own].concat())
        .collect()
}

#[test]
fn overlapped_greedy_steps_write_the_in_order_rows_with_stops_and_shared_prefixes() {
    let ps = shared_prompts(10);
    let items = || gen_items(&ps, &params(12));
    let (off, on, patched, sum) = both(items, SchedulerConfig::tiny(200, 4, 64), Some(7));
    assert_eq!(off, on);
    assert!(patched > 0, "no step ran overlapped");
    assert!(sum.prefix_hit_tokens > 0, "the prompts share cached blocks");
    let stops = on.iter().filter(|k| k.2 == FinishReason::Stop).count();
    assert!(
        stops > 0 && stops < on.len(),
        "{stops} of {} stopped on EOS",
        on.len()
    );
}

#[test]
fn overlapped_steps_under_preemption_write_the_in_order_rows() {
    let ps = prompts(8, 10);
    let items = || gen_items(&ps, &params(12));
    let (off, on, patched, sum) = both(items, SchedulerConfig::tiny(14, 4, 12), Some(11));
    assert!(sum.preemptions > 0, "the tight cache must preempt");
    assert!(patched > 0, "no step ran overlapped");
    assert_eq!(off, on);
}

#[test]
fn records_that_need_the_host_run_in_order_between_overlapped_ones() {
    let ps = prompts(8, 7);
    let text = Letters.decode(&expected(&ps[3], 10)).unwrap();
    let items = || {
        let each = |i: usize| {
            // Sampled records end early: the run's tail can overlap.
            let mut p = params(16);
            match i % 4 {
                1 => {
                    p.temperature = 0.9;
                    p.seed = 11 + i as u64;
                    p.max_new_tokens = 5;
                }
                2 => p.min_new_tokens = 6,
                3 => p.stop = vec![text[4..5].to_string()],
                _ => {}
            }
            p
        };
        (0..ps.len())
            .map(|i| {
                let tok = Tokenized {
                    tokens: ps[i].clone(),
                    prompt_len: ps[i].len(),
                };
                (record(i, each(i)), Ok(tok))
            })
            .collect::<Vec<Prepared>>()
    };
    let (off, on, patched, _) = both(items, SchedulerConfig::tiny(200, 8, 64), Some(5));
    assert!(patched > 0, "no step ran overlapped");
    assert_eq!(off, on);
}

#[test]
fn a_records_own_logprobs_keep_its_steps_in_order() {
    // Greedy records asking for log-probabilities themselves (an OpenAI
    // Batch record's `logprobs`), beside greedy records that do not.
    let ps = prompts(6, 5);
    let items = || {
        (0..ps.len())
            .map(|i| {
                let mut p = params(8);
                p.logprobs = (i % 2 == 0).then_some(2);
                let tok = Tokenized {
                    tokens: ps[i].clone(),
                    prompt_len: ps[i].len(),
                };
                (record(i, p), Ok(tok))
            })
            .collect::<Vec<Prepared>>()
    };
    let mut by_mode = Vec::new();
    for overlap in [false, true] {
        let opts = Opts {
            overlap,
            ..Default::default()
        };
        let cfg = SchedulerConfig::tiny(200, 2, 64);
        let (mut rows, _) = run_with(items(), cfg, &mut FakeRunner::default(), opts);
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        by_mode.push(rows);
    }
    for (a, b) in by_mode[0].iter().zip(&by_mode[1]) {
        assert_eq!(a.completion_token_ids, b.completion_token_ids, "{}", a.id);
        assert_eq!(a.logprobs, b.logprobs, "{}", a.id);
        if a.input_row % 2 == 0 {
            let lp = a.logprobs.as_ref().expect("asked for log-probabilities");
            assert_eq!(lp.chosen.len(), a.completion_token_ids.len(), "{}", a.id);
        }
    }
}
