//! Stop controls: stop strings, EOS, `stop_token_ids` (and ids past the
//! vocabulary, which make error rows), `min_new_tokens`' masking.

use super::*;

#[test]
fn a_stop_string_ends_the_completion_and_is_trimmed_unless_kept() {
    let ps = prompts(1, 6);
    let full = expected(&ps[0], 8);
    let text = Letters.decode(&full).unwrap();
    // Stop at the text of the third generated token.
    let stop = text[2..3].to_string();
    let first = text.find(&stop).unwrap();
    let mut p = params(8);
    p.stop = vec![stop];
    for include_stop_str in [false, true] {
        let (rows, _) = run_opts(
            gen_items(&ps, &p),
            SchedulerConfig::tiny(64, 4, 64),
            &mut FakeRunner::default(),
            false,
            include_stop_str,
        );
        let kept = if include_stop_str { first + 1 } else { first };
        assert_eq!(rows[0].finish_reason, FinishReason::Stop);
        assert_eq!(rows[0].completion.as_deref(), Some(&text[..kept]));
        assert_eq!(rows[0].completion_tokens as usize, first + 1);
    }
}

/// Rows of `prompts` when the model's top token is EOS after `at`
/// generated tokens.
fn run_eos_after(prompts: &[Vec<u32>], p: &GenerationParams, at: usize) -> Vec<OutputRow> {
    let mut runner = FakeRunner {
        eos_after: Some(at),
        ..Default::default()
    };
    run(
        gen_items(prompts, p),
        SchedulerConfig::tiny(64, 4, 64),
        &mut runner,
        false,
    )
    .0
}

#[test]
fn min_new_tokens_masks_eos_and_early_stop_strings() {
    let ps = prompts(1, 5);
    let full = expected(&ps[0], 10);
    let text = Letters.decode(&full).unwrap();
    // EOS forced as the 4th token: masked below 6, a stop above 2.
    for (min, want) in [
        (6, (FinishReason::Length, 10)),
        (2, (FinishReason::Stop, 4)),
    ] {
        let mut p = params(10);
        p.min_new_tokens = min;
        let rows = run_eos_after(&ps, &p, 3);
        assert_eq!(
            (rows[0].finish_reason, rows[0].completion_tokens as usize),
            want,
            "min {min}"
        );
        if min == 6 {
            assert!(!rows[0].completion_token_ids.contains(&EOS));
            assert_eq!(rows[0].completion.as_deref(), Some(text.as_str()));
        }
    }
    // The 2nd token's letter as a stop string: it counts only from token 5 on.
    let stop = text[1..2].to_string();
    let mut p = params(10);
    p.min_new_tokens = 4;
    p.stop = vec![stop.clone()];
    let (rows, _) = run(
        gen_items(&ps, &p),
        SchedulerConfig::tiny(64, 4, 64),
        &mut FakeRunner::default(),
        false,
    );
    match text[4..].find(&stop).map(|j| j + 4) {
        Some(j) => {
            assert_eq!(rows[0].finish_reason, FinishReason::Stop);
            assert_eq!(rows[0].completion.as_deref(), Some(&text[..j]));
            assert_eq!(rows[0].completion_tokens as usize, j + 1);
        }
        None => {
            assert_eq!(rows[0].finish_reason, FinishReason::Length);
            assert_eq!(rows[0].completion.as_deref(), Some(text.as_str()));
        }
    }
}

#[test]
fn min_new_tokens_masks_eos_for_sampled_rows_and_their_forks() {
    // EOS is the top token from the 4th on; sampled at temperature 1 with
    // 4 samples per record (host rows prepared together, forks among
    // them), no sample may end before 6 tokens.
    let ps = prompts(3, 5);
    let p = GenerationParams {
        max_new_tokens: 10,
        min_new_tokens: 6,
        temperature: 1.0,
        seed: 3,
        n: 4,
        ..Default::default()
    };
    let mut runner = FakeRunner {
        eos_after: Some(3),
        ..Default::default()
    };
    let (rows, _) = run(
        gen_items(&ps, &p),
        SchedulerConfig::tiny(64, 16, 64),
        &mut runner,
        false,
    );
    assert_eq!(rows.len(), 12);
    for r in &rows {
        assert!(
            r.completion_tokens >= 6,
            "{} sample {}: {r:?}",
            r.id,
            r.sample_index
        );
        assert!(
            !r.completion_token_ids[..6].contains(&EOS),
            "{} sample {}",
            r.id,
            r.sample_index
        );
    }
}

#[test]
fn stop_token_ids_end_the_completion() {
    let ps = prompts(1, 6);
    let full = expected(&ps[0], 8);
    let mut p = params(8);
    p.stop_token_ids = vec![full[2]];
    let (rows, _) = run(
        gen_items(&ps, &p),
        SchedulerConfig::tiny(64, 4, 64),
        &mut FakeRunner::default(),
        false,
    );
    let first = full.iter().position(|&t| t == full[2]).unwrap();
    assert_eq!(rows[0].finish_reason, FinishReason::Stop);
    assert_eq!(rows[0].completion_token_ids, full[..=first].to_vec());
}

#[test]
fn eos_gives_stop_unless_ignored_and_length_caps_the_rest() {
    let ps = prompts(2, 5);
    let rows = run_eos_after(&ps, &params(10), 3);
    for r in &rows {
        assert_eq!(
            (r.finish_reason, r.completion_tokens),
            (FinishReason::Stop, 4)
        );
        assert_eq!(r.completion_token_ids[3], EOS);
    }
    let mut p = params(10);
    p.ignore_eos = true;
    let rows = run_eos_after(&ps, &p, 3);
    for r in &rows {
        assert_eq!(
            (r.finish_reason, r.completion_tokens),
            (FinishReason::Length, 10)
        );
    }
}

#[test]
fn stop_token_ids_past_the_vocabulary_make_error_rows() {
    let mut p = params(4);
    p.stop_token_ids = vec![3, VOCAB as u32 + 5];
    let cfg = SchedulerConfig::tiny(64, 4, 64);
    let (rows, sum) = run(
        gen_items(&prompts(2, 5), &p),
        cfg,
        &mut FakeRunner::default(),
        false,
    );
    assert_eq!((sum.records, sum.errors), (2, 2));
    let want = format!(
        "`stop_token_ids` holds {}, past the model's vocabulary",
        VOCAB + 5
    );
    assert!(rows
        .iter()
        .all(|r| r.error.as_deref().unwrap().contains(&want)));
}
