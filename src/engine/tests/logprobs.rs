//! `output.logprobs` / `output.prompt_logprobs` against a direct
//! log-softmax of the fake model's logits.

use super::*;

fn log_softmax(history: &[u32]) -> Vec<f32> {
    let row = fake_logits(history);
    (0..VOCAB as u32)
        .map(|t| crate::scoring::token_logprob(&row, t) as f32)
        .collect()
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() < 1e-5
}

/// A row's prompt log-probabilities: none for the first token, then a
/// direct log-softmax of the fake model's logits at every position.
fn assert_prompt_logprobs(r: &OutputRow, prompt: &[u32], what: &str) {
    let got = r.prompt_logprobs.as_ref().expect("asked for");
    assert_eq!(got.len(), prompt.len(), "{what} {}", r.id);
    assert_eq!(got[0], None, "{what} {}", r.id);
    for i in 1..prompt.len() {
        let want = log_softmax(&prompt[..i])[prompt[i] as usize];
        assert!(
            close(got[i].expect("scored"), want),
            "{what} {} token {i}",
            r.id
        );
    }
}

#[test]
fn completion_logprobs_are_the_raw_log_softmax_at_each_sampled_token() {
    let ps = prompts(3, 9);
    // Sampled at temperature 1.5 with top-k 5: the log-probabilities are
    // still those of the unmodified distribution.
    let p = GenerationParams {
        max_new_tokens: 6,
        temperature: 1.5,
        top_k: 5,
        seed: 3,
        ..Default::default()
    };
    let opts = Opts {
        logprobs: 4,
        ..Default::default()
    };
    let cfg = SchedulerConfig::tiny(64, 4, 5); // chunked prefill
    let (rows, _) = run_with(gen_items(&ps, &p), cfg, &mut FakeRunner::default(), opts);
    for r in &rows {
        let lp = r.logprobs.as_ref().expect("logprobs asked for");
        let gen = &r.completion_token_ids;
        assert_eq!((lp.chosen.len(), lp.top.len()), (gen.len(), gen.len()));
        let mut hist = ps[r.input_row as usize].clone();
        for (j, &tok) in gen.iter().enumerate() {
            let want = log_softmax(&hist);
            assert!(close(lp.chosen[j], want[tok as usize]), "{} step {j}", r.id);
            let mut order: Vec<u32> = (0..VOCAB as u32).collect();
            order.sort_by(|&a, &b| {
                want[b as usize]
                    .total_cmp(&want[a as usize])
                    .then(a.cmp(&b))
            });
            let top = &lp.top[j];
            assert_eq!(top.len(), 4);
            for (k, &(t, l)) in top.iter().enumerate() {
                assert_eq!(t, order[k], "{} step {j} rank {k}", r.id);
                assert!(close(l, want[t as usize]));
            }
            hist.push(tok);
        }
    }
}

#[test]
fn prompt_logprobs_cover_every_prompt_token_but_the_first() {
    // Two records share their first 8 tokens: the prefix cache must not
    // skip positions whose log-probabilities are asked for.
    let a: Vec<u32> = (0..11).map(|t| (t * 5) % 29).collect();
    let mut b = a.clone();
    b[9] = 3;
    let ps = vec![a, b];
    let opts = Opts {
        prompt_logprobs: true,
        logprobs: 1,
        ..Default::default()
    };
    let cfg = SchedulerConfig::tiny(64, 4, 3);
    let (rows, _) = run_with(
        gen_items(&ps, &params(3)),
        cfg,
        &mut FakeRunner::default(),
        opts,
    );
    for r in &rows {
        assert_prompt_logprobs(r, &ps[r.input_row as usize], "");
        // Greedy: the top-1 is the chosen token.
        let lp = r.logprobs.as_ref().unwrap();
        for (j, &tok) in r.completion_token_ids.iter().enumerate() {
            assert_eq!(lp.top[j][0].0, tok);
            assert!(close(lp.top[j][0].1, lp.chosen[j]));
        }
    }
}

#[test]
fn prompts_sharing_a_prefix_reuse_its_blocks_and_its_kept_prompt_logprobs() {
    // Three records with the same first 13 tokens (3 blocks of 4 and one
    // token more), one at a time: the second and third reuse the blocks
    // of the first, and their prompt log-probabilities are still those of
    // a direct log-softmax at every position.
    let shared: Vec<u32> = (0..13).map(|t| (t * 7 + 3) % 31).collect();
    let ps: Vec<Vec<u32>> = (0..3u32)
        .map(|i| {
            let mut p = shared.clone();
            p.extend([i + 1, (i * 5) % 29, 11]);
            p
        })
        .collect();
    let opts = Opts {
        prompt_logprobs: true,
        ..Default::default()
    };
    let cfg = SchedulerConfig::tiny(64, 1, 64);
    let (rows, sum) = run_with(
        gen_items(&ps, &params(2)),
        cfg,
        &mut FakeRunner::default(),
        opts,
    );
    assert_eq!(rows.len(), 3);
    for r in &rows {
        assert_prompt_logprobs(r, &ps[r.input_row as usize], "one at a time");
        let reused = if r.input_row == 0 { 0 } else { 12 };
        assert_eq!(r.cached_prompt_tokens as usize, reused, "{}", r.id);
    }
    assert_eq!(sum.prefix_hit_tokens, 2 * 12);
    // Side by side, in small chunks and in a cache tight enough to preempt:
    // whatever is reused, every value is still the direct one.
    for cfg in [
        SchedulerConfig::tiny(64, 3, 5),
        SchedulerConfig::tiny(6, 3, 64),
    ] {
        let (rows, sum) = run_with(
            gen_items(&ps, &params(4)),
            cfg,
            &mut FakeRunner::default(),
            opts,
        );
        assert_eq!(rows.len(), 3, "{cfg:?}");
        for r in &rows {
            assert_prompt_logprobs(r, &ps[r.input_row as usize], &format!("{cfg:?}"));
        }
        if cfg.num_blocks == 6 {
            assert!(sum.preemptions > 0, "the tight cache must preempt");
        }
    }
}

#[test]
fn forked_samples_each_get_their_own_logprobs_and_the_shared_prompt_ones() {
    let ps = prompts(2, 6);
    let p = GenerationParams {
        max_new_tokens: 5,
        temperature: 1.0,
        seed: 9,
        n: 3,
        ..Default::default()
    };
    let opts = Opts {
        logprobs: 2,
        prompt_logprobs: true,
        ..Default::default()
    };
    let cfg = SchedulerConfig::tiny(64, 8, 64);
    let (rows, sum) = run_with(gen_items(&ps, &p), cfg, &mut FakeRunner::default(), opts);
    assert_eq!(rows.len(), 6);
    assert_eq!(sum.prefill_tokens, 12, "one prefill per record");
    for r in &rows {
        let mut hist = ps[r.input_row as usize].clone();
        let lp = r.logprobs.as_ref().unwrap();
        for (j, &tok) in r.completion_token_ids.iter().enumerate() {
            assert!(close(lp.chosen[j], log_softmax(&hist)[tok as usize]));
            hist.push(tok);
        }
        let pl = r.prompt_logprobs.as_ref().unwrap();
        assert!(
            pl[1..].iter().all(Option::is_some),
            "{} {}",
            r.id,
            r.sample_index
        );
    }
}
