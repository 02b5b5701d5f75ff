//! The step pipeline driven by a fake model runner whose logits are a
//! function of each row's token history, and a fake decoder (token t is
//! the letter `a + t`; token 31 is EOS).

use super::intake::Intake;
use super::rows::RowBuilder;
use super::runner::{logit_rows, ModelRunner, StepLogits};
use super::update::StopRule;
use super::{drive, Pipeline, Prepared, Tokenized};
use crate::config::{GenerationParams, ScoringSpec};
use crate::input::InputRecord;
use crate::model::IdPatch;
use crate::output::{FinishReason, OutputRow, RowStatus};
use crate::prompt::Decoder;
use crate::scheduler::{Scheduler, SchedulerConfig, StepPlan};
use crate::scoring::Scorer;
use crate::Result;
use candle_core::{Device, Tensor};

mod logprobs;
mod overlap;
mod samples;
mod stops;

const VOCAB: usize = 32;
const EOS: u32 = 31;

struct Letters;

impl Decoder for Letters {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(ids
            .iter()
            .filter(|&&t| t != EOS)
            .map(|&t| (b'a' + (t % 26) as u8) as char)
            .collect())
    }
    fn stop_ids(&self) -> &[u32] {
        &[EOS]
    }
}

/// The "model": the next token after a history is a hash of it; every other
/// token gets a lower logit that also depends on the history.
fn fake_logits(history: &[u32]) -> Vec<f32> {
    let h = history
        .iter()
        .fold(7u64, |h, &t| h.wrapping_mul(31).wrapping_add(t as u64 + 1));
    let next = (h % 29) as usize; // never EOS unless the test forces it
    (0..VOCAB)
        .map(|v| {
            if v == next {
                4.0
            } else {
                ((h >> (v % 16)) % 7) as f32 * 0.25 - 1.0
            }
        })
        .collect()
}

/// Logits as `fake_logits` of each requested row's history, plus a count
/// of the tokens it was asked to run.
#[derive(Default)]
struct FakeRunner {
    tokens_run: usize,
    eos_after: Option<usize>,
    /// EOS tops every generated position whose history sums to a multiple
    /// of this (stops at varied lengths).
    eos_sum_mod: Option<u64>,
    /// Rows whose token came from the device (an overlapped step's patch).
    patched: usize,
}

impl ModelRunner for FakeRunner {
    fn execute_patched(
        &mut self,
        plan: &StepPlan,
        sched: &Scheduler,
        patch: Option<&IdPatch>,
    ) -> Result<StepLogits> {
        let (_, spans) = logit_rows(plan, sched);
        let patched: Vec<(u32, u32)> = match patch {
            Some(p) => {
                let ids = p.ids.to_vec1::<u32>()?;
                p.rows
                    .iter()
                    .zip(&p.src)
                    .map(|(&r, &s)| (r, ids[s as usize]))
                    .collect()
            }
            None => Vec::new(),
        };
        self.patched += patched.len();
        let mut data = Vec::new();
        let mut offset = 0;
        for c in &plan.chunks {
            let req = sched.request(c.seq);
            let mut tokens = req.tokens().to_vec();
            for &(row, id) in &patched {
                if (offset..offset + c.len).contains(&(row as usize)) {
                    tokens[c.start + row as usize - offset] = id;
                }
            }
            assert!(
                !tokens[..c.start + c.len].contains(&super::overlap::PLACEHOLDER),
                "a placeholder reached the model"
            );
            offset += c.len;
            let (from, to) = req.logit_rows(c.start, c.len);
            for pos in c.start + from..c.start + to {
                let history = &tokens[..=pos];
                let mut row = fake_logits(history);
                if self.eos_after.is_some()
                    && self.eos_after == history.len().checked_sub(req.prompt_len())
                {
                    row[EOS as usize] = 10.0;
                }
                let sum = history.iter().map(|&t| t as u64).sum::<u64>();
                if history.len() > req.prompt_len()
                    && self.eos_sum_mod.is_some_and(|m| sum % m == 0)
                {
                    row[EOS as usize] = 10.0;
                }
                data.extend(row);
            }
            self.tokens_run += c.len;
        }
        let rows = data.len() / VOCAB;
        let logits = Tensor::from_vec(data, (rows, VOCAB), &Device::Cpu)?;
        Ok(StepLogits {
            logits,
            spans,
            ops: crate::backend::ops_for(&Device::Cpu, candle_core::DType::F32)?,
        })
    }
}

fn params(max_new_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens,
        ..Default::default()
    }
}

fn record(i: usize, p: GenerationParams) -> InputRecord {
    InputRecord::for_tokens(i as u64, format!("r{i}"), p)
}

/// Runs prepared records through intake and steps; rows in write order
/// and the pipeline's counters.
fn run(
    items: Vec<Prepared>,
    cfg: SchedulerConfig,
    runner: &mut FakeRunner,
    score: bool,
) -> (Vec<OutputRow>, super::JobSummary) {
    run_opts(items, cfg, runner, score, false)
}

/// `run`, with the row builder's `include_stop_str`.
fn run_opts(
    items: Vec<Prepared>,
    cfg: SchedulerConfig,
    runner: &mut FakeRunner,
    score: bool,
    include_stop_str: bool,
) -> (Vec<OutputRow>, super::JobSummary) {
    let opts = Opts {
        score,
        include_stop_str,
        ..Default::default()
    };
    run_with(items, cfg, runner, opts)
}

/// What a test run asks beyond the records.
#[derive(Default, Clone, Copy)]
struct Opts {
    score: bool,
    include_stop_str: bool,
    logprobs: usize,
    prompt_logprobs: bool,
    overlap: bool,
}

fn run_with(
    items: Vec<Prepared>,
    cfg: SchedulerConfig,
    runner: &mut FakeRunner,
    opts: Opts,
) -> (Vec<OutputRow>, super::JobSummary) {
    let Opts {
        score,
        include_stop_str,
        ..
    } = opts;
    let spec = ScoringSpec {
        loglikelihood: score,
        continuation_column: "continuation".into(),
        reference_column: "reference".into(),
        metrics: vec![],
        normalize: vec![],
        regex: String::new(),
    };
    let scorer = Scorer::new(&spec);
    let rows = RowBuilder {
        decoder: &Letters,
        scorer: &scorer,
        include_token_ids: true,
        include_stop_str,
    };
    let stops = StopRule {
        decoder: &Letters,
        ctx: 64,
    };
    let mut pipe = Pipeline::new(cfg, stops, rows);
    pipe.logprobs = opts.logprobs;
    pipe.vocab = VOCAB;
    pipe.overlap = opts.overlap;
    let (tx, rx) = std::sync::mpsc::sync_channel(items.len().max(1));
    for it in items {
        tx.send(Ok(it)).unwrap();
    }
    drop(tx);
    let defaults = params(4);
    let mut intake = Intake::new(&rx, &defaults, cfg.max_num_seqs, score);
    intake.prompt_logprobs = opts.prompt_logprobs;
    let mut sink: Vec<OutputRow> = Vec::new();
    drive(&mut pipe, &mut intake, runner, &mut sink, &|| false).unwrap();
    assert_eq!(pipe.sched.blocks().0, 0, "every block is returned");
    (sink, pipe.finish(runner))
}

fn gen_items(prompts: &[Vec<u32>], p: &GenerationParams) -> Vec<Prepared> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let tok = Tokenized {
                tokens: t.clone(),
                prompt_len: t.len(),
            };
            (record(i, p.clone()), Ok(tok))
        })
        .collect()
}

/// What greedy decoding of the fake model gives for a prompt.
fn expected(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut t = prompt.to_vec();
    for _ in 0..n {
        let row = fake_logits(&t);
        t.push(crate::sampler::argmax(&row));
    }
    t[prompt.len()..].to_vec()
}

fn prompts(n: usize, len: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| (0..len as u32).map(|t| (t * 3 + i as u32) % 29).collect())
        .collect()
}

#[test]
fn records_are_admitted_in_sorted_prompt_order_one_at_a_time() {
    let ps = vec![vec![5, 1, 2], vec![1, 2, 3], vec![3, 3, 3]];
    let (rows, _) = run(
        gen_items(&ps, &params(2)),
        SchedulerConfig::tiny(64, 1, 64),
        &mut FakeRunner::default(),
        false,
    );
    let order: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(order, ["r1", "r2", "r0"]);
    assert!(rows.windows(2).all(|w| w[0].queue_ms <= w[1].queue_ms));
}

#[test]
fn preemption_and_recompute_give_the_same_tokens_as_a_roomy_cache() {
    let ps = prompts(6, 10);
    let p = params(12);
    let (roomy, s1) = run(
        gen_items(&ps, &p),
        SchedulerConfig::tiny(200, 8, 1000),
        &mut FakeRunner::default(),
        false,
    );
    let mut tight_runner = FakeRunner::default();
    let (tight, s2) = run(
        gen_items(&ps, &p),
        SchedulerConfig::tiny(12, 4, 5),
        &mut tight_runner,
        false,
    );
    assert!(s2.preemptions > 0, "the tight cache must preempt");
    assert_eq!(s1.preemptions, 0);
    assert!(
        tight_runner.tokens_run > s1.forward_tokens,
        "recompute reruns tokens"
    );
    for rows in [&roomy, &tight] {
        assert_eq!(rows.len(), 6);
        for r in rows.iter() {
            let i = r.input_row as usize;
            assert_eq!(
                r.completion_token_ids,
                expected(&ps[i], 12),
                "record {}",
                r.id
            );
            assert_eq!(r.finish_reason, FinishReason::Length);
        }
    }
}

/// Runs three records of which `r1` cannot run, `n` samples each.
fn run_with_bad_record(n: usize) -> (Vec<OutputRow>, super::JobSummary) {
    let ps = prompts(3, 4);
    let p = GenerationParams { n, ..params(3) };
    let mut items = gen_items(&ps, &p);
    items[1].1 = Err(crate::input::RecordError::PromptTooLong {
        record: "r1".into(),
        tokens: 9,
        limit: 4,
    });
    run(
        items,
        SchedulerConfig::tiny(64, 4, 64),
        &mut FakeRunner::default(),
        false,
    )
}

#[test]
fn a_record_that_cannot_run_gives_an_error_row_per_sample() {
    let (rows, sum) = run_with_bad_record(3);
    assert_eq!((sum.records, sum.ok, sum.errors), (9, 6, 3));
    let mut bad: Vec<u32> = rows
        .iter()
        .filter(|r| r.status == RowStatus::Error)
        .map(|r| r.sample_index)
        .collect();
    bad.sort();
    assert_eq!(bad, [0, 1, 2]);
}

#[test]
fn records_that_cannot_run_become_error_rows_and_the_rest_run() {
    let (rows, sum) = run_with_bad_record(1);
    assert_eq!((sum.records, sum.ok, sum.errors), (3, 2, 1));
    let bad = rows.iter().find(|r| r.id == "r1").unwrap();
    assert_eq!(
        (bad.status, bad.finish_reason),
        (RowStatus::Error, FinishReason::Error)
    );
    assert!(bad
        .error
        .as_deref()
        .unwrap()
        .contains("max_prompt_tokens is 4"));
    assert_eq!(rows.iter().filter(|r| r.status == RowStatus::Ok).count(), 2);
}

/// Scoring: prompt + continuation; each continuation token's log-probability
/// under the fake model, summed.
fn expected_score(tokens: &[u32], prompt_len: usize) -> f64 {
    (prompt_len..tokens.len())
        .map(|i| crate::scoring::token_logprob(&fake_logits(&tokens[..i]), tokens[i]))
        .sum()
}

#[test]
fn score_requests_match_a_direct_computation_and_share_the_prefix_cache() {
    // Four choices after one shared 9-token question (a multiple-choice eval).
    let question: Vec<u32> = (0..9).map(|t| (t * 5 + 1) % 29).collect();
    let items: Vec<Prepared> = (0..4u32)
        .map(|i| {
            let mut tokens = question.clone();
            tokens.extend([i + 2, i + 3, 7]);
            let tok = Tokenized {
                tokens,
                prompt_len: question.len(),
            };
            (record(i as usize, params(1)), Ok(tok))
        })
        .collect();
    let want: Vec<f64> = items
        .iter()
        .map(|(_, t)| expected_score(&t.as_ref().unwrap().tokens, 9))
        .collect();
    for cfg in [
        SchedulerConfig::tiny(64, 8, 64),
        SchedulerConfig::tiny(64, 8, 5),
        SchedulerConfig::tiny(8, 2, 7),
    ] {
        let (rows, sum) = run(items.clone(), cfg, &mut FakeRunner::default(), true);
        assert_eq!(rows.len(), 4);
        for r in &rows {
            let (ll, n) = r.loglikelihood.unwrap();
            assert_eq!(n, 3);
            assert!((ll - want[r.input_row as usize]).abs() < 1e-9, "{cfg:?}");
            assert_eq!(
                (r.finish_reason, r.completion_tokens),
                (FinishReason::Scored, 0)
            );
        }
        if cfg.num_blocks == 64 {
            // The 8 tokens of the question's two full blocks come from the
            // cache for the three choices after the first.
            assert_eq!(sum.prefix_hit_tokens, 3 * 8, "{cfg:?}");
        }
    }
}
